"""torchrun end to end on CPU (gloo): the tiny-smoke command, 2 processes == 1 process on the same
global batch (DDP and FSDP2), and a checkpoint written by 2 FSDP2 ranks resuming on 1 process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparse_avatar.training import state_io
from sparse_avatar.training.distributed import fsdp_available

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return env


def run_training(out: Path, *extra: str, processes: int = 1) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sparse_avatar.train"] if processes == 1 else [
        *TORCHRUN, "--standalone", "--nproc-per-node", str(processes), "-m", "sparse_avatar.train",
    ]
    command += ["--config", "tiny-smoke", "--out", str(out), "--device", "cpu", *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_weights_close(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def test_tiny_smoke_torchrun_two_processes_matches_one_process(tmp_path):
    one = tmp_path / "one"
    run_training(one, "--steps", "3")
    two = tmp_path / "two"
    result = run_training(two, "--steps", "3", processes=2)
    assert '"world_size": 2' in result.stdout and '"parallel": "ddp"' in result.stdout
    assert_weights_close(final_weights(one), final_weights(two))
    # the logged loss is the mean over the same global batch
    log_one = (one / "train_log.jsonl").read_text().splitlines()
    log_two = (two / "train_log.jsonl").read_text().splitlines()
    assert len(log_one) == len(log_two) == 3


@pytest.mark.skipif(not fsdp_available(), reason="FSDP2 (fully_shard) needs torch >= 2.4")
def test_fsdp2_matches_one_process_and_resumes_on_another_world_size(tmp_path):
    straight = tmp_path / "straight"
    run_training(straight, "--steps", "4")

    sharded = tmp_path / "sharded"
    run_training(sharded, "--steps", "4", "--parallel", "fsdp", processes=2)
    assert_weights_close(final_weights(straight), final_weights(sharded))

    # 2 FSDP2 ranks train 2 of 4 steps and checkpoint; 1 process resumes and finishes.
    resumed = tmp_path / "resumed"
    run_training(resumed, "--steps", "4", "--parallel", "fsdp", "--checkpoint-every", "2", processes=2)
    first = state_io.list_checkpoints(resumed)
    assert [p.name for p in first] == ["step-00000002", "step-00000004"]
    # Drop the step-4 checkpoint so the single process resumes from step 2 written by 2 ranks.
    import shutil

    shutil.rmtree(first[-1])
    (resumed / "model.safetensors").unlink()
    result = run_training(resumed, "--steps", "4")
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert_weights_close(final_weights(straight), final_weights(resumed))


def test_train_cli_writes_periodic_sample_videos(tmp_path):
    from sparse_avatar.media import probe_media

    out = tmp_path / "run"
    run_training(out, "--steps", "2", "--sample-every", "2")
    sample = out / "samples" / "step-00000002.mp4"
    assert sample.is_file()
    info = probe_media(sample)
    assert info.width == 2 * info.height  # target | model sample, side by side


def test_train_cli_distillation_writes_the_teacher_vs_student_report(tmp_path):
    # Plumbing of the CLI path (a fresh checkpoint predicts zero velocity, so the numbers are 0);
    # test_training_stages checks that distillation learns and the report ranks a trained teacher.
    teacher = tmp_path / "teacher.safetensors"
    subprocess.run([sys.executable, "-m", "sparse_avatar", "init-checkpoint", "--config", "tiny", "--out", str(teacher)],
                   check=True, capture_output=True, env=_env())
    out = tmp_path / "distill"
    command = [sys.executable, "-m", "sparse_avatar.train", "--config", "distill", "--model-config", "tiny", "--data", "synthetic",
               "--init", str(teacher), "--steps", "2", "--batch-size", "2", "--target-frames", "4", "--reference-frames", "8",
               "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import json

    report = json.loads((out / "distillation_report.json").read_text())
    assert report["student_steps"] < report["teacher_steps"]
    assert {"student_mse_vs_teacher", "teacher_few_steps_mse_vs_teacher"} <= report.keys()
    assert (out / "model.safetensors").is_file()
