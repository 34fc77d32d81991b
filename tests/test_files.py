"""files.py: every output appears whole or not at all, with normal permissions; .safetensors are
read through one door that refuses damaged or crafted files with a clear message."""
import json
import os
import stat
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sparse_avatar.errors import UserFacingError
from sparse_avatar.files import MAX_SAFETENSORS_HEADER_BYTES, atomic_output, open_safetensors, save_safetensors, write_text


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


def _open(path):
    return open_safetensors(path, what="test file", if_missing="Make one first.", if_damaged="Write it again.")


def _crafted(path, header: dict, data: bytes = b"", header_size: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_size is None else header_size) + raw + data)
    return path


def test_open_safetensors_reads_header_tensors_and_rows(tmp_path):
    path = save_safetensors({"frames": torch.arange(12, dtype=torch.int16).reshape(4, 3), "one": torch.ones(2)},
                            tmp_path / "t.safetensors", {"format": "demo"})
    with _open(path) as reader:
        assert reader.metadata == {"format": "demo"}
        assert reader.shape("frames") == (4, 3) and reader.tensors["frames"].dtype == "I16" and reader.tensors["frames"].nbytes == 24
        assert sorted(reader.names()) == ["frames", "one"]
        assert reader.rows("frames", 1, 3).tolist() == [[3, 4, 5], [6, 7, 8]]
        assert torch.equal(reader.get_all()["one"], torch.ones(2))


def test_open_safetensors_refuses_missing_damaged_and_crafted_files_before_allocating(tmp_path):
    with pytest.raises(UserFacingError, match=r"test file not found: .*gone.safetensors\. Make one first\."):
        with _open(tmp_path / "gone.safetensors"):
            pass
    good = save_safetensors({"w": torch.ones(4)}, tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[:-3])
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    (tmp_path / "text.safetensors").write_bytes(b"not a safetensors file")
    # A header claiming a terabyte tensor in a tiny file, with offsets that agree with the shape.
    terabyte = 1 << 40
    _crafted(tmp_path / "huge.safetensors", {"w": {"dtype": "U8", "shape": [terabyte], "data_offsets": [0, terabyte]}}, b"\0" * 16)
    # ...and one whose shape disagrees with its 4-byte range (safetensors would trust neither).
    _crafted(tmp_path / "liar.safetensors", {"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4]}}, b"\0" * 4)
    _crafted(tmp_path / "big_header.safetensors", {}, header_size=MAX_SAFETENSORS_HEADER_BYTES + 1)
    _crafted(tmp_path / "dtype.safetensors", {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16)
    expected = {
        "cut": "truncated", "short": "too short", "text": "header claims", "huge": "ends at byte 1099511627776",
        "liar": "claims shape", "big_header": "at most", "dtype": "unsupported dtype",
    }
    for name, reason in expected.items():
        with pytest.raises(UserFacingError) as caught:
            with _open(tmp_path / f"{name}.safetensors"):
                pass
        message = str(caught.value)
        assert f"{name}.safetensors is not a readable .safetensors file" in message and reason in message, message
        assert message.endswith("Write it again.")
    with pytest.raises(UserFacingError, match="^mine$"):  # a caller's own error passes through unchanged
        with _open(tmp_path / "good.safetensors"):
            raise UserFacingError("mine")
