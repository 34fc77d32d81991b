"""Speech features with exactly one feature vector per output video frame.

Two sources, one output shape ``[T, D]`` float32 with ``T`` = number of video frames:

* ``speech_features``: log-mel computed here (librosa) from a mono waveform. Frame ``i`` covers the
  time interval ``[i/fps, (i+1)/fps)``. That interval is split into ``SUB_STEPS`` equal sub-steps;
  each sub-step is the energy-average of the fine-hop (5 ms) mel frames whose centres fall inside
  it, then converted to dB and mapped from a FIXED dB range to [-1, 1]. Fixed range (not per-clip
  statistics) keeps the features streaming-friendly: a chunk of audio gives the same numbers
  whether it is processed alone or as part of a long file. Pooling (rather than sampling one
  window per frame) makes the features integrate the whole frame interval at any fps, from 1 to
  120: a sub-step narrower than one fine hop falls back to the nearest mel frame.

  Layout of the ``SPEECH_FEATURE_DIM`` = ``SUB_STEPS * N_MELS`` = 2 * 80 = 160 values of a frame:
  the 80 mel bands of the first half of the frame interval, then the 80 bands of the second half.

* ``encoder_output_to_frame_features``: the bridge from ComfyUI's core AUDIO_ENCODER_OUTPUT
  (wav2vec2 / whisper features at ~50 Hz) linearly interpolated at the video frame centres.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from ..errors import UserFacingError

_SAMPLE_RATE = 16000  # the same 16 kHz as media.audio.SPEECH_SAMPLE_RATE
N_MELS = 80
SUB_STEPS = 2
SPEECH_FEATURE_DIM = N_MELS * SUB_STEPS
# Identifies this exact feature definition in checkpoints: bump it when any constant below changes.
SPEECH_FEATURE_ID = "logmel80x2-16k-v1"

_N_FFT = 512
_WIN_LENGTH = 400  # 25 ms analysis window
_HOP_LENGTH = 80  # 5 ms fine hop: >= 2 mel frames per sub-step up to 100 fps
_DB_FLOOR = -80.0  # digital silence and quiet room noise map to -1
_DB_CEIL = 30.0  # above a full-scale sine's loudest band: loud speech stays below +1
_ENCODER_RATE_HZ = 50.0  # wav2vec2 / whisper encoders: one vector per 20 ms

_mel_basis_cache: dict[tuple[int, int, int], np.ndarray] = {}


def _as_float_array(values, what: str) -> np.ndarray:
    """numpy float32 from numpy or a (CPU or GPU) torch tensor, without importing torch."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise UserFacingError(f"{what} is not numeric ({error}); pass a float array") from None
    return array


def _check_fps(fps) -> float:
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise UserFacingError(f"fps must be a number, got {fps!r}") from None
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        raise UserFacingError(f"fps must be between 0 and 1000, got {fps}; pass the video's frame rate")
    return fps


def _check_n_frames(n_frames) -> int:
    try:
        whole = not isinstance(n_frames, bool) and int(n_frames) == n_frames and n_frames >= 1
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise UserFacingError(f"n_frames must be a positive whole number, got {n_frames!r}")
    return int(n_frames)


def _mono_wave(wave) -> np.ndarray:
    wave = _as_float_array(wave, "audio")
    if wave.ndim == 2 and min(wave.shape) <= 8:
        # ComfyUI AUDIO waveforms are channels-first [C, S]; accept [S, C] too (C is the short axis).
        channel_axis = 0 if wave.shape[0] <= wave.shape[1] else 1
        wave = wave.mean(axis=channel_axis)
    if wave.ndim != 1:
        raise UserFacingError(f"audio must be mono [samples] (or [channels, samples]), got shape {tuple(wave.shape)}")
    if wave.size == 0:
        raise UserFacingError("audio is empty (zero samples); pass speech audio at least one frame long")
    if not np.isfinite(wave).all():
        raise UserFacingError("audio contains NaN or infinite samples; re-export the audio file")
    return wave


def _resample_to_speech_rate(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == _SAMPLE_RATE:
        return wave
    from scipy.signal import resample_poly

    ratio = Fraction(_SAMPLE_RATE, sample_rate)
    return resample_poly(wave, ratio.numerator, ratio.denominator).astype(np.float32)


def _mel_basis() -> np.ndarray:
    key = (_SAMPLE_RATE, _N_FFT, N_MELS)
    if key not in _mel_basis_cache:
        import librosa

        _mel_basis_cache[key] = librosa.filters.mel(
            sr=_SAMPLE_RATE, n_fft=_N_FFT, n_mels=N_MELS, fmin=0.0, fmax=_SAMPLE_RATE / 2
        ).astype(np.float32)
    return _mel_basis_cache[key]


def _fine_mel_power(wave: np.ndarray) -> np.ndarray:
    """Mel power [M, N_MELS]; mel frame m is centred on sample m * _HOP_LENGTH."""
    import librosa

    spectrum = librosa.stft(
        wave, n_fft=_N_FFT, hop_length=_HOP_LENGTH, win_length=_WIN_LENGTH, window="hann", center=True, pad_mode="constant"
    )
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return (_mel_basis() @ power).T


def speech_features(wave, sample_rate: int, fps: float, n_frames: int | None = None) -> np.ndarray:
    """Log-mel features, exactly one ``SPEECH_FEATURE_DIM`` vector per video frame.

    ``wave``: mono float samples (numpy or torch; ``[C, S]`` is mixed down) at ``sample_rate``.
    ``n_frames`` defaults to ``round(duration * fps)``; audio shorter than ``n_frames / fps`` is
    treated as followed by silence, longer audio is ignored past the last frame.
    Returns float32 ``[n_frames, SPEECH_FEATURE_DIM]`` in [-1, 1]; deterministic.
    """
    fps = _check_fps(fps)
    try:
        valid_rate = not isinstance(sample_rate, bool) and float(sample_rate).is_integer() and sample_rate > 0
    except (TypeError, ValueError, OverflowError):
        valid_rate = False
    if not valid_rate:
        raise UserFacingError(f"sample_rate must be a positive whole number of Hz, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    wave = _resample_to_speech_rate(_mono_wave(wave), sample_rate)
    if n_frames is None:
        n_frames = round(len(wave) / _SAMPLE_RATE * fps)
        if n_frames < 1:
            raise UserFacingError(
                f"audio is {len(wave) / _SAMPLE_RATE * 1000:.1f} ms long, shorter than half a frame at {fps:g} fps; "
                "pass longer audio"
            )
    n_frames = _check_n_frames(n_frames)

    # Keep exactly the audio the analysis windows of the used mel frames reach, padding with
    # silence past the end: then frame i does not depend on whether the audio goes on after n_frames.
    needed_samples = int(math.ceil(n_frames / fps * _SAMPLE_RATE)) + _HOP_LENGTH + _N_FFT // 2
    if len(wave) < needed_samples:
        wave = np.pad(wave, (0, needed_samples - len(wave)))
    else:
        wave = wave[:needed_samples]
    mel_power = _fine_mel_power(wave)

    # Sub-step s (of all frames, in order) covers [s, s+1) / (fps * SUB_STEPS) seconds; mel frame m
    # is centred at m * hop / sr. Average the mel frames whose centre lies in the interval, by
    # prefix sums so the whole thing is vectorised.
    n_sub_steps = n_frames * SUB_STEPS
    edges_s = np.arange(n_sub_steps + 1, dtype=np.float64) / (fps * SUB_STEPS)
    edges_in_mel_frames = edges_s * _SAMPLE_RATE / _HOP_LENGTH
    first = np.ceil(edges_in_mel_frames[:-1] - 1e-9).astype(np.int64)
    stop = np.ceil(edges_in_mel_frames[1:] - 1e-9).astype(np.int64)
    first = np.clip(first, 0, len(mel_power) - 1)
    stop = np.clip(stop, 0, len(mel_power))
    prefix = np.concatenate([np.zeros((1, N_MELS), np.float64), np.cumsum(mel_power, axis=0, dtype=np.float64)])
    counts = stop - first
    pooled = np.empty((n_sub_steps, N_MELS), np.float64)
    has_frames = counts > 0
    pooled[has_frames] = (prefix[stop[has_frames]] - prefix[first[has_frames]]) / counts[has_frames, None]
    # Sub-steps narrower than one hop (fps * SUB_STEPS > 200) hold no mel centre: take the nearest.
    centres = (edges_in_mel_frames[:-1] + edges_in_mel_frames[1:]) / 2
    nearest = np.clip(np.rint(centres[~has_frames]).astype(np.int64), 0, len(mel_power) - 1)
    pooled[~has_frames] = mel_power[nearest]

    decibels = 10.0 * np.log10(np.maximum(pooled, 10.0 ** (_DB_FLOOR / 10.0)))
    normalised = (np.clip(decibels, _DB_FLOOR, _DB_CEIL) - _DB_FLOOR) / (_DB_CEIL - _DB_FLOOR) * 2.0 - 1.0
    return normalised.reshape(n_frames, SPEECH_FEATURE_DIM).astype(np.float32)


def _encoder_tensor(audio_encoder_output, layers) -> np.ndarray:
    if not isinstance(audio_encoder_output, dict):
        raise UserFacingError(
            "expected an AUDIO_ENCODER_OUTPUT (a dict from ComfyUI's 'Audio Encoder Encode' node), "
            f"got {type(audio_encoder_output).__name__}"
        )
    if layers is None:
        if "encoded_audio" not in audio_encoder_output:
            raise UserFacingError("AUDIO_ENCODER_OUTPUT has no 'encoded_audio'; connect the output of 'Audio Encoder Encode'")
        return _as_float_array(audio_encoder_output["encoded_audio"], "encoded_audio")
    all_layers = audio_encoder_output.get("encoded_audio_all_layers")
    if not isinstance(all_layers, (list, tuple)) or not all_layers:
        raise UserFacingError(
            "AUDIO_ENCODER_OUTPUT has no 'encoded_audio_all_layers'; pick layers=None to use the final layer"
        )
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    chosen = []
    for layer in layer_list:
        if not -len(all_layers) <= layer < len(all_layers):
            raise UserFacingError(f"encoder layer {layer} does not exist: the encoder output has {len(all_layers)} layers")
        chosen.append(_as_float_array(all_layers[layer], f"encoder layer {layer}"))
    try:
        return np.concatenate(chosen, axis=-1)
    except ValueError:
        raise UserFacingError(f"encoder layers {layer_list} have different shapes; pick layers of one encoder") from None


def encoder_output_to_frame_features(
    audio_encoder_output,
    fps: float,
    n_frames: int,
    *,
    layers: int | Sequence[int] | None = None,
    batch_index: int = 0,
    encoder_rate_hz: float = _ENCODER_RATE_HZ,
) -> np.ndarray:
    """ComfyUI AUDIO_ENCODER_OUTPUT (~50 Hz) -> float32 ``[n_frames, D]``, one vector per video frame.

    ``layers``: None uses ``encoded_audio`` (the final layer); an int or a list of ints picks from
    ``encoded_audio_all_layers`` (several are concatenated along D). Encoder vector ``j`` is taken
    to sit at time ``(j + 0.5) / encoder_rate_hz`` and video frame ``i`` at ``(i + 0.5) / fps``
    (the centre of the interval ``speech_features`` pools), linearly interpolated between them and
    held at the ends.
    """
    fps = _check_fps(fps)
    n_frames = _check_n_frames(n_frames)
    encoded = _encoder_tensor(audio_encoder_output, layers)
    if encoded.ndim == 2:
        encoded = encoded[None]
    if encoded.ndim != 3 or encoded.shape[1] < 1 or encoded.shape[2] < 1:
        raise UserFacingError(f"encoded audio must have shape [batch, time, features], got {tuple(encoded.shape)}")
    if not 0 <= batch_index < encoded.shape[0]:
        raise UserFacingError(f"batch_index {batch_index} is out of range: the encoder output holds {encoded.shape[0]} clip(s)")
    sequence = encoded[batch_index].astype(np.float64)
    if not np.isfinite(sequence).all():
        raise UserFacingError("encoded audio contains NaN or infinite values; re-run the audio encoder")

    encoder_times = (np.arange(sequence.shape[0]) + 0.5) / float(encoder_rate_hz)
    frame_times = (np.arange(n_frames) + 0.5) / fps
    position = np.interp(frame_times, encoder_times, np.arange(sequence.shape[0], dtype=np.float64))
    lower = np.floor(position).astype(np.int64)
    upper = np.minimum(lower + 1, sequence.shape[0] - 1)
    weight = (position - lower)[:, None]
    return ((1.0 - weight) * sequence[lower] + weight * sequence[upper]).astype(np.float32)


def _definitions() -> dict:
    """feature id -> (short name, values per frame, function): every definition this pack computes."""
    from .whisper_features import WHISPER_FEATURE_DIM, WHISPER_FEATURE_ID, whisper_speech_features

    return {SPEECH_FEATURE_ID: ("logmel", SPEECH_FEATURE_DIM, speech_features),
            WHISPER_FEATURE_ID: ("whisper", WHISPER_FEATURE_DIM, whisper_speech_features)}


def _definition(feature_id: str) -> tuple:
    definitions = _definitions()
    if feature_id not in definitions:
        raise UserFacingError(f"unknown speech feature definition {feature_id!r}; this version computes {sorted(definitions)}")
    return definitions[feature_id]


def feature_dim(feature_id: str) -> int:
    """Values per frame of a feature definition this pack computes itself."""
    return _definition(feature_id)[1]


def feature_id_named(name: str) -> str:
    """The definition a short name ("logmel", "whisper": the CLI's --speech-features) stands for."""
    by_name = {short: feature_id for feature_id, (short, _, _) in _definitions().items()}
    if name not in by_name:
        raise UserFacingError(f"unknown speech features {name!r}; choose one of: {', '.join(by_name)}.")
    return by_name[name]


def frame_speech_features(wave, sample_rate: int, fps: float, n_frames: int | None = None, *,
                          feature_id: str = SPEECH_FEATURE_ID) -> np.ndarray:
    """One feature vector per video frame in the definition ``feature_id`` names (a model's
    ``config.speech_feature_id``): the log-mel above or Whisper's encoder (whisper_features.py)."""
    return _definition(feature_id)[2](wave, sample_rate, fps, n_frames=n_frames)
