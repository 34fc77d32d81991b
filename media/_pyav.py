"""PyAV, imported once for the media modules that decode and encode files.

A GPU training or benchmark box may have no PyAV (the lent H200 image has none). Training, the
benchmarks and the personal path there still need the rest of ``media`` (speech features, crops,
arrays), so the package must import without it; only the calls that read or write a file need
PyAV, and those say so in one clear message instead of an ImportError at import time.
"""
from ..errors import UserFacingError

try:
    import av

    FFmpegError = av.error.FFmpegError
except ImportError as _error:  # pragma: no cover - exercised by tests/test_media_without_pyav.py in a subprocess
    _reason = str(_error)

    class _MissingPyAV:
        def __getattr__(self, name):
            raise UserFacingError(f"reading or writing audio/video files needs PyAV, which is not installed here ({_reason}); "
                                  "install it with `pip install av`.")

    av = _MissingPyAV()

    class FFmpegError(Exception):
        """Stands in for av.error.FFmpegError in ``except`` clauses; never raised without PyAV."""

__all__ = ["FFmpegError", "av"]
