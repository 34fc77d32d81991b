"""The person benchmark end to end on CPU (bench/person.py --smoke: a one-block model, 44 frames of
a real clip): files and fields, not numbers (they mean nothing at this size)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "person.py"


@pytest.mark.media
@pytest.mark.slow
def test_person_benchmark_prepares_runs_and_scores(shared_media_dir, tmp_path):
    pytest.importorskip("mediapipe", reason="scoring needs the person-eval extra (mediapipe)")
    pytest.importorskip("dlib", reason="scoring needs the person-eval extra (dlib)")
    data, runs, results = tmp_path / "data", tmp_path / "runs", tmp_path / "results"

    def bench(*args):
        done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    bench("prepare", "--out", str(data), "--min-seconds", "15")
    assert sorted(p.name for p in data.glob("v*.npz")) == ["v03_mimictalk_german_anchor_20s.npz", "v07_infinitetalk_ref_man_15s.npz"]
    bench("run", "--smoke", "--variant", "x128", "--device", "cpu", "--clips", "v07", "--data", str(data), "--out", str(runs), "--budget", "1",
          "--batch", "2", "--target-frames", "4", "--reference-frames", "8", "--steps", "2", "--dub-steps", "1", "--audio-guidance", "2")
    record = json.loads((runs / "x128_v07_infinitetalk_ref_man_15s.json").read_text())
    assert record["steps"] >= 1 and record["train_frames"] == 40 and record["test_frames"] == 4 and record["compile"] is False
    assert record["dub_masks"] == "landmarks"  # the pack's default with mediapipe: the person's lower face
    assert json.loads((runs / "x128@1steps_v07_infinitetalk_ref_man_15s.json").read_text())["dub_sampler_steps"] == 1
    guided = json.loads((runs / "x128@audio2_v07_infinitetalk_ref_man_15s.json").read_text())
    assert (guided["audio_guidance"], guided["dub_sampler_steps"], guided["rerendered"]) == (2.0, 2, ["dub", "generate"])
    import numpy as np

    own, more_audio = (np.load(runs / f"x128{suffix}_v07_infinitetalk_ref_man_15s.npz") for suffix in ("", "@audio2"))
    assert not np.array_equal(own["generate_bytes"], more_audio["generate_bytes"])  # re-rendered, not copied
    assert np.array_equal(own["long_bytes"], more_audio["long_bytes"])  # the 60 s render is the run's own
    bench("score", "--runs", str(runs), "--data", str(data), "--out", str(results))
    rows = json.loads((results / "person.json").read_text())
    methods = {row["method"] for row in rows}
    assert methods == {f"baseline: {name} ({kind} mask)" for name in ("mean training frame", "speech-nearest training frame") for kind in ("box", "landmarks")} | {
        "ceiling: the real clip", "x128", "x128@1steps", "x128@audio2"}
    model_row = next(row for row in rows if row["method"] == "x128")
    assert set(model_row["dub"]) >= {"psnr_region_db", "ssim_region", "lmd_px", "mouth_corr"}
    assert set(model_row["generate"]) >= {"identity_distance", "mouth_corr", "psnr_db"}
    assert set(model_row["long"]) >= {"identity_first_10s", "identity_last_10s", "drift_ratio", "blink_rate_per_min", "head_sway_px"}
    assert (results / "person.md").read_text().count("| v07_infinitetalk_ref_man_15s |") == 11  # 8 rows in the main table, 3 in the 60 s one
    assert (results / "person_media" / "person_strip.png").stat().st_size > 0
    assert (results / "person_media" / "v07_infinitetalk_ref_man_15s_x128.mp4").stat().st_size > 0
    # report: two scored runs merged, baselines once, rows renamed per run folder
    merged = tmp_path / "merged"
    bench("report", str(results / "person.json"), str(results / "person.json"), "--rename", "results:x128=shipped", "--out", str(merged))
    table = (merged / "person.md").read_text()
    # the same run twice: its rows twice (main table and 60 s table), the baselines once
    assert table.count("baseline: mean training frame (box mask) |") == 1 and table.count("| shipped |") == 4 and "eager, 1 sharing" in table
