"""Speech for Avatar World (espeak-ng) and the fixed, documented audio -> mouth function.

The mouth function (``audio_mouth_track``) is the contract that makes lip sync learnable and
checkable. For output frame ``i`` at ``fps`` it looks at a Hann window of 80 ms of 16 kHz audio
centred on ``t = i / fps`` (zero-padded at the ends) and computes:

* **openness** (0 closed … 1 fully open) from loudness:
  ``clip((20*log10(rms + 1e-8) - OPEN_FLOOR_DB) / OPEN_RANGE_DB, 0, 1)`` with floor -45 dBFS and a
  35 dB range (speech is peak-normalised to 0.9 before this);
* **width** (0 narrow … 1 wide) from the spectral centroid of 100–5000 Hz:
  ``clip((centroid_hz - 400) / 1600, 0, 1)`` ("ee"/"s" are bright and wide, "oo" is dark);
* **rounding** (0 spread … 1 rounded) from the share of 100–5000 Hz energy below 800 Hz:
  ``clip((low_share - 0.45) / 0.45, 0, 1)``.

A person's habits then shape it (``render.motion_track``): openness is smoothed with a zero-phase
Gaussian (sigma from ``mouth_speed``, so no lag is introduced) and scaled by ``mouth_gain``.
Stressed syllables (used for nods and brow raises) are the loud local maxima of the loudness
envelope: at least 6 dB above the clip's median voiced loudness and at least 0.25 s apart.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass

import numpy as np
from scipy.signal import resample_poly

from ..errors import UserFacingError
from .traits import derive_seed

SAMPLE_RATE = 16000
OPEN_FLOOR_DB = -45.0
OPEN_RANGE_DB = 35.0
_WINDOW_S = 0.08

# espeak-ng voices: a few languages (their phonology changes rhythm and formants) × variants.
VOICE_LANGUAGES = ("en-us", "en", "en-gb-scotland", "de", "es", "fr", "it", "pt", "nl")
VOICE_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5", "croak")

_WORDS = (
    "time people year way day thing man world life hand part child eye woman place work week case "
    "point number group problem fact water river morning evening window garden market music story "
    "paper money table station mountain letter summer winter yellow orange purple simple quiet "
    "happy early later never always often maybe really little better open closed bright heavy "
    "make know think take see come want look use find give tell ask seem feel try leave call keep "
    "begin show hear play run move live believe bring happen write provide sit stand lose pay meet "
    "include continue learn change lead understand watch follow stop create speak read spend grow "
    "walk win offer remember love consider appear buy wait serve die send expect build stay fall "
    "oh you too blue moon food who zoo boot new view see me tea key free tree three each she we"
).split()


@dataclass(frozen=True)
class VoiceSpec:
    voice: str           # espeak-ng voice name, e.g. "en-us+f3"
    words_per_minute: int
    pitch: int           # 0 … 99
    word_gap_10ms: int   # extra pause between words, in 10 ms units (espeak-ng -g)
    pause_s: tuple       # (min, max) silence between utterances

    @classmethod
    def from_seed(cls, voice_seed: int) -> "VoiceSpec":
        rng = np.random.default_rng(derive_seed(voice_seed, "voice"))
        return cls(
            voice=f"{rng.choice(VOICE_LANGUAGES)}+{rng.choice(VOICE_VARIANTS)}",
            words_per_minute=int(rng.integers(120, 200)),
            pitch=int(rng.integers(20, 80)),
            word_gap_10ms=int(rng.integers(0, 6)),
            pause_s=(float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.4, 0.9))),
        )


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise UserFacingError(
            "espeak-ng is not installed, and Avatar World needs it to synthesise speech. "
            "Install it (Debian/Ubuntu: `apt-get install -y espeak-ng`, macOS: `brew install espeak-ng`) "
            "and run again.")
    return path


def espeak_version() -> str:
    """e.g. "1.51"; recorded with evaluation results because speech (and so the suite's driving
    audio) can change between espeak-ng versions."""
    result = subprocess.run([espeak_binary(), "--version"], capture_output=True, text=True, timeout=30)
    words = result.stdout.split()
    return words[words.index("text-to-speech:") + 1] if "text-to-speech:" in words else result.stdout.strip()


def _espeak_wave(text: str, spec: VoiceSpec) -> np.ndarray:
    """One utterance as float32 mono at SAMPLE_RATE."""
    with tempfile.TemporaryDirectory(prefix="avatar_world_speech_") as folder:
        wav_path = os.path.join(folder, "utterance.wav")
        command = [espeak_binary(), "-v", spec.voice, "-s", str(spec.words_per_minute), "-p", str(spec.pitch),
                   "-g", str(spec.word_gap_10ms), "-w", wav_path, text]
        try:
            subprocess.run(command, capture_output=True, check=True, timeout=60)
        except subprocess.CalledProcessError as error:
            raise UserFacingError(
                f"espeak-ng failed for voice {spec.voice!r}: {error.stderr.decode(errors='replace').strip()}; "
                "check that the espeak-ng data for this language is installed (package espeak-ng-data).") from error
        if not os.path.isfile(wav_path):
            raise UserFacingError(f"espeak-ng wrote no audio for voice {spec.voice!r}; check `espeak-ng -v {spec.voice} hello` "
                                  "works on this machine (reinstall espeak-ng and espeak-ng-data if not).")
        with wave.open(wav_path) as reader:
            rate, width, channels = reader.getframerate(), reader.getsampwidth(), reader.getnchannels()
            raw = reader.readframes(reader.getnframes())
    if width != 2:
        raise UserFacingError(f"espeak-ng produced {8 * width}-bit audio; expected 16-bit PCM. Reinstall espeak-ng.")
    audio = np.frombuffer(raw, dtype="<i2").astype(np.float32).reshape(-1, channels).mean(axis=1) / 32768.0
    divisor = np.gcd(SAMPLE_RATE, rate)
    return resample_poly(audio, SAMPLE_RATE // divisor, rate // divisor).astype(np.float32)


def random_text(rng: np.random.Generator, n_words: int) -> str:
    words = list(rng.choice(_WORDS, size=n_words))
    # Commas and full stops make espeak-ng pause inside an utterance too.
    for index in range(3, len(words) - 1, int(rng.integers(3, 7))):
        words[index] += str(rng.choice([",", ".", ""]))
    return " ".join(words).capitalize() + "."


def synthesize_speech(voice_seed: int, text_seed: int, seconds: float) -> tuple[np.ndarray, dict]:
    """Exactly ``seconds`` of speech (float32 mono, 16 kHz, peak 0.9) and a description of it.

    Utterances of random words are joined with random pauses until the duration is filled, then
    trimmed; the first 0.1–0.4 s is silence so every clip starts with a closed mouth.
    """
    spec = VoiceSpec.from_seed(voice_seed)
    rng = np.random.default_rng(derive_seed(text_seed, "text"))
    target = int(round(seconds * SAMPLE_RATE))
    pieces = [np.zeros(int(rng.uniform(0.1, 0.4) * SAMPLE_RATE), np.float32)]
    texts = []
    filled = len(pieces[0])
    while filled < target:
        text = random_text(rng, int(rng.integers(4, 12)))
        utterance = _espeak_wave(text, spec)
        pause = np.zeros(int(rng.uniform(*spec.pause_s) * SAMPLE_RATE), np.float32)
        pieces += [utterance, pause]
        texts.append(text)
        filled += len(utterance) + len(pause)
    audio = np.concatenate(pieces)[:target]
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 0:
        audio = audio * (0.9 / peak)
    meta = {"voice": spec.voice, "words_per_minute": spec.words_per_minute, "pitch": spec.pitch,
            "word_gap_10ms": spec.word_gap_10ms, "texts": texts, "voice_seed": voice_seed, "text_seed": text_seed}
    return audio.astype(np.float32), meta


@dataclass(frozen=True)
class MouthTrack:
    """Per-frame outputs of the documented audio -> mouth function (all in 0 … 1)."""
    openness: np.ndarray
    width: np.ndarray
    rounding: np.ndarray
    loudness_db: np.ndarray


def _frame_windows(wave_16k: np.ndarray, fps: float, n_frames: int) -> np.ndarray:
    window = int(round(_WINDOW_S * SAMPLE_RATE))
    half = window // 2
    # Audio shorter than the frames asked for reads as silence at the end.
    needed = int(np.ceil(n_frames * SAMPLE_RATE / fps)) + window
    wave_16k = np.asarray(wave_16k, np.float32)
    padded = np.pad(wave_16k, (half, half + window + max(0, needed - len(wave_16k))))
    starts = np.round(np.arange(n_frames) * SAMPLE_RATE / fps).astype(np.int64)
    index = starts[:, None] + np.arange(window)[None, :]
    return padded[index] * np.hanning(window).astype(np.float32)[None, :]


def audio_mouth_track(wave_16k: np.ndarray, fps: float, n_frames: int | None = None) -> MouthTrack:
    """The fixed audio -> mouth function described in this module's docstring."""
    wave_16k = np.asarray(wave_16k, dtype=np.float32)
    if n_frames is None:
        n_frames = int(round(len(wave_16k) / SAMPLE_RATE * fps))
    windows = _frame_windows(wave_16k, fps, n_frames)
    # RMS of the windowed signal, normalised by the window's own RMS so a constant tone of
    # amplitude A reads as A/sqrt(2) whatever the window.
    window_rms = np.sqrt(np.mean(np.hanning(windows.shape[1]) ** 2))
    rms = np.sqrt(np.mean(windows.astype(np.float64) ** 2, axis=1)) / window_rms
    loudness_db = 20 * np.log10(rms + 1e-8)
    openness = np.clip((loudness_db - OPEN_FLOOR_DB) / OPEN_RANGE_DB, 0, 1)
    spectrum = np.abs(np.fft.rfft(windows, axis=1)) ** 2
    freqs = np.fft.rfftfreq(windows.shape[1], 1 / SAMPLE_RATE)
    band = (freqs >= 100) & (freqs <= 5000)
    energy = spectrum[:, band].sum(axis=1) + 1e-12
    centroid = (spectrum[:, band] * freqs[band]).sum(axis=1) / energy
    low_share = spectrum[:, band & (freqs < 800)].sum(axis=1) / energy
    width = np.clip((centroid - 400) / 1600, 0, 1)
    rounding = np.clip((low_share - 0.45) / 0.45, 0, 1)
    # Silence has no meaningful spectral shape: rest position there.
    silent = openness <= 0
    width[silent], rounding[silent] = 0.5, 0.0
    return MouthTrack(openness.astype(np.float32), width.astype(np.float32), rounding.astype(np.float32),
                      loudness_db.astype(np.float32))


def stressed_frames(track: MouthTrack, fps: float) -> np.ndarray:
    """Frame indices of stressed syllables: loud local maxima (see module docstring)."""
    loud = track.loudness_db
    voiced = loud[track.openness > 0.05]
    if voiced.size == 0:
        return np.zeros(0, np.int64)
    threshold = float(np.median(voiced)) + 6.0
    spacing = max(1, int(round(0.25 * fps)))
    picks = []
    for index in np.argsort(-loud):
        if loud[index] < threshold:
            break
        lo, hi = max(0, index - spacing), index + spacing + 1
        if loud[index] >= loud[lo:hi].max() and all(abs(index - p) >= spacing for p in picks):
            picks.append(int(index))
    return np.sort(np.asarray(picks, np.int64))
