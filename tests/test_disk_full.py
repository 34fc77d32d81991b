"""A full disk is one clear message and leaves nothing half-written: a video, a .safetensors file,
a training checkpoint folder. Simulated everywhere; on a real small tmpfs where this machine lets
us mount one."""
from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_avatar.errors import UserFacingError
from sparse_avatar.files import is_disk_full, save_safetensors
from sparse_avatar.media import write_video
from sparse_avatar.media import video_io
from sparse_avatar.training import state_io
from sparse_avatar.training.distributed import DistributedContext

FRAMES = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)


def _checkpoint(folder: Path, step: int, width: int = 16) -> Path:
    model = torch.nn.Linear(width, width)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, width)).sum().backward()
    optimizer.step()
    return state_io.save_training_checkpoint(folder, step, model=model, optimizer=optimizer, ema_state=None, trainer_state={},
                                             model_metadata=None, context=DistributedContext(0, 1, 0, torch.device("cpu"), None))


def _nothing_partial(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob("*") if ".partial-" in p.name or ".tmp-" in p.name]
    assert not leftovers, f"half-written files left: {leftovers}"


def test_disk_full_is_recognised_in_every_writer_s_words():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))  # safetensors
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_simulated_full_disk(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video_io, "_encode_mp4", no_space)
    with pytest.raises(UserFacingError, match="is full .* while writing out.mp4; nothing half-written was left"):
        write_video(tmp_path / "out.mp4", FRAMES, 25.0)

    import safetensors.torch

    def serialise_fails(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", serialise_fails)
    with pytest.raises(UserFacingError, match="while writing weights.safetensors"):
        save_safetensors({"x": torch.zeros(3)}, tmp_path / "weights.safetensors")
    with pytest.raises(UserFacingError, match="while writing step-00000002"):
        _checkpoint(tmp_path / "run", 2)
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "weights.safetensors").exists()
    assert state_io.list_checkpoints(tmp_path / "run") == []
    _nothing_partial(tmp_path)


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount_point)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and a kernel that allows it); the simulated test covers the code")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], capture_output=True)


def test_real_full_disk_keeps_the_last_good_checkpoint(small_disk):
    first = _checkpoint(small_disk / "run", 1)
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 4096))
    with pytest.raises(UserFacingError, match="while writing step-00000002"):
        _checkpoint(small_disk / "run", 2)
    assert state_io.list_checkpoints(small_disk / "run") == [first]
    assert state_io.read_trainer_state(first)["step"] == 1
    _nothing_partial(small_disk)


def test_real_full_disk(small_disk):
    with pytest.raises(UserFacingError, match="is full"):
        write_video(small_disk / "out.mp4", np.random.default_rng(1).integers(0, 255, (50, 256, 256, 3), dtype=np.uint8), 25.0)
    with pytest.raises(UserFacingError, match="while writing weights.safetensors"):
        save_safetensors({"x": torch.zeros(100_000)}, small_disk / "weights.safetensors")
    assert sorted(p.name for p in small_disk.iterdir()) == []
