"""evaluation.face_metrics: known-answer pixel metrics, synthetic landmark maths, and mediapipe / dlib
on real faces from the licensed clips in ../shared/media (read in place, never copied).

The real-face tests need the person-eval extra (pip install "sparse-avatar[person-eval]") and skip
without it or without the clips.
"""
from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest

from sparse_avatar.evaluation import face_metrics as fm

MAN, WOMAN = "v07_infinitetalk_ref_man_15s.mp4", "v13_retalking_face4_woman_7s.mp4"
N_FRAMES = 16


# ------------------------------------------------------------------------------------------------
# pixel metrics


def _random_frames(seed=0, shape=(3, 64, 64, 3)):
    return np.random.default_rng(seed).integers(30, 226, size=shape, dtype=np.uint8)


def test_psnr_and_ssim_of_identical_frames():
    frames = _random_frames()
    assert fm.psnr(frames, frames) == float("inf")
    assert fm.ssim(frames, frames) == pytest.approx(1.0, abs=1e-12)
    mask = np.zeros(frames.shape[1:3])
    mask[10:30, 5:50] = 1
    assert fm.psnr(frames, frames, mask=mask) == float("inf")
    assert fm.ssim(frames, frames, mask=mask) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_noise_level_is_analytical():
    frames = _random_frames(shape=(4, 128, 128, 3))
    # +-5 on every value (random sign): MSE is exactly 25 -> 10 log10(255^2 / 25) dB.
    signs = np.random.default_rng(1).choice([-5, 5], size=frames.shape)
    noisy = (frames.astype(np.int16) + signs).astype(np.uint8)
    assert fm.psnr(frames, noisy) == pytest.approx(10 * math.log10(255.0**2 / 25.0), abs=1e-9)
    # Gaussian noise of sigma 8 (values kept clear of clipping): PSNR ~ 20 log10(255 / 8).
    gaussian = np.clip(np.round(frames + np.random.default_rng(2).normal(0, 8, frames.shape)), 0, 255).astype(np.uint8)
    assert fm.psnr(frames, gaussian) == pytest.approx(20 * math.log10(255.0 / 8.0), abs=0.1)
    assert 0.0 < fm.ssim(frames, gaussian) < 1.0


def test_mask_restricts_psnr_and_ssim_to_the_region():
    frames = _random_frames(shape=(2, 96, 96, 3))
    damaged = frames.copy()
    damaged[:, 60:] = 255 - damaged[:, 60:]  # ruin the bottom rows only
    top = np.zeros((96, 96))
    top[:40] = 1.0  # far (> the 5 px SSIM window radius) from the damage
    bottom = 1.0 - top
    assert fm.psnr(frames, damaged, mask=top) == float("inf")
    assert fm.ssim(frames, damaged, mask=top) == pytest.approx(1.0, abs=1e-12)
    assert fm.psnr(frames, damaged, mask=bottom) < fm.psnr(frames, damaged) < 60
    assert fm.ssim(frames, damaged, mask=bottom) < fm.ssim(frames, damaged) < 1.0
    # Masked MSE is over the masked pixels only: exactly the bottom-rows MSE.
    difference = frames[:, 40:].astype(np.float64) - damaged[:, 40:]
    assert fm.psnr(frames, damaged, mask=bottom) == pytest.approx(10 * math.log10(255.0**2 / np.mean(difference**2)))


def test_ssim_uses_an_11x11_window():
    # A single changed pixel only affects SSIM within the 5 px window radius.
    frames = np.full((1, 41, 41, 3), 100, np.uint8)
    changed = frames.copy()
    changed[0, 20, 20] = 200
    values = fm.ssim_map(frames, changed)[0]
    assert values[20, 20] < 1.0 and values[15, 20] < 1.0 and values[20, 25] < 1.0
    assert values[14, 20] == pytest.approx(1.0) and values[20, 26] == pytest.approx(1.0)


def test_pixel_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        fm.psnr(_random_frames(shape=(2, 8, 8, 3)), _random_frames(shape=(2, 8, 9, 3)))
    with pytest.raises(ValueError, match="mask"):
        fm.ssim(_random_frames(shape=(2, 16, 16, 3)), _random_frames(shape=(2, 16, 16, 3)), mask=np.ones((8, 8)))


# ------------------------------------------------------------------------------------------------
# landmark maths on synthetic landmarks


def _synthetic_landmarks(n_frames=50, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(50, 200, size=(fm.N_LANDMARKS, 2))
    return np.repeat(base[None], n_frames, axis=0).astype(np.float32)


def test_landmark_distance_ignores_translation_and_skips_nan_frames():
    a = _synthetic_landmarks(10)
    b = a + np.array([7.0, -3.0], np.float32)  # the whole face moved: no mouth-shape change
    assert fm.landmark_distance(a, b) == pytest.approx(0.0, abs=1e-4)
    c = a.copy()
    c[:, fm.MOUTH_LANDMARKS, 1] *= 1.1  # mouth shape changed
    assert fm.landmark_distance(a, c) > 1.0
    c[3] = np.nan
    assert np.isfinite(fm.landmark_distance(a, c))
    assert math.isnan(fm.landmark_distance(np.full_like(a, np.nan), a))


def test_correlation():
    x = np.sin(np.linspace(0, 6, 40))
    assert fm.correlation(x, x) == pytest.approx(1.0)
    assert fm.correlation(x, -2 * x + 3) == pytest.approx(-1.0)
    y = x.copy()
    y[5] = np.nan
    assert fm.correlation(x, y) == pytest.approx(1.0)
    assert math.isnan(fm.correlation(x, np.ones_like(x)))


def test_blink_rate_counts_each_dip_once():
    landmarks = _synthetic_landmarks(250)  # 10 s at 25 fps
    upper_lids, lower_lids = (160, 158, 385, 387), (144, 153, 380, 373)
    for frame in range(250):
        landmarks[frame, [33, 362], :] = [[100, 100], [160, 100]]
        landmarks[frame, [133, 263], :] = [[130, 100], [190, 100]]
        opening = 4.0 if frame in (30, 31, 32, 100, 180, 181) else 9.0  # three dips (3, 1, 2 frames)
        landmarks[frame, [160, 144], 0], landmarks[frame, [158, 153], 0] = 110, 120  # right eye lid columns
        landmarks[frame, [385, 380], 0], landmarks[frame, [387, 373], 0] = 170, 180  # left eye lid columns
        landmarks[frame, list(upper_lids), 1] = 100 - opening / 2
        landmarks[frame, list(lower_lids), 1] = 100 + opening / 2
    ear = fm.eye_aspect_ratio(landmarks)
    assert ear[0] == pytest.approx(9.0 / 30.0)
    assert fm.blink_count(ear) == 3
    assert fm.blink_rate(landmarks, fps=25) == pytest.approx(3 * 6.0)  # 3 blinks in 10 s
    landmarks[40:60] = np.nan  # frames without a face shorten the duration, do not add dips
    assert fm.blink_rate(landmarks, fps=25) == pytest.approx(3 * 60 * 25 / 230)


def test_head_motion_statistics():
    landmarks = _synthetic_landmarks(100)
    t = np.arange(100)
    landmarks[:, 1, 0] = 120 + 3 * np.sin(t / 5)
    landmarks[:, 1, 1] = 130.0 + 0.5 * t  # drifting down 0.5 px/frame
    roll = np.radians(np.where(t % 2 == 0, 2.0, -2.0))  # alternating +-2 degrees
    landmarks[:, 33] = np.stack([100 - 30 * np.cos(roll), 100 - 30 * np.sin(roll)], axis=1)
    landmarks[:, 263] = np.stack([100 + 30 * np.cos(roll), 100 + 30 * np.sin(roll)], axis=1)
    motion = fm.head_motion(landmarks, fps=25)
    assert motion["nose_std_x_px"] == pytest.approx(np.std(3 * np.sin(t / 5)), rel=1e-4)
    assert motion["nose_std_y_px"] == pytest.approx(np.std(0.5 * t), rel=1e-4)
    assert motion["roll_std_deg"] == pytest.approx(2.0, rel=1e-3)
    assert 0.5 < motion["nose_speed_px_per_frame"] < 0.5 + 0.6
    assert motion["nose_speed_px_per_s"] == pytest.approx(25 * motion["nose_speed_px_per_frame"])
    assert motion["n_frames"] == 100


def test_mouth_aperture_is_scale_free():
    landmarks = _synthetic_landmarks(5)
    assert np.allclose(fm.mouth_aperture(landmarks), fm.mouth_aperture(landmarks * 2.5 + 17), rtol=1e-5)


def test_missing_backends_raise_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    monkeypatch.setitem(sys.modules, "mediapipe.python", None)
    monkeypatch.setitem(sys.modules, "mediapipe.python.solutions", None)
    with pytest.raises(ImportError, match=r"sparse-avatar\[person-eval\]"):
        fm.face_landmarks(np.zeros((1, 32, 32, 3), np.uint8))
    fm._dlib_models.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)
    try:
        with pytest.raises(fm.MissingPersonEvalDependency, match=r"sparse-avatar\[person-eval\]"):
            fm.identity_embeddings(np.zeros((1, 32, 32, 3), np.uint8))
    finally:
        fm._dlib_models.cache_clear()
    assert set(fm.available()) == {"mediapipe", "dlib"}


# ------------------------------------------------------------------------------------------------
# real faces (licensed clips + mediapipe / dlib)

_crops: dict[str, np.ndarray] = {}
_landmarks: dict[str, np.ndarray] = {}


def _face_crops(shared_media_dir, name) -> np.ndarray:
    """The first N_FRAMES 256x256 face crops of a clip, via the project's one crop path."""
    if name not in _crops:
        from sparse_avatar import media
        from sparse_avatar.model.pipeline import reference_face_crops

        path = shared_media_dir / name
        if not path.is_file():
            pytest.skip(f"shared clip {name} not found in {shared_media_dir}")
        reference = media.load_reference_video(path, end_s=1.0)
        crops, _, _ = reference_face_crops(reference, 256, max_frames=N_FRAMES)
        _crops[name] = crops
    return _crops[name]


def _face_landmarks(shared_media_dir, name) -> np.ndarray:
    if name not in _landmarks:
        _landmarks[name] = fm.face_landmarks(_face_crops(shared_media_dir, name))
    return _landmarks[name]


@pytest.fixture
def mediapipe():
    return pytest.importorskip("mediapipe", reason='needs mediapipe: pip install "sparse-avatar[person-eval]"')


@pytest.fixture
def dlib():
    module = pytest.importorskip("dlib", reason='needs dlib: pip install "sparse-avatar[person-eval]"')
    # Not imported: face_recognition_models' __init__ needs pkg_resources, absent from new setuptools.
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip('needs face_recognition_models (the dlib model files): pip install "sparse-avatar[person-eval]"')
    return module


@pytest.mark.media
def test_face_landmarks_on_a_real_face(shared_media_dir, mediapipe):
    crops = _face_crops(shared_media_dir, MAN)
    landmarks = _face_landmarks(shared_media_dir, MAN)
    assert landmarks.shape == (len(crops), 478, 2) and landmarks.dtype == np.float32
    assert np.isfinite(landmarks).all(), "a face on every crop"
    assert (landmarks >= 0).all() and (landmarks < 256).all()
    mouth = landmarks[:, fm.MOUTH_LANDMARKS]
    nose, eyes = landmarks[:, 1], landmarks[:, [33, 263]]
    # Anatomy in image coordinates: eyes above the nose tip above the mouth.
    assert (eyes[..., 1].max(axis=1) < nose[:, 1]).all() and (nose[:, 1] < mouth[..., 1].mean(axis=1)).all()
    assert 0.0 <= np.nanmin(fm.mouth_aperture(landmarks)) and np.nanmax(fm.mouth_aperture(landmarks)) < 1.0
    assert (fm.eye_aspect_ratio(landmarks) > 0.1).all()
    motion = fm.head_motion(landmarks, fps=25)
    assert motion["n_frames"] == len(crops) and motion["nose_std_x_px"] < 20 and motion["roll_std_deg"] < 10
    assert np.isfinite(fm.blink_rate(landmarks, fps=25))


@pytest.mark.media
def test_face_without_a_face_gives_nan_rows(shared_media_dir, mediapipe):
    crops = _face_crops(shared_media_dir, MAN)[:4].copy()
    crops[2] = 0
    landmarks = fm.face_landmarks(crops)
    assert np.isnan(landmarks[2]).all()
    assert np.isfinite(landmarks[[0, 1, 3]]).all()


@pytest.mark.media
def test_lmd_is_zero_for_identical_frames_and_positive_for_a_shifted_mouth(shared_media_dir, mediapipe):
    crops = _face_crops(shared_media_dir, MAN)
    landmarks = _face_landmarks(shared_media_dir, MAN)
    assert fm.landmark_distance(landmarks, landmarks) == 0.0
    # Shift everything below the lips' meeting line (the lower half of the mouth) down by 4 px: the
    # upper lip stays, the lower lip and chin drop 4 px -> each mouth point moves ~2 px relative to
    # the mouth centroid. (Shifting the whole mouth would be a pure translation, which LMD's mean
    # centring ignores on purpose.)
    split = int(round(np.mean((landmarks[:, 13, 1] + landmarks[:, 14, 1]) / 2)))
    shifted = crops.copy()
    shifted[:, split + 4 :] = crops[:, split:-4]
    shifted_landmarks = fm.face_landmarks(shifted)
    lmd = fm.landmark_distance(landmarks, shifted_landmarks)
    assert 0.8 < lmd < 6.0, lmd  # ~1.3 px measured on v07 (mediapipe's mouth model damps the change)
    # The upper face did not move: the LMD over the eyes is only tracking noise (~0.25 px).
    eyes = fm.landmark_distance(landmarks, shifted_landmarks, indices=[33, 133, 362, 263, 159, 145, 386, 374])
    assert eyes < 0.5 * lmd, (eyes, lmd)
    assert np.nanmean(fm.mouth_aperture(shifted_landmarks)) > np.nanmean(fm.mouth_aperture(landmarks))


@pytest.mark.media
def test_mouth_aperture_correlates_with_itself(shared_media_dir, mediapipe):
    aperture = fm.mouth_aperture(_face_landmarks(shared_media_dir, MAN))
    assert aperture.shape == (N_FRAMES,)
    assert aperture.std() > 0, "a talking mouth moves"
    assert fm.correlation(aperture, aperture) == pytest.approx(1.0)


@pytest.mark.media
def test_identity_distance_same_person_below_and_other_person_above_dlib_cutoff(shared_media_dir, dlib):
    man = _face_crops(shared_media_dir, MAN)[::2]  # 8 frames each keeps dlib's ResNet quick on CPU
    woman = _face_crops(shared_media_dir, WOMAN)[::2]
    man_embeddings = fm.identity_embeddings(man)
    woman_embeddings = fm.identity_embeddings(woman)
    assert man_embeddings.shape == (len(man), 128) and np.isfinite(man_embeddings).all()
    half = len(man) // 2
    same = fm.embedding_distance(man_embeddings[:half], man_embeddings[half:])
    other = fm.embedding_distance(man_embeddings, woman_embeddings)
    assert same < fm.DLIB_SAME_PERSON_THRESHOLD < other, (same, other)
    # identity_distance is the same computation on frames.
    assert fm.identity_distance(man[:3], man[half : half + 3]) == pytest.approx(
        fm.embedding_distance(man_embeddings[:3], man_embeddings[half : half + 3]), abs=1e-6
    )


@pytest.mark.media
def test_identity_embeddings_fall_back_to_the_whole_crop(shared_media_dir, dlib, monkeypatch):
    crop = _face_crops(shared_media_dir, MAN)[:1]
    dlib_module, _, predictor, resnet = fm._dlib_models()
    # A detector that finds nothing: the whole crop must be used as the face rectangle.
    monkeypatch.setattr(fm, "_dlib_models", lambda: (dlib_module, lambda image, upsample: [], predictor, resnet))
    embeddings = fm.identity_embeddings(crop)
    frame = np.ascontiguousarray(crop[0])
    whole = dlib_module.rectangle(0, 0, frame.shape[1] - 1, frame.shape[0] - 1)
    expected = np.asarray(resnet.compute_face_descriptor(frame, predictor(frame, whole), 1))
    assert embeddings.shape == (1, 128)
    np.testing.assert_allclose(embeddings[0], expected, atol=1e-6)
