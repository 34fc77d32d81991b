"""Evaluation helpers for the person benchmark (face-quality metrics). Never imports ComfyUI.

mediapipe / dlib are optional: ``pip install "sparse-avatar[person-eval]"``.
"""
from . import face_metrics
from .face_metrics import *  # noqa: F401,F403  (the public names are face_metrics.__all__, listed once there)

__all__ = list(face_metrics.__all__)
