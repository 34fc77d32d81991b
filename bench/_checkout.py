"""Lets a benchmark run from a bare checkout (e.g. on a GPU box without `pip install -e .`).

``python bench/<script>.py`` puts ``bench/`` on ``sys.path``, so the scripts ``import _checkout``
first. With the package installed nothing changes; otherwise the repository root is exposed as
the package ``sparse_avatar`` WITHOUT running its ``__init__``, which loads the ComfyUI node layer
and the media stack (PyAV, librosa) that a benchmark box need not have.
"""
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

try:
    import sparse_avatar  # noqa: F401  (installed, e.g. editable)
except ImportError:
    package = types.ModuleType("sparse_avatar")
    package.__path__ = [str(REPO_ROOT)]
    sys.modules["sparse_avatar"] = package
