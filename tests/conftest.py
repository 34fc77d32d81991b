"""Shared test fixtures.

Licensed real clips live in ../shared/media (tests and evaluation only: never copied into the
project). Tests over them skip with a clear reason when the folder is absent.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

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
