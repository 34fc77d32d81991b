"""The media package imports on a machine without PyAV (the lent GPU boxes have none): training,
the benchmarks and speech features work there, and only reading or writing a file says, in one
clear message, that PyAV is needed. Runs in a subprocess with PyAV hidden."""
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_media_imports_and_explains_without_pyav(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not a video")
    script = textwrap.dedent(f"""
        import sys, types
        sys.modules["av"] = None  # import av -> ImportError, as on a box without PyAV
        package = types.ModuleType("sparse_avatar")  # a bare checkout, as bench/_checkout makes it
        package.__path__ = [{str(REPO)!r}]
        sys.modules["sparse_avatar"] = package
        import numpy as np
        from sparse_avatar import media
        from sparse_avatar.errors import UserFacingError
        import sparse_avatar.training.train, sparse_avatar.training.personality  # the GPU recipe's imports
        features = media.speech_features(np.zeros(16000, np.float32), 16000, 25.0)
        assert features.shape[0] == 25, features.shape
        try:
            media.load_reference_video({str(video)!r})
        except UserFacingError as error:
            assert "PyAV" in str(error) and "pip install av" in str(error), str(error)
            print("refused:", error)
        else:
            raise AssertionError("a video was read without PyAV")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refused:" in result.stdout
