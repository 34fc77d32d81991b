"""Shared test fixtures.

Licensed real clips live in ../shared/media (tests and evaluation only: never copied into the
project). Tests over them skip with a clear reason when the folder is absent.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_MEDIA_DIR = Path(os.environ.get("SPARSE_AVATAR_SHARED_MEDIA", REPO_ROOT.parent / "shared" / "media"))


def shared_media_rows(kind: str | None = None) -> list[dict]:
    """Rows of ../shared/media/manifest.csv (empty when the folder is absent)."""
    manifest = SHARED_MEDIA_DIR / "manifest.csv"
    if not manifest.is_file():
        return []
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row for row in rows if kind is None or row["kind"] == kind]


@pytest.fixture
def shared_media_dir() -> Path:
    if not (SHARED_MEDIA_DIR / "manifest.csv").is_file():
        pytest.skip(f"licensed test clips not found at {SHARED_MEDIA_DIR} (expected ../shared/media beside the checkout)")
    return SHARED_MEDIA_DIR


@pytest.fixture
def espeak() -> str:
    """Path of espeak-ng; skips when it is not installed (CI installs it with apt)."""
    path = shutil.which("espeak-ng")
    if path is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    return path


class CentreFaceDetector:
    """A face detector stand-in (monkeypatched over media.face_track's): one face box in the
    middle of every frame, so node and pipeline tests need no real face."""

    name = "centre"

    def detect(self, frame):
        height, width = frame.shape[:2]
        side = 0.5 * min(height, width)
        return np.array([[width / 2 - side / 2, height / 2 - side / 2, width / 2 + side / 2, height / 2 + side / 2]], np.float32)
