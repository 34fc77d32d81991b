"""Evaluation helpers for the person benchmark (face-quality metrics). Never imports ComfyUI.

mediapipe / dlib are optional: ``pip install "sparse-avatar[person-eval]"``.
"""
from .face_metrics import (
    DLIB_SAME_PERSON_THRESHOLD,
    MOUTH_LANDMARKS,
    MissingPersonEvalDependency,
    available,
    blink_count,
    blink_rate,
    correlation,
    embedding_distance,
    eye_aspect_ratio,
    face_landmarks,
    head_motion,
    identity_distance,
    identity_embeddings,
    landmark_distance,
    mouth_aperture,
    psnr,
    ssim,
    ssim_map,
)

__all__ = [
    "DLIB_SAME_PERSON_THRESHOLD",
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
