"""Encode Speech: driving AUDIO -> SPEECH_FEATURES, exactly one feature vector per output video frame.

SPEECH_FEATURES is a plain dict (like core AUDIO / LATENT) so other packs can read it:
  ``features``    np.float32 [T, D], one row per video frame
  ``fps``         float, the video frame rate the rows are for
  ``n_frames``    int, T
  ``feature_id``  str, which feature definition made them (checkpoints record the one they expect)
  ``audio``       np.float32 mono at ``sample_rate``, exactly T / fps seconds (for the final mux)
  ``sample_rate`` int (16000)
"""
from __future__ import annotations

from ..errors import UserFacingError
from ..media import SPEECH_SAMPLE_RATE, load_audio
from .comfy_types import audio_to_comfy, comfy_audio_to_wave
from ..media.audio import fit_to_length
from ..media.features import SPEECH_FEATURE_ID, encoder_output_to_frame_features, speech_features
from . import _comfy

CATEGORY = "sparse-avatar"


class EncodeSpeech:
    """Turn the driving speech into per-frame features for the sampler."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("SPEECH_FEATURES", "AUDIO", "INT")
    RETURN_NAMES = ("speech", "audio", "n_frames")
    OUTPUT_TOOLTIPS = (
        "Per-frame speech features for the avatar sampler.",
        "The driving audio as used (16 kHz mono, trimmed/padded to the frames), for muxing into the video.",
        "Number of video frames the speech covers.",
    )
    FUNCTION = "encode"
    DESCRIPTION = ("Computes one speech-feature vector per output video frame from the driving audio (log-mel), "
                   "or resamples a connected audio-encoder output (wav2vec2/whisper) to the frame rate.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": ("AUDIO", {"tooltip": "The driving speech (any sample rate and channel count)."}),
                "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 120.0, "step": 0.01,
                                  "tooltip": "Frame rate of the video to generate; use the reference's fps output "
                                             "to match it."}),
                "frames": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                   "tooltip": "Number of video frames; 0 = as many as the audio lasts "
                                              "(round(duration x fps)). Audio is trimmed or padded with silence."}),
            },
            "optional": {
                "audio_encoder_output": ("AUDIO_ENCODER_OUTPUT", {
                    "tooltip": "Output of core Audio Encoder Encode (wav2vec2/whisper) for the same audio; when "
                               "connected, these features are used instead of log-mel."}),
            },
        }

    def encode(self, audio, fps=25.0, frames=0, audio_encoder_output=None):
        _comfy.check_interrupted()
        progress = _comfy.progress_bar(2)
        # The same check as the CLI's probe and render: empty / NaN refused, silence logged as a warning.
        wave = load_audio(comfy_audio_to_wave(audio), sample_rate=SPEECH_SAMPLE_RATE)
        n_frames = int(frames) if frames else max(1, int(round(wave.shape[0] / SPEECH_SAMPLE_RATE * fps)))
        wave = fit_to_length(wave, int(round(n_frames / fps * SPEECH_SAMPLE_RATE)))
        progress.update(1)
        _comfy.check_interrupted()
        if audio_encoder_output is not None:
            features = encoder_output_to_frame_features(audio_encoder_output, fps, n_frames)
            feature_id = f"audio_encoder:{features.shape[1]}"
        else:
            features = speech_features(wave, SPEECH_SAMPLE_RATE, fps, n_frames=n_frames)
            feature_id = SPEECH_FEATURE_ID
        if features.shape[0] != n_frames:
            raise UserFacingError(f"speech features have {features.shape[0]} rows for {n_frames} frames; please report this")
        progress.update(1)
        speech = {"features": features, "fps": float(fps), "n_frames": n_frames, "feature_id": feature_id,
                  "audio": wave, "sample_rate": SPEECH_SAMPLE_RATE}
        return speech, audio_to_comfy(wave, SPEECH_SAMPLE_RATE), n_frames


NODE_CLASS_MAPPINGS = {"SparseAvatarEncodeSpeech": EncodeSpeech}
NODE_DISPLAY_NAME_MAPPINGS = {"SparseAvatarEncodeSpeech": "Encode Speech"}
