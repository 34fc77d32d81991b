"""files.py: every output appears whole or not at all, with normal permissions."""
import os
import stat

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sparse_avatar.files import atomic_output, save_safetensors, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_debris(tmp_path):
    target = tmp_path / "out" / "report.md"
    write_text(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_text("half written")
            raise RuntimeError("writer crashed")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


def test_outputs_get_the_usual_permissions_not_owner_only(tmp_path):
    umask = os.umask(0o022)
    try:
        path = save_safetensors({"w": torch.ones(2)}, tmp_path / "model.safetensors", {"format": "x"})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_save_safetensors_takes_torch_or_numpy_and_keeps_metadata(tmp_path):
    for tensors in ({"a": torch.arange(3)}, {"a": np.arange(3)}):
        path = save_safetensors(tensors, tmp_path / "t.safetensors", {"format": "demo"})
        with safe_open(str(path), framework="np") as handle:
            assert handle.metadata() == {"format": "demo"}
            assert handle.get_tensor("a").tolist() == [0, 1, 2]
