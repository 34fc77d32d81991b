"""Speech features: one vector per frame at any fps, fixed normalisation, the encoder bridge."""
from __future__ import annotations

import numpy as np
import pytest

from sparse_avatar.errors import UserFacingError
from sparse_avatar.media.features import (
    N_MELS,
    SPEECH_FEATURE_DIM,
    SUB_STEPS,
    encoder_output_to_frame_features,
    speech_features,
)

SR = 16000


def _chirp(duration_s: float, sample_rate: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(duration_s * sample_rate))) / sample_rate
    wave = 0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t) + 0.05 * rng.standard_normal(t.size)
    return wave.astype(np.float32)


@pytest.mark.parametrize("fps", [1, 24, 25, 29.97, 30, 60, 120])
@pytest.mark.parametrize("duration_s", [0.37, 1.0, 3.3])
def test_one_feature_vector_per_frame(fps, duration_s):
    expected = round(duration_s * fps)
    if expected == 0:
        with pytest.raises(UserFacingError, match="shorter than half a frame"):
            speech_features(_chirp(duration_s), SR, fps)
        return
    features = speech_features(_chirp(duration_s), SR, fps)
    assert features.shape == (expected, SPEECH_FEATURE_DIM)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()
    assert features.min() >= -1.0 and features.max() <= 1.0


def test_feature_dim_is_sub_steps_times_mels():
    assert SPEECH_FEATURE_DIM == SUB_STEPS * N_MELS == 160


def test_explicit_n_frames_pads_with_silence_and_trims():
    wave = _chirp(1.0)
    longer = speech_features(wave, SR, 25, n_frames=50)
    assert longer.shape == (50, SPEECH_FEATURE_DIM)
    # Past the audio (plus the analysis window) the features are digital silence: the floor.
    assert np.all(longer[30:] == -1.0)
    shorter = speech_features(wave, SR, 25, n_frames=10)
    full = speech_features(wave, SR, 25)
    np.testing.assert_allclose(shorter, full[:10], atol=1e-5)


def test_deterministic_and_streaming_friendly():
    wave = _chirp(2.0, seed=3)
    first = speech_features(wave, SR, 30)
    np.testing.assert_array_equal(first, speech_features(wave.copy(), SR, 30))
    # Fixed dB range, no per-clip statistics: the features of the first second do not depend on
    # whether the clip goes on (only the last frame sees the cut through its analysis window).
    head = speech_features(wave[:SR], SR, 30)
    np.testing.assert_allclose(head[:-1], first[: len(head) - 1], atol=1e-5)


def test_louder_audio_gives_larger_features():
    wave = _chirp(1.0)
    quiet = speech_features(wave * 0.1, SR, 25)
    loud = speech_features(wave, SR, 25)
    # 20 dB louder = +20/110 * 2 in normalised units where nothing is clipped.
    unclipped = (quiet > -1) & (loud < 1)
    np.testing.assert_allclose((loud - quiet)[unclipped], 2 * 20 / 110, atol=2e-3)


def test_frame_i_sees_the_audio_of_its_own_interval():
    fps = 25
    wave = np.zeros(SR * 2, np.float32)
    burst_frame = 20  # [0.8 s, 0.84 s)
    start, stop = int(burst_frame / fps * SR), int((burst_frame + 1) / fps * SR)
    wave[start:stop] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(stop - start) / SR)
    energy = speech_features(wave, SR, fps).mean(axis=1)
    assert int(energy.argmax()) == burst_frame
    assert energy[burst_frame - 3] == energy[burst_frame + 3] == -1.0


def test_other_sample_rates_match_16k():
    t = np.arange(SR) / SR
    tone16 = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    t48 = np.arange(48000) / 48000
    tone48 = (0.3 * np.sin(2 * np.pi * 440 * t48)).astype(np.float32)
    a, b = speech_features(tone16, SR, 25), speech_features(tone48, 48000, 25)
    assert a.shape == b.shape
    assert np.abs(a[2:-2] - b[2:-2]).max() < 0.03


def test_stereo_channels_first_is_mixed_down():
    mono = _chirp(1.0)
    stereo = np.stack([mono, mono])
    np.testing.assert_allclose(speech_features(stereo, SR, 25), speech_features(mono, SR, 25), atol=1e-6)


@pytest.mark.parametrize(
    "wave, fps, match",
    [
        (np.zeros(0, np.float32), 25, "empty"),
        (np.array([0.1, np.nan] * 800, np.float32), 25, "NaN"),
        (np.array([0.1, np.inf] * 800, np.float32), 25, "NaN or infinite"),
        (np.zeros((3, 4, 5), np.float32), 25, "mono"),
        (np.zeros(1600, np.float32), 0, "fps"),
        (np.zeros(1600, np.float32), float("nan"), "fps"),
    ],
)
def test_bad_audio_is_a_user_facing_error(wave, fps, match):
    with pytest.raises(UserFacingError, match=match):
        speech_features(wave, SR, fps)


@pytest.mark.parametrize("n_frames", [0, -3, 2.5, "ten", True])
def test_bad_frame_count(n_frames):
    with pytest.raises(UserFacingError, match="n_frames"):
        speech_features(_chirp(1.0), SR, 25, n_frames=n_frames)
    with pytest.raises(UserFacingError, match="n_frames"):
        encoder_output_to_frame_features(_encoder_output(), 25, n_frames)


@pytest.mark.parametrize("sample_rate", [0, -16000, 44.1, "16k", None])
def test_bad_sample_rate(sample_rate):
    with pytest.raises(UserFacingError, match="sample_rate"):
        speech_features(_chirp(1.0), sample_rate, 25)


def test_too_short_audio_is_an_error():
    with pytest.raises(UserFacingError, match="shorter than half a frame"):
        speech_features(np.zeros(100, np.float32), SR, 25)


def _encoder_output(n_steps=100, dim=8, n_layers=3):
    base = np.arange(n_steps, dtype=np.float32)[None, :, None] * np.ones((1, 1, dim), np.float32)
    layers = [base + 1000 * layer for layer in range(n_layers)]
    return {"encoded_audio": layers[-1], "encoded_audio_all_layers": layers, "audio_samples": n_steps * 320}


def test_bridge_shapes_and_linear_interpolation():
    output = _encoder_output()  # 100 steps at 50 Hz = 2 s
    features = encoder_output_to_frame_features(output, 25, 50)
    assert features.shape == (50, 8) and features.dtype == np.float32
    # Frame i centre (i+0.5)/25 s = encoder position 2i+0.5 -> value 2i + 0.5 (+ 2000 last layer).
    np.testing.assert_allclose(features[:, 0], 2000 + 2 * np.arange(50) + 0.5, atol=1e-4)
    at_30 = encoder_output_to_frame_features(output, 29.97, 60)
    assert at_30.shape == (60, 8)
    assert np.all(np.diff(at_30[:, 0]) > 0)


def test_bridge_layer_choice_concatenates_and_holds_ends():
    output = _encoder_output()
    features = encoder_output_to_frame_features(output, 25, 60, layers=[0, 1])
    assert features.shape == (60, 16)
    np.testing.assert_allclose(features[:, 8] - features[:, 0], 1000, atol=1e-3)
    # 60 frames at 25 fps = 2.4 s > 2 s of encoder output: the last value is held.
    assert features[-1, 0] == features[-5, 0] == 99


def test_bridge_accepts_torch_tensors_and_2d():
    torch = pytest.importorskip("torch")
    output = {"encoded_audio": torch.arange(50, dtype=torch.float32).reshape(50, 1)}
    features = encoder_output_to_frame_features(output, 50, 50)
    np.testing.assert_allclose(features[:, 0], np.arange(50), atol=1e-5)


@pytest.mark.parametrize(
    "output, kwargs, match",
    [
        ([1, 2, 3], {}, "AUDIO_ENCODER_OUTPUT"),
        ({"something": 1}, {}, "encoded_audio"),
        ({"encoded_audio": np.zeros((1, 10, 4))}, {"layers": 2}, "encoded_audio_all_layers"),
        (_encoder_output(n_layers=2), {"layers": 5}, "does not exist"),
        (_encoder_output(), {"batch_index": 1}, "out of range"),
        ({"encoded_audio": np.full((1, 10, 4), np.nan)}, {}, "NaN"),
    ],
)
def test_bridge_bad_input(output, kwargs, match):
    with pytest.raises(UserFacingError, match=match):
        encoder_output_to_frame_features(output, 25, 10, **kwargs)


@pytest.mark.parametrize("fps", [25, 29.97, 60, 150])
def test_vectorised_pooling_matches_a_plain_loop(fps):
    """The prefix-sum pooling against the definition: for each sub-step, average the power of
    the 5 ms mel frames centred inside it (or take the nearest one), then the fixed dB map."""
    import librosa

    wave = _chirp(0.9, seed=7)
    n_frames = round(0.9 * fps)
    features = speech_features(wave, SR, fps)
    padded = np.pad(wave, (0, 4000))[: int(np.ceil(n_frames / fps * SR)) + 80 + 256]
    mel = librosa.feature.melspectrogram(
        y=padded, sr=SR, n_fft=512, win_length=400, hop_length=80, n_mels=80, fmin=0.0, fmax=8000, center=True,
        pad_mode="constant", power=2.0,
    ).T
    centres_s = np.arange(len(mel)) * 80 / SR
    expected = np.zeros((n_frames, SUB_STEPS, N_MELS))
    for frame in range(n_frames):
        for sub in range(SUB_STEPS):
            start = (frame + sub / SUB_STEPS) / fps
            stop = (frame + (sub + 1) / SUB_STEPS) / fps
            inside = (centres_s >= start - 1e-9) & (centres_s < stop - 1e-9)
            power = mel[inside].mean(axis=0) if inside.any() else mel[int(np.argmin(np.abs(centres_s - (start + stop) / 2)))]
            decibels = 10 * np.log10(np.maximum(power, 1e-8))
            expected[frame, sub] = (np.clip(decibels, -80, 30) + 80) / 110 * 2 - 1
    np.testing.assert_allclose(features, expected.reshape(n_frames, -1), atol=2e-4)
