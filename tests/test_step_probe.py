"""bench/step_probe.py's code path on CPU (a `tiny` step, uncompiled, one step of each phase):
files and fields, not numbers. Both RoPE forms run through the real training step."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_step_probe_writes_its_table_and_profiles(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import step_probe
    finally:
        sys.path.remove(str(REPO / "bench"))
    from sparse_avatar.model import dit

    original = dit.apply_rope, dit.rope_rotation
    assert step_probe.main(["--out", str(tmp_path), "--device", "cpu", "--config", "tiny", "--no-compile", "--batch", "1",
                            "--variants", "model,stacked", "--warmup-steps", "1", "--timed-steps", "1", "--profile-steps", "1"]) == 0
    assert (dit.apply_rope, dit.rope_rotation) == original  # stacked ran last: the probe put the model's RoPE back
    result = json.loads((tmp_path / "step_probe.json").read_text())
    assert [row["variant"] for row in result["steps"]] == ["model", "stacked"]
    assert all(row["ms_per_step"] > 0 and "error" not in row for row in result["steps"])
    table = (tmp_path / "step_probe.md").read_text()
    assert "| stacked | 1 |" in table and "| model | 1 |" in table
    for variant in ("stacked", "model"):
        assert "ms/step" in (tmp_path / f"step_probe_{variant}.txt").read_text()
