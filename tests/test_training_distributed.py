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


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """One process, 4 steps: the run every multi-process and resumed run must reproduce, with a
    sample video after the last step (made once for the module; each launch costs a Python +
    torch start-up). Sampling uses a copy of the weights, and here comes after the last update."""
    out = tmp_path_factory.mktemp("straight")
    run_training(out, "--steps", "4", "--sample-every", "4")
    return out


def test_tiny_smoke_torchrun_two_processes_matches_one_process(straight, tmp_path):
    two = tmp_path / "two"
    result = run_training(two, "--steps", "4", processes=2)
    assert '"world_size": 2' in result.stdout and '"parallel": "ddp"' in result.stdout
    assert_weights_close(final_weights(straight), final_weights(two))
    # the logged loss is the mean over the same global batch
    log_one = (straight / "train_log.jsonl").read_text().splitlines()
    log_two = (two / "train_log.jsonl").read_text().splitlines()
    assert len(log_one) == len(log_two) == 4


@pytest.mark.skipif(not fsdp_available(), reason="FSDP2 (fully_shard) needs torch >= 2.4")
def test_fsdp2_matches_one_process_and_resumes_on_another_world_size(straight, tmp_path):
    # 2 FSDP2 ranks train 4 steps, checkpointing every 2: the result equals one process (so
    # sharding and writing checkpoints change nothing) ...
    resumed = tmp_path / "resumed"
    run_training(resumed, "--steps", "4", "--parallel", "fsdp", "--checkpoint-every", "2", processes=2)
    assert_weights_close(final_weights(straight), final_weights(resumed))
    first = state_io.list_checkpoints(resumed)
    assert [p.name for p in first] == ["step-00000002", "step-00000004"]
    # ... and 1 process resumes from the step-2 checkpoint written by 2 ranks and finishes.
    import shutil

    shutil.rmtree(first[-1])
    (resumed / "model.safetensors").unlink()
    result = run_training(resumed, "--steps", "4")
    assert "resumed from" in result.stdout and "at step 2" in result.stdout
    assert_weights_close(final_weights(straight), final_weights(resumed))


def test_train_cli_writes_periodic_sample_videos(straight):
    from sparse_avatar.media import probe_media

    assert sorted(p.name for p in (straight / "samples").iterdir()) == ["step-00000004.mp4"]
    sample = straight / "samples" / "step-00000004.mp4"
    info = probe_media(sample)
    assert info.width == 2 * info.height  # target | model sample, side by side


def test_train_cli_distillation_writes_the_teacher_vs_student_report(tmp_path):
    # Plumbing of the CLI path (a fresh checkpoint predicts zero velocity, so the numbers are 0);
    # test_training_stages checks that distillation learns and the report ranks a trained teacher.
    # (what 'init-checkpoint' writes, made in-process: test_model_units tests that command)
    from sparse_avatar.model.checkpoint import new_model, save_checkpoint

    teacher = save_checkpoint(new_model("tiny", seed=0), tmp_path / "teacher.safetensors")
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
