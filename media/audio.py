"""Audio in: any file PyAV can read, or a ComfyUI AUDIO dict -> mono float32 at one sample rate.

Decoding and channel down-mixing go through FFmpeg's swresample (it knows the proper 5.1 -> mono
matrix); sample-rate conversion goes through ``resample_audio`` only, so a file and a ComfyUI
AUDIO dict of the same sound give the same samples.
"""
from __future__ import annotations

import logging
import math
import os
import wave as wave_file
from fractions import Fraction
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

from ..errors import UserFacingError
from ..files import atomic_temp_path
from ._pyav import FFmpegError, av
from .paths import resolve_input_path

SPEECH_SAMPLE_RATE = 16000
# One logger for the pack's warnings, named for display (ComfyUI imports the pack under its path).
logger = logging.getLogger("sparse-avatar")
# Peak below this (dBFS) counts as silence: quieter than any usable speech recording.
SILENCE_PEAK_DBFS = -60.0


def resample_audio(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (deterministic, linear phase) of a mono float32 signal."""
    if int(source_rate) == int(target_rate) or wave.size == 0:
        return np.ascontiguousarray(wave, dtype=np.float32)
    ratio = Fraction(int(target_rate), int(source_rate))
    resampled = resample_poly(wave.astype(np.float64), ratio.numerator, ratio.denominator)
    return resampled.astype(np.float32)


def fit_to_length(wave: np.ndarray, n_samples: int) -> np.ndarray:
    """Trim, or pad with silence at the end, to exactly ``n_samples``."""
    if wave.shape[0] >= n_samples:
        return np.ascontiguousarray(wave[:n_samples])
    return np.concatenate([wave, np.zeros(n_samples - wave.shape[0], dtype=np.float32)])


def peak_dbfs(wave: np.ndarray) -> float:
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    return 20.0 * math.log10(peak) if peak > 0 else -math.inf


def check_audio_samples(wave: np.ndarray, what: str, *, allow_silence: bool = True) -> None:
    """Refuse empty, non-finite or (optionally) silent audio with an actionable message."""
    if wave.size == 0:
        raise UserFacingError(f"{what} has no audio samples (zero length); pass audio that contains sound")
    finite = np.isfinite(wave)
    if not finite.all():
        bad = int(wave.size - finite.sum())
        raise UserFacingError(
            f"{what} contains {bad} NaN/infinite samples; the audio was corrupted by an earlier step "
            "(e.g. a division by zero in a gain node) - fix or replace it"
        )
    if not allow_silence and peak_dbfs(wave) < SILENCE_PEAK_DBFS:
        raise UserFacingError(
            f"{what} is silent (peak {peak_dbfs(wave):.0f} dBFS); there is no speech to lip-sync - "
            "check the file, its volume, or that the right track was chosen"
        )


def check_speech_audio(wave: np.ndarray, what: str) -> list[str]:
    """The one check of driving speech, shared by ``probe``, ``render`` and Encode Speech.

    Empty (a header-only file) or NaN/infinite audio is refused with a ``UserFacingError``.
    Silence is accepted, since a closed-mouth take is a real use, and comes back as a one-line
    warning; callers print or log it."""
    check_audio_samples(wave, what)
    peak = peak_dbfs(wave)
    if peak < SILENCE_PEAK_DBFS:
        level = "all samples are zero" if peak == -math.inf else f"peak {peak:.0f} dBFS"
        return [f"{what} is silent ({level}): the avatar's mouth will stay closed; if it should speak, check the "
                "file, its volume, or that the right track was chosen"]
    return []


# FFmpeg's default channel layout for a channel count (ComfyUI AUDIO dicts carry only the count).
_DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


class _MonoMixer:
    """Planar audio frames of one layout -> mono float32.

    Mono and stereo are averaged (what ComfyUI and librosa do, so a file and an AUDIO dict of the
    same sound agree). More channels go through swresample, which knows the channel roles
    (centre speech kept, LFE dropped); averaging would bury dialogue under the surrounds.
    """

    def __init__(self, layout: str, channels: int, rate: int):
        self.channels = channels
        if channels <= 2:
            self._resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        else:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)

    def _mix(self, frames) -> list[np.ndarray]:
        out = []
        for frame in frames:
            planes = frame.to_ndarray()
            out.append(planes.mean(axis=0) if self.channels <= 2 else planes.reshape(-1))
        return out

    def push(self, frame) -> list[np.ndarray]:
        return self._mix(self._resampler.resample(frame))

    def flush(self) -> list[np.ndarray]:
        return self._mix(self._resampler.resample(None))


def planar_to_mono(planes: np.ndarray, rate: int) -> np.ndarray:
    """[C,S] float samples -> mono float32 with the same mixing rule as decoded files."""
    channels = planes.shape[0]
    if channels == 1:
        return planes[0].astype(np.float32)
    if channels == 2:
        return planes.mean(axis=0).astype(np.float32)
    layout = _DEFAULT_LAYOUTS.get(channels)
    if layout is None:
        return planes.mean(axis=0).astype(np.float32)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes, dtype=np.float32), format="fltp", layout=layout)
    frame.sample_rate = rate
    mixer = _MonoMixer(layout, channels, rate)
    chunks = mixer.push(frame) + mixer.flush()
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def decode_audio_stream(container, stream, *, from_s: float | None = None) -> tuple[np.ndarray, int, float]:
    """Decode one audio stream to mono float32 at its native rate.

    Returns (samples, sample_rate, start_s) where start_s is the stream time of the first sample,
    so callers can align the audio with video. ``from_s`` seeks close to (before) that time first.
    The tail is cut at the stream's declared end: AAC decoders emit whole 1024-sample frames, so
    without this a clip grows by up to 64 ms at 16 kHz.
    """
    context = stream.codec_context
    rate = int(stream.rate or context.sample_rate or 0)
    if rate <= 0:
        raise UserFacingError("the audio stream has no sample rate; re-encode it (e.g. ffmpeg -i in -ar 16000 out.wav)")
    channels = int(context.channels or 0) or 1
    # Mono/stereo by count: some files carry unnamed layouts ("2 channels") swresample refuses.
    if channels <= 2 or context.layout is None:
        layout = _DEFAULT_LAYOUTS.get(channels, "mono")
    else:
        layout = context.layout.name
    mixer = _MonoMixer(layout, channels, rate)
    if from_s is not None and from_s > 1.0:
        # Seek a little early: the first packet after a seek may start after the requested time.
        container.seek(int(max(0.0, from_s - 0.5) / stream.time_base), stream=stream, backward=True)
    chunks: list[np.ndarray] = []
    first_time: float | None = None
    for frame in container.decode(stream):
        if first_time is None:
            first_time = float(frame.time) if frame.time is not None else 0.0
        chunks.extend(mixer.push(frame))
    chunks.extend(mixer.flush())
    wave = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    first_time = first_time or 0.0
    if stream.duration and stream.time_base:
        stream_end_s = float(((stream.start_time or 0) + stream.duration) * stream.time_base)
        keep = int(round((stream_end_s - first_time) * rate))
        if 0 < keep < wave.shape[0]:
            wave = wave[:keep]
    return wave, rate, first_time


def load_speech(
    source,
    *,
    sample_rate: int = SPEECH_SAMPLE_RATE,
    duration_s: float | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(mono float32 samples at ``sample_rate``, warnings) from a file path or ``(samples, rate)``
    already in memory (mono float32; the nodes convert ComfyUI's AUDIO with nodes.comfy_types).

    ``duration_s`` trims or pads (with silence) to exactly round(duration_s * sample_rate)
    samples. The result passes ``check_speech_audio``: empty or non-finite audio is refused,
    silence is only a warning.
    """
    if isinstance(source, tuple):
        wave, source_rate = np.asarray(source[0], np.float32), source[1]
        if wave.ndim != 1:
            raise UserFacingError(f"in-memory audio must be mono samples [S], got shape {wave.shape}")
        if not isinstance(source_rate, (int, np.integer)) or source_rate <= 0:
            raise UserFacingError(f"the AUDIO input's sample_rate must be a positive whole number of samples per second, got {source_rate}")
        source_rate = int(source_rate)
        what = "the AUDIO input"
        check_audio_samples(wave, what)
    else:
        path = resolve_input_path(source)
        what = f"audio of {path.name}"
        try:
            with av.open(str(path)) as container:
                if not container.streams.audio:
                    raise UserFacingError(
                        f"{path.name} has no audio track; pass a file with speech (wav/mp3/flac/m4a/ogg) "
                        "or a video whose own audio should drive the avatar"
                    )
                wave, source_rate, _ = decode_audio_stream(container, container.streams.audio[0])
        except UserFacingError:
            raise
        except (FFmpegError, OSError, ValueError, EOFError) as error:
            raise UserFacingError(
                f"cannot decode audio from {path.name} ({error.__class__.__name__}: {error}); the file is damaged "
                "or not audio - re-export it as wav/mp3/flac"
            ) from None
        check_audio_samples(wave, what)
    wave = resample_audio(wave, source_rate, sample_rate)
    if duration_s is not None:
        if not math.isfinite(duration_s) or duration_s <= 0:
            raise UserFacingError(f"duration must be a positive number of seconds, got {duration_s}")
        wave = fit_to_length(wave, int(round(duration_s * sample_rate)))
    return wave, check_speech_audio(wave, what)


def load_audio(
    source,
    *,
    sample_rate: int = SPEECH_SAMPLE_RATE,
    duration_s: float | None = None,
    allow_silence: bool = True,
) -> np.ndarray:
    """Mono float32 samples at ``sample_rate`` from a file path or ``(samples, rate)`` in memory.

    ``load_speech`` with its warnings logged (logger ``sparse-avatar``; the CLI prints them as
    ``warning: ...``). ``allow_silence=False`` turns the silence warning into an error.
    """
    wave, warnings = load_speech(source, sample_rate=sample_rate, duration_s=duration_s)
    if warnings and not allow_silence:
        check_audio_samples(wave, "the AUDIO input" if isinstance(source, tuple) else f"audio of {Path(str(source)).name}",
                            allow_silence=False)
    for warning in warnings:
        logger.warning(warning)
    return wave



def write_wav(path, wave: np.ndarray, sample_rate: int = SPEECH_SAMPLE_RATE) -> Path:
    """Mono float samples in -1..1 -> 16-bit PCM .wav, written atomically. Returns the path."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if not np.isfinite(wave).all():
        raise UserFacingError("the audio to write contains NaN/infinite samples; check the step that produced it")
    final_path = Path(path).expanduser().resolve()
    if final_path.suffix.lower() != ".wav":
        raise UserFacingError(f"output must be a .wav file, got {final_path.name}")
    final_path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = atomic_temp_path(final_path)
    try:
        with wave_file.open(str(temp_path), "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(int(sample_rate))
            writer.writeframes(np.round(np.clip(wave, -1.0, 1.0) * 32767).astype("<i2").tobytes())
        os.replace(temp_path, final_path)
    finally:
        if temp_path.exists():
            temp_path.unlink()
    return final_path
