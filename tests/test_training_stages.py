"""The five curriculum stages on the real tiny DiT: each runs a few steps and its loss falls;
LoRA files load onto their base and change only what they should; DPO prefers the winner."""
from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from sparse_avatar.errors import UserFacingError
from sparse_avatar.model.checkpoint import new_model
from sparse_avatar.training import objectives
from sparse_avatar.training.lora import LoRALinear, apply_lora, load_lora, lora_layers, save_lora
from sparse_avatar.training.stages import build_objective, get_training_config
from sparse_avatar.avatar_world.batches import WorldBatches
from sparse_avatar.training.text_encoder import HashedTextEncoder, TextConditioner
from sparse_avatar.training.trainer import Trainer, TrainerConfig


class FixedBatch:
    """The same batch every step: 'loss falls' then means the model fits it (deterministic)."""

    def __init__(self, batch: dict, global_batch_size: int):
        self._batch, self.global_batch_size = batch, global_batch_size

    def batch(self, step, rank, world_size):
        return self._batch


def synthetic_batch(avatar, size=2, frames=2, seed=0):
    source = WorldBatches(global_batch_size=size, frame_size=avatar.config.frame_size, speech_dim=avatar.config.speech_feature_dim, target_frames=frames, reference_frames=frames, seed=seed)
    return source.batch(0, 0, 1)


def loss_of(step_module, batch) -> float:
    with torch.no_grad():
        loss, _ = step_module(batch)
    return float(loss)


def train(step_module, batch, tmp_path, steps=12, lr=3e-3):
    config = TrainerConfig(total_steps=steps, lr=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0, grad_clip=1.0)
    trainer = Trainer(step_module, lambda module, b, g: module(b), FixedBatch(batch, batch["target_frames"].shape[0] if "target_frames" in batch else batch["winner_frames"].shape[0]), config, tmp_path, log=lambda line: None)
    trainer.fit()
    return trainer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The CI machine's 2 cores are shared; one intra-op thread avoids oversubscription stalls.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    return new_model("tiny", seed=0)


@pytest.fixture(scope="module")
def stage2_run(tiny, tmp_path_factory):
    """Stage 2 for a few steps from random init; later stages start from its weights (as they do
    in the curriculum: LoRA and distillation from an adaLN-Zero model at init would see zero
    gradients / a zero teacher)."""
    avatar = copy.deepcopy(tiny)
    objective, _ = build_objective(get_training_config("audio"), avatar)
    step_module = objectives.StepModule(avatar, objective)
    batch = synthetic_batch(avatar)
    before = loss_of(step_module, batch)
    train(step_module, batch, tmp_path_factory.mktemp("stage2"), steps=10)
    return avatar, before, loss_of(step_module, batch)


@pytest.fixture
def pretrained(stage2_run):
    return copy.deepcopy(stage2_run[0])


def test_stage1_video_pretraining_with_scene_text(tiny, tmp_path):
    avatar = copy.deepcopy(tiny)
    text = TextConditioner(avatar.config.hidden)
    objective, _ = build_objective(get_training_config("video"), avatar, text_conditioner=text)
    step_module = objectives.StepModule(avatar, objective, text_conditioner=text)
    batch = synthetic_batch(avatar)
    before = loss_of(step_module, batch)
    train(step_module, batch, tmp_path, steps=10)
    assert loss_of(step_module, batch) < 0.8 * before
    # the text path learned something: another caption now changes the prediction
    assert text.project.weight.abs().sum() > 0
    other = dict(batch, captions=["an empty red room at night"] * 2)
    assert abs(loss_of(step_module, other) - loss_of(step_module, batch)) > 1e-6


def test_text_encoder_is_deterministic_and_comfy_shaped():
    encoder = HashedTextEncoder(dim=16, n_buckets=64)
    tokens, mask, pooled = encoder(["a blue room", "Red hair, glasses and a hat"])
    assert tokens.shape == (2, 6, 16) and mask.sum(1).tolist() == [3, 6] and pooled.shape == (2, 16)
    again, _, _ = encoder(["a blue room", "Red hair, glasses and a hat"])
    assert torch.equal(tokens, again)
    conditioning = encoder.comfy_conditioning(["a blue room"])
    assert conditioning[0][0].shape == (1, 3, 16) and conditioning[0][1]["pooled_output"].shape == (1, 16)


def test_stage2_audio_to_video_uses_the_model_training_step(stage2_run):
    _, before, after = stage2_run
    assert after < 0.8 * before


def test_model_flow_objective_is_independent_of_how_the_batch_is_split(tiny):
    avatar = copy.deepcopy(tiny)
    step_module = objectives.StepModule(avatar, objectives.model_flow_objective())
    batch = synthetic_batch(avatar, size=2)
    whole, _ = step_module(batch)
    halves = [step_module({k: (v[i : i + 1] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()})[0] for i in range(2)]
    torch.testing.assert_close(whole, torch.stack(halves).mean())


def test_stage3_personality_lora_trains_only_the_adapter(pretrained, tmp_path):
    avatar = copy.deepcopy(pretrained)
    base_fingerprint = avatar.fingerprint()
    base_state = {k: v.clone() for k, v in avatar.dit.state_dict().items()}
    wrapped = apply_lora(avatar.dit, rank=4)
    assert wrapped and all(".blocks." not in name for name in wrapped)  # names are relative to the DiT
    objective, _ = build_objective(get_training_config("personality"), avatar)
    step_module = objectives.StepModule(avatar, objective)
    batch = synthetic_batch(avatar)
    before = loss_of(step_module, batch)
    train(step_module, batch, tmp_path, steps=8, lr=1e-2)
    assert loss_of(step_module, batch) < 0.9 * before
    for name, layer in lora_layers(avatar.dit).items():
        torch.testing.assert_close(layer.base.weight, base_state[f"{name}.weight"])  # frozen base
    # non-LoRA parameters (embedders, norms, final layer) were not touched either
    current = {k.replace(".base.", "."): v for k, v in avatar.dit.state_dict().items() if not k.endswith((".down", ".up"))}
    for name, value in base_state.items():
        torch.testing.assert_close(current[name], value, msg=name)

    path = save_lora(avatar.dit, tmp_path / "person.safetensors", base_fingerprint=base_fingerprint)
    assert path.stat().st_size < 0.5 * sum(v.numel() * 4 for v in base_state.values())

    fresh = copy.deepcopy(pretrained)
    changed_layers = load_lora(fresh.dit, path, base_fingerprint=fresh.fingerprint(), merge=True)
    assert not lora_layers(fresh.dit)  # merged into plain Linear layers
    fresh_state = fresh.dit.state_dict()
    for name, value in base_state.items():
        layer = name.rsplit(".", 1)[0]
        if layer in changed_layers and name.endswith(".weight"):
            assert not torch.equal(fresh_state[name], value), name
        else:
            torch.testing.assert_close(fresh_state[name], value, msg=name)
    # the merged model computes what the trained adapter model computes
    fresh_module = objectives.StepModule(fresh, objective)
    assert loss_of(fresh_module, batch) == pytest.approx(loss_of(step_module, batch), rel=1e-4)

    other_base = new_model("tiny", seed=1)
    with pytest.raises(UserFacingError, match="trained on base model"):
        load_lora(other_base.dit, path, base_fingerprint=other_base.fingerprint())


def test_a_damaged_lora_is_refused_before_any_layer_changes(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from sparse_avatar.files import read_safetensors_header

    avatar = copy.deepcopy(tiny)
    apply_lora(avatar.dit, rank=2)
    for layer in lora_layers(avatar.dit).values():
        torch.nn.init.normal_(layer.up)
    good = save_lora(avatar.dit, tmp_path / "good.safetensors", base_fingerprint=tiny.fingerprint())
    metadata, _ = read_safetensors_header(good)
    tensors = load_file(str(good))
    last = json.loads(metadata["layers"])[-1]  # the old loader had merged every layer before it by then
    broken = {
        "no rank": ({k: v for k, v in metadata.items() if k != "rank"}, tensors, "damaged LoRA metadata"),
        "bad layer list": ({**metadata, "layers": "not json"}, tensors, "damaged LoRA metadata"),
        "missing weights": (metadata, {k: v for k, v in tensors.items() if k != f"{last}.up"}, "lacks the weights"),
        "not a linear layer": ({**metadata, "layers": json.dumps(["final_norm"])}, tensors, "not a linear layer|does not have"),
    }
    for label, (meta, weights, message) in broken.items():
        path = tmp_path / f"{label.replace(' ', '_')}.safetensors"
        save_file(weights, str(path), metadata=meta)
        fresh = copy.deepcopy(tiny)
        before = {k: v.clone() for k, v in fresh.dit.state_dict().items()}
        with pytest.raises(UserFacingError, match=message):
            load_lora(fresh.dit, path, base_fingerprint=tiny.fingerprint())
        after = fresh.dit.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), f"{label}: the model changed before the refusal"


def test_lora_starts_as_the_identity(tiny):
    avatar = copy.deepcopy(tiny)
    step_module = objectives.StepModule(avatar, objectives.model_flow_objective())
    batch = synthetic_batch(avatar)
    before = loss_of(step_module, batch)
    apply_lora(avatar.dit, rank=2)
    assert isinstance(avatar.dit.blocks[0].qkv, LoRALinear)
    assert loss_of(step_module, batch) == pytest.approx(before, rel=1e-6)


def test_stage4_distillation_loss_falls_and_report_compares_teacher(pretrained, tmp_path):
    avatar = pretrained
    stage = dataclasses.replace(get_training_config("distill"), student_steps=2, teacher_substeps=2)
    objective, teacher = build_objective(stage, avatar)
    step_module = objectives.StepModule(avatar, objective)
    batch = synthetic_batch(avatar)
    report_before = objectives.distillation_report(teacher, avatar, [batch], student_steps=2, teacher_steps=4)
    before = loss_of(step_module, batch)
    train(step_module, batch, tmp_path, steps=8, lr=1e-4)
    assert loss_of(step_module, batch) < 0.8 * before
    report = objectives.distillation_report(teacher, avatar, [batch], student_steps=2, teacher_steps=4)
    assert set(report) >= {"student_mse_vs_teacher", "teacher_few_steps_mse_vs_teacher"}
    assert report["student_mse_vs_teacher"] < report_before["student_mse_vs_teacher"]
    assert all(p.requires_grad is False for p in teacher.parameters())


def test_dpo_loss_prefers_the_winner():
    winner_lower = torch.tensor([0.1]), torch.tensor([0.5])
    reference = torch.tensor([0.3]), torch.tensor([0.3])
    good, margin_good = objectives.diffusion_dpo_loss(*winner_lower, *reference, beta=10.0)
    bad, margin_bad = objectives.diffusion_dpo_loss(*reversed(winner_lower), *reference, beta=10.0)
    assert margin_good.item() > 0 > margin_bad.item()
    assert good < torch.log(torch.tensor(2.0)) < bad  # log 2 = loss when the policy equals the reference


def test_stage5_dpo_on_a_toy_pair_raises_the_winner_margin(pretrained, tmp_path):
    avatar = pretrained
    base = synthetic_batch(avatar)
    # winner: the clean clip; loser: the same clip with its mouth region frozen to frame 0
    loser = base["target_frames"].clone()
    loser[:, 1:] = loser[:, :1]
    batch = {**{k: v for k, v in base.items() if k not in ("target_frames", "captions")}, "winner_frames": base["target_frames"], "loser_frames": loser}
    objective, reference = build_objective(get_training_config("dpo"), avatar)
    step_module = objectives.StepModule(avatar, objective)
    with torch.no_grad():
        _, start = step_module(batch)
    assert abs(start["reward_margin"]) < 1e-6  # policy == reference at the start
    before = loss_of(step_module, batch)
    train(step_module, batch, tmp_path, steps=8, lr=1e-3)
    with torch.no_grad():
        loss, end = step_module(batch)
    assert end["reward_margin"] > 0 and float(loss) < before


def test_finetune_personality_writes_a_lora_with_progress_and_cancel(pretrained, tmp_path):
    from sparse_avatar.training.personality import finetune_personality

    base = copy.deepcopy(pretrained)
    source = WorldBatches(global_batch_size=1, frame_size=base.config.frame_size, speech_dim=base.config.speech_feature_dim, target_frames=24, reference_frames=2)
    clip = source.batch(0, 0, 1)
    crops, speech = clip["target_frames"][0].numpy(), clip["target_speech"][0].numpy()
    calls = []
    path = finetune_personality(
        pretrained, crops, speech, tmp_path / "me.safetensors", steps=5, lora_rank=2, batch_size=2,
        target_frames=(2, 3), reference_frames=(4, 8),
        progress=lambda step, total, loss: calls.append((step, total)), should_cancel=lambda: len(calls) >= 2,
    )
    assert calls == [(1, 5), (2, 5)]  # cancelled after two steps, LoRA still written
    names = load_lora(base.dit, path, base_fingerprint=base.fingerprint())
    assert names and path.stat().st_size < 200_000
    with pytest.raises(UserFacingError, match="face crops"):
        finetune_personality(base, crops[:, :8], speech, tmp_path / "x.safetensors", steps=1)


def test_batched_objective_gives_the_per_sample_loss_when_references_are_equal(tiny):
    """The "world" stage's one batched call is the per-sample loop's mean when every reference has
    the same length (its only approximation is cutting references to the batch's shortest)."""
    from sparse_avatar.model.flow import training_step

    avatar = copy.deepcopy(tiny)
    batch = synthetic_batch(avatar, size=2)
    assert int(batch["reference_lengths"].min()) == int(batch["reference_lengths"].max())
    assert get_training_config("world").batched_objective and not get_training_config("audio").batched_objective
    step_module = objectives.StepModule(avatar, objectives.model_flow_objective(per_sample=False))
    loss, metrics = step_module(batch)
    assert all(isinstance(value, torch.Tensor) for key, value in metrics.items() if key != "tokens")  # no host sync per step
    assert torch.isfinite(loss)
    generator = torch.Generator().manual_seed(int(batch["sample_seeds"][0]))
    inputs = {"target_frames": batch["target_frames"].float() / 255, "target_audio": batch["target_speech"],
              "reference_frames": batch["reference_frames"].float() / 255, "reference_audio": batch["reference_speech"]}
    expected, _ = training_step(avatar, inputs, generator=generator)
    torch.testing.assert_close(loss, expected)


def test_train_minutes_on_shards_stops_at_the_budget_and_writes_the_model(tmp_path):
    """--minutes on a --data stage: a tiny budget stops after the first step and still writes the
    final model (the path the shipped model's recipe takes on a GPU)."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "sparse_avatar.train", "--config", "tiny-smoke", "--out", str(out), "--device", "cpu",
                             "--steps", "500", "--minutes", "0.0001"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    done = json.loads(result.stdout.strip().splitlines()[-1])["done"]
    assert 1 <= done["step"] < 500
    assert (out / "model.safetensors").is_file()


def test_the_batched_objective_draws_from_the_trainers_generator_and_reads_nothing_back(tiny):
    """With the trainer's generator the batched world objective is training_step on that
    generator, cut at the batch's host-side ``shortest_reference``: it reads neither the sample
    seeds nor the lengths back from the device (what lets the step be a CUDA graph)."""
    from sparse_avatar.model.flow import training_step

    avatar = copy.deepcopy(tiny)
    batch = synthetic_batch(avatar, size=2, frames=4)
    batch["reference_lengths"] = None  # would fail if read
    batch["sample_seeds"] = None
    batch["shortest_reference"] = 3
    step_module = objectives.StepModule(avatar, objectives.model_flow_objective(per_sample=False))
    loss, _ = step_module(batch, torch.Generator().manual_seed(11))
    inputs = {"target_frames": batch["target_frames"].float() / 255, "target_audio": batch["target_speech"],
              "reference_frames": batch["reference_frames"][:, :3].float() / 255, "reference_audio": batch["reference_speech"][:, :3]}
    expected, _ = training_step(avatar, inputs, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(loss, expected)


def test_world_training_defaults_to_cuda_graphs_only_where_a_batched_step_can_be_captured():
    import argparse

    from sparse_avatar.training.distributed import DistributedContext
    from sparse_avatar.training.stages import with_overrides
    from sparse_avatar.training.train import _uses_cuda_graphs

    world, audio = get_training_config("world"), get_training_config("audio")
    cuda = DistributedContext(0, 1, 0, torch.device("cuda"), None)
    two = DistributedContext(0, 2, 0, torch.device("cuda"), None)
    cpu = DistributedContext(0, 1, 0, torch.device("cpu"), None)
    unset = argparse.Namespace(cuda_graphs=None)
    assert _uses_cuda_graphs(world, unset, cuda)
    assert not _uses_cuda_graphs(audio, unset, cuda)  # per-sample seeds: read back every step
    assert not _uses_cuda_graphs(world, unset, cpu)
    assert not _uses_cuda_graphs(world, unset, two)
    assert not _uses_cuda_graphs(with_overrides(world, gradient_checkpointing=True), unset, cuda)
    assert not _uses_cuda_graphs(world, argparse.Namespace(cuda_graphs=False), cuda)
    assert _uses_cuda_graphs(audio, argparse.Namespace(cuda_graphs=True), cuda)  # asked for: the trainer decides and warns


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_world_steps_of_two_shapes_replay_as_cuda_graphs_and_train_like_eager(tmp_path, monkeypatch):
    """The batched world step on the trainer's generator, with batches of two reference lengths:
    one graph per (reference kept, shape) key, and the run trains as eager does (within a few
    times the GPU's own eager-vs-eager noise, as in test_person_training)."""
    from sparse_avatar.model.flow import keeps_reference
    from sparse_avatar.training import trainer as trainer_module
    from sparse_avatar.training.data import TensorOnlyBatches

    tiny_config = new_model("tiny", seed=0).config

    class TwoLengths:
        def __init__(self):
            self.sources = [WorldBatches(global_batch_size=2, frame_size=tiny_config.frame_size, speech_dim=tiny_config.speech_feature_dim,
                                         target_frames=4, reference_frames=n, seed=1) for n in (4, 8)]
            self.global_batch_size = 2

        def batch(self, step, rank, world_size):
            return self.sources[step % 2].batch(step, rank, world_size)

    captured = []
    real_capture = trainer_module._StepGraphs.capture
    monkeypatch.setattr(trainer_module._StepGraphs, "capture", lambda self, key, batch, work: captured.append(key) or real_capture(self, key, batch, work))
    weights = {}
    for run, graphs in (("eager", False), ("eager again", False), ("graphs", True)):
        avatar = new_model("tiny", seed=0).to("cuda")
        config = TrainerConfig(total_steps=14, lr=1e-3, warmup_steps=0, cuda_graphs=graphs, log_every=7)
        trainer = Trainer(objectives.StepModule(avatar, objectives.model_flow_objective(per_sample=False)), lambda m, b, g: m(b, g),
                          TensorOnlyBatches(TwoLengths()), config, tmp_path / run, log=lambda line: None,
                          graph_key=lambda generator: keeps_reference(avatar.config, generator))
        trainer.fit()
        weights[run] = {name: value.detach().float().cpu() for name, value in avatar.state_dict().items()}
    shapes = {entry[1] for _, signature in captured for entry in signature if entry[0] == "reference_frames"}
    assert len(shapes) == 2, captured

    def distance(run):
        squares = sum((weights[run][name] - value).pow(2).sum().item() for name, value in weights["eager"].items())
        return (squares / sum(value.pow(2).sum().item() for value in weights["eager"].values())) ** 0.5

    assert distance("graphs") <= 3 * distance("eager again") + 1e-6, (distance("graphs"), distance("eager again"))
