"""Shards and the streaming dataset: preprocess (parallel, resumable), pure-in-step sampling,
references from another time of the same person, varied lengths, and training from shards."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sparse_avatar.errors import UserFacingError
from sparse_avatar.training.data import SHARD_FORMAT, ShardedClipDataset, read_index
from sparse_avatar.training.preprocess import write_index


def write_fake_shards(folder, clips):
    """clips: list of (person, n_frames). Frame t of clip c is filled with value (c*50 + t) % 256
    so a test can tell which clip and time a sampled frame came from."""
    (folder / "clips").mkdir(parents=True)
    for c, (person, n_frames) in enumerate(clips):
        frames = np.zeros((n_frames, 8, 8, 3), np.uint8)
        frames[:] = ((c * 50 + np.arange(n_frames)) % 256).astype(np.uint8)[:, None, None, None]
        frames[:, 0, 0, 0] = c  # clip id
        speech = np.tile(np.arange(n_frames, dtype=np.float32)[:, None], (1, 6))
        metadata = {"format": SHARD_FORMAT, "version": "1", "person": person, "caption": f"clip {c}", "fps": "25.0"}
        save_file({"frames": frames, "speech": speech}, str(folder / "clips" / f"c{c}.safetensors"), metadata=metadata)
    write_index(folder)
    return folder


def frame_times(frames: torch.Tensor, clip: int, length: int) -> list[int]:
    return [int(frames[t, 1, 1, 0]) - clip * 50 for t in range(length)]


def test_batches_are_pure_functions_of_step_and_split_evenly_over_ranks(tmp_path):
    shards = write_fake_shards(tmp_path, [("ann", 60), ("ann", 40), ("bob", 80), ("cy", 70)])
    dataset = ShardedClipDataset(shards, global_batch_size=4, target_frames=(4, 8), reference_frames=(6, 12), seed=3)
    first = dataset.batch(5, 0, 1)
    again = dataset.batch(5, 0, 1)
    assert torch.equal(first["target_frames"], again["target_frames"])
    halves = [dataset.batch(5, rank, 2) for rank in range(2)]
    # the same global samples whatever the process count (targets: same length per step)
    assert torch.equal(torch.cat([h["target_frames"] for h in halves]), first["target_frames"])
    assert torch.equal(torch.cat([h["sample_seeds"] for h in halves]), first["sample_seeds"])
    lengths = {tuple(dataset.batch(step, 0, 1)["target_frames"].shape[:2]) for step in range(12)}
    assert len(lengths) > 1  # target length varies from step to step


def test_reference_is_another_time_of_the_same_person(tmp_path):
    shards = write_fake_shards(tmp_path, [("ann", 60), ("ann", 40), ("bob", 80), ("cy", 70)])
    dataset = ShardedClipDataset(shards, global_batch_size=1, target_frames=(8, 8), reference_frames=(10, 20), seed=1)
    persons = {c: clip.person for c, clip in enumerate(dataset.clips)}
    seen_lengths, saw_other_clip = set(), False
    for index in range(60):
        plan = dataset.plan_sample(index, 8, 20)
        assert persons[plan["reference_clip"]] == persons[plan["clip"]]
        if plan["reference_clip"] == plan["clip"]:
            target = range(plan["target_start"], plan["target_start"] + plan["target_length"])
            reference = range(plan["reference_start"], plan["reference_start"] + plan["reference_length"])
            assert not set(target) & set(reference), plan
        else:
            saw_other_clip = True
        seen_lengths.add(plan["reference_length"])
        sample = dataset.sample(index, 8, 20)
        assert int(sample["reference_frames"][0, 0, 0, 0]) == plan["reference_clip"]
        assert frame_times(sample["target_frames"], plan["clip"], 3) == [plan["target_start"] + t for t in range(3)]
    assert saw_other_clip and len(seen_lengths) > 3


def test_collated_references_are_padded_with_their_lengths(tmp_path):
    shards = write_fake_shards(tmp_path, [("ann", 60), ("bob", 80)])
    batch = ShardedClipDataset(shards, global_batch_size=4, target_frames=(4, 4), reference_frames=(10, 20), seed=0).batch(0, 0, 1)
    lengths = batch["reference_lengths"]
    assert batch["reference_frames"].shape[1] == int(lengths.max())
    for i, length in enumerate(lengths.tolist()):
        assert torch.count_nonzero(batch["reference_speech"][i, length:]) == 0


def test_missing_or_unusable_shards_are_user_facing_errors(tmp_path):
    with pytest.raises(UserFacingError, match="preprocess"):
        read_index(tmp_path)
    shards = write_fake_shards(tmp_path / "short", [("ann", 5)])
    with pytest.raises(UserFacingError, match="shorter than"):
        ShardedClipDataset(shards, global_batch_size=1, target_frames=(8, 8), reference_frames=(8, 8))
    # A shard damaged after indexing (truncated on a full disk, a crafted header) is one clear error
    # naming the file and the fix, at the step that reads it, not a safetensors traceback.
    shards = write_fake_shards(tmp_path / "damaged", [("ann", 40), ("bob", 40)])
    dataset = ShardedClipDataset(shards, global_batch_size=2, target_frames=(4, 4), reference_frames=(4, 4), seed=0)
    for shard in (shards / "clips").glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserFacingError, match=r"training shard .* \(truncated\)\. Delete it and re-run preprocess"):
        dataset.batch(0, 0, 1)


def test_training_runs_from_shards(tmp_path):
    from sparse_avatar.model.checkpoint import new_model
    from sparse_avatar.training.objectives import StepModule, model_flow_objective
    from sparse_avatar.training.trainer import Trainer, TrainerConfig

    shards = write_fake_shards(tmp_path / "shards", [("ann", 30), ("bob", 30)])
    dataset = ShardedClipDataset(shards, global_batch_size=2, target_frames=(2, 3), reference_frames=(2, 4), seed=0)
    config = new_model("tiny").config.replace(frame_size=8, latent_codec="pixel-f4", speech_feature_dim=6)
    avatar = new_model(config)
    trainer = Trainer(StepModule(avatar, model_flow_objective()), lambda m, b, g: m(b), dataset, TrainerConfig(total_steps=2, lr=1e-3), tmp_path / "run", log=lambda line: None)
    result = trainer.fit()
    assert result.step == 2 and np.isfinite(result.last_loss)


def test_preprocess_avatar_world_clips_is_resumable(tmp_path, espeak, capsys):
    from sparse_avatar.cli import main
    from sparse_avatar.avatar_world.generate import generate_world

    world = tmp_path / "world"
    generate_world(3, 1.2, 64, world, seed=0, clips_per_identity=2, workers=1, progress=False)
    shards = tmp_path / "shards"
    command = [sys.executable, "-m", "sparse_avatar", "preprocess", "--in", str(world), "--out", str(shards), "--size", "32", "--workers", "2"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "3 new shards" in first.stdout
    clips = read_index(shards)
    assert sorted(c.person for c in clips) == ["world-0", "world-0", "world-1"]
    assert all(c.n_frames == 30 and c.caption.startswith("a person") for c in clips)
    from safetensors import safe_open

    with safe_open(str(shards / clips[0].file), framework="np") as handle:
        assert handle.get_slice("frames").get_shape() == [30, 32, 32, 3]
        from sparse_avatar.media import SPEECH_FEATURE_DIM

        assert handle.get_slice("speech").get_shape() == [30, SPEECH_FEATURE_DIM]
    # The resumed run in-process (the first one above is the real command-line process).
    capsys.readouterr()
    assert main(command[3:]) == 0
    assert "0 new shards, 3 already done" in capsys.readouterr().out
    index = json.loads((shards / "index.json").read_text())
    assert len(index["clips"]) == 3


def test_a_batched_source_cuts_references_on_the_host_to_a_multiple_of_frames():
    """cut_references_to_multiple: every reference is the batch's shortest rounded down to a
    multiple (never below the shortest when it is under one multiple), and the batch says how
    long in a host int, so the batched objective reads nothing back and shapes stay few."""
    from sparse_avatar.training.data import TensorOnlyBatches, collate

    def sample(length):
        return {"target_frames": torch.zeros(4, 8, 8, 3, dtype=torch.uint8), "target_speech": torch.zeros(4, 5),
                "reference_frames": torch.arange(length).view(length, 1, 1, 1).expand(length, 8, 8, 3).to(torch.uint8),
                "reference_speech": torch.zeros(length, 5), "sample_seed": 1, "caption": "c", "person": "p"}

    padded = collate([sample(13), sample(20)])
    assert padded["reference_frames"].shape[1] == 20 and padded["shortest_reference"] == 13
    assert padded["reference_lengths"].tolist() == [13, 20]
    cut = collate([sample(13), sample(20)], cut_references_to_multiple=8)
    assert cut["reference_frames"].shape[1] == 8 and cut["shortest_reference"] == 8 and cut["reference_lengths"].tolist() == [8, 8]
    assert cut["reference_frames"][1, :, 0, 0, 0].tolist() == list(range(8))  # the first frames kept
    assert collate([sample(27), sample(40)], cut_references_to_multiple=8)["shortest_reference"] == 24
    assert collate([sample(5), sample(40)], cut_references_to_multiple=8)["shortest_reference"] == 5

    class Source:
        global_batch_size = 2

        def batch(self, step, rank, world_size):
            return collate([sample(13), sample(20)])

    tensors_only = TensorOnlyBatches(Source()).batch(0, 0, 1)
    assert "captions" not in tensors_only and "persons" not in tensors_only and tensors_only["shortest_reference"] == 13


def test_a_batched_source_trains_on_the_reference_length_each_step_drew(tmp_path):
    """A batched objective uses the batch's shortest reference. Drawn per sample (half to all of
    the window), the shortest of 16 is nearly always the lower end; for a batched source every
    sample keeps its whole window, so the step trains on the length drawn for the step."""
    shards = write_fake_shards(tmp_path, [("ann", 120), ("ann", 100), ("bob", 120)])
    options = dict(global_batch_size=16, target_frames=(8, 8), reference_frames=(16, 48), seed=2)
    batched = ShardedClipDataset(shards, cut_references_to_multiple=8, **options)
    for step in range(8):
        drawn = batched.step_lengths(step)[1]
        assert batched.batch(step, 0, 1)["shortest_reference"] == drawn // 8 * 8
    per_sample = ShardedClipDataset(shards, **options).batch(0, 0, 1)["reference_lengths"]
    assert per_sample.unique().numel() > 1  # the per-sample objective still sees varied lengths in a batch
