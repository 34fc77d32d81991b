"""The trainer on a small stand-in model: loss falls, exact resume, schedule, EMA, checkpointing.

The stand-in is a two-block residual MLP with ``.blocks`` (the attribute the trainer shards and
checkpoints); the real DiT is exercised in test_training_stages.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparse_avatar.errors import UserFacingError
from sparse_avatar.training import state_io
from sparse_avatar.training.trainer import (
    Trainer,
    TrainerConfig,
    compile_blocks,
    enable_gradient_checkpointing,
    learning_rate_factor,
    uncompile_blocks,
)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)
        self.dropout = nn.Dropout(0.1)  # stochastic on purpose: resume must restore the RNG

    def forward(self, x):
        return x + self.dropout(torch.tanh(self.linear(self.norm(x))))


class StandInModel(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList([ResidualBlock(width) for _ in range(2)])
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class RegressionSource:
    """Batch = pure function of (step, rank, world): a fixed linear target plus per-sample noise."""

    def __init__(self, global_batch_size: int = 4):
        self.global_batch_size = global_batch_size
        self.weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(123))

    def batch(self, step, rank, world_size):
        local = self.global_batch_size // world_size
        rows = []
        for index in range(rank * local, (rank + 1) * local):
            g = torch.Generator().manual_seed(step * 1000 + index)
            rows.append(torch.randn(4, generator=g))
        x = torch.stack(rows)
        return {"x": x, "y": x @ self.weight}


def regression_loss(model, batch, generator):
    prediction = model(batch["x"])
    loss = (prediction - batch["y"]).pow(2).mean()
    return loss, {"tokens": batch["x"].shape[0]}


def make_trainer(out_dir, total_steps=8, **overrides):
    torch.manual_seed(0)
    config = TrainerConfig(total_steps=total_steps, lr=3e-2, warmup_steps=2, ema_decay=0.9, seed=5, **overrides)
    return Trainer(StandInModel(), regression_loss, RegressionSource(), config, out_dir, log=lambda line: None)


def test_loss_falls_and_logs_jsonl(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=60)
    result = trainer.fit()
    assert result.step == 60
    assert sum(result.losses[-5:]) / 5 < 0.3 * sum(result.losses[:5]) / 5
    records = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 61))
    for key in ("loss", "grad_norm", "lr", "samples_per_s", "memory_mb", "tokens_per_s"):
        assert key in records[0]
    assert result.checkpoint is not None and (result.checkpoint / "model.safetensors").is_file()


def test_exact_resume_matches_straight_run(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    straight.fit()

    first_half = make_trainer(tmp_path / "resumed", checkpoint_every=4)
    first_half.fit(until_step=4)
    torch.manual_seed(999)  # disturb the global RNG: resume must restore it
    second_half = make_trainer(tmp_path / "resumed")
    assert second_half.resume()
    assert second_half.step == 4
    second_half.fit()

    for (name, a), (_, b) in zip(straight.model.named_parameters(), second_half.model.named_parameters()):
        assert torch.equal(a, b), name
    for name in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[name], second_half.ema.shadow[name]), name
    state_a = straight.optimizer.state_dict()["state"]
    state_b = second_half.optimizer.state_dict()["state"]
    for key in state_a:
        assert torch.equal(state_a[key]["exp_avg_sq"], state_b[key]["exp_avg_sq"])


def test_a_parameter_without_gradients_so_far_resumes_exactly(tmp_path):
    """A part of the model that has had no gradient before the checkpoint (personal training's
    reference path while every step so far dropped the reference) has no Adam state; resume must
    accept that and match the unbroken run once the part starts learning."""

    def loss_late_head(model, batch, generator):
        # The head learns only from step 4 on (the trainer's step count is in the batch's seed).
        hidden = model.embed(batch["x"])
        for block in model.blocks:
            hidden = block(hidden)
        out = model.head(hidden) if batch["late"] else hidden[:, :4]
        return (out - batch["y"]).pow(2).mean(), {"tokens": batch["x"].shape[0]}

    class LateSource(RegressionSource):
        def batch(self, step, rank, world_size):
            return super().batch(step, rank, world_size) | {"late": step >= 4}

    def trainer(out_dir):
        torch.manual_seed(0)
        config = TrainerConfig(total_steps=8, lr=3e-2, warmup_steps=2, ema_decay=0.0, seed=5, checkpoint_every=3)
        return Trainer(StandInModel(), loss_late_head, LateSource(), config, out_dir, log=lambda line: None)

    straight = trainer(tmp_path / "straight")
    straight.fit()
    first = trainer(tmp_path / "resumed")
    first.fit(until_step=3)
    assert first.model.head.weight not in first.optimizer.state  # no gradient yet, no state
    second = trainer(tmp_path / "resumed")
    assert second.resume() and second.step == 3
    second.fit()
    for (name, a), (_, b) in zip(straight.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(a, b), name


def test_checkpoint_has_no_pickle_and_old_ones_are_pruned(tmp_path):
    trainer = make_trainer(tmp_path, total_steps=6, checkpoint_every=2, keep_checkpoints=2)
    trainer.fit()
    folders = state_io.list_checkpoints(tmp_path)
    assert [p.name for p in folders] == ["step-00000004", "step-00000006"]
    names = sorted(p.name for p in folders[-1].iterdir())
    assert names == ["ema.safetensors", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"]


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    make_trainer(tmp_path / "a", total_steps=2).fit()
    torch.manual_seed(0)
    other = Trainer(
        nn.Sequential(nn.Linear(4, 4)), lambda m, b, g: (m(b["x"]).pow(2).mean(), {}), RegressionSource(),
        TrainerConfig(total_steps=2), tmp_path / "b", log=lambda line: None,
    )
    with pytest.raises(UserFacingError, match="does not match this model"):
        other.resume(tmp_path / "a")


def test_learning_rate_schedule_warms_up_then_decays_to_floor():
    factors = [learning_rate_factor(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert learning_rate_factor(110, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) == pytest.approx(0.1)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = StandInModel().eval()  # eval: dropout off so both passes are deterministic
    checkpointed = StandInModel().eval()
    checkpointed.load_state_dict(plain.state_dict())
    assert enable_gradient_checkpointing(checkpointed) == 2
    x = torch.randn(3, 4)
    plain(x).square().sum().backward()
    checkpointed(x).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_non_finite_loss_is_a_user_facing_error(tmp_path):
    trainer = Trainer(
        StandInModel(), lambda m, b, g: (m(b["x"]).sum() * float("nan"), {}), RegressionSource(),
        TrainerConfig(total_steps=2), tmp_path, log=lambda line: None,
    )
    with pytest.raises(UserFacingError, match="lower --lr"):
        trainer.fit()


def test_frozen_parameters_stay_untouched(tmp_path):
    torch.manual_seed(0)
    model = StandInModel()
    model.embed.requires_grad_(False)
    before = model.embed.weight.detach().clone()
    Trainer(model, regression_loss, RegressionSource(), TrainerConfig(total_steps=3, lr=1e-2), tmp_path, log=lambda line: None).fit()
    assert torch.equal(model.embed.weight, before)


def test_gradient_checkpointing_covers_the_dit_reference_pass_with_the_same_gradients():
    from sparse_avatar.model.checkpoint import new_model
    from sparse_avatar.model.flow import training_step

    plain = new_model("tiny", seed=3).eval()
    checkpointed = new_model("tiny", seed=3).eval()
    enable_gradient_checkpointing(checkpointed.dit)
    assert all(getattr(block.forward_reference, "__name__", "") == "checkpointed" for block in checkpointed.dit.blocks)
    size = plain.config.frame_size
    frames = torch.rand(1, 4, size, size, 3, generator=torch.Generator().manual_seed(1))
    batch = {
        "target_frames": frames[:, :2], "target_audio": torch.randn(1, 2, plain.config.speech_feature_dim),
        "reference_frames": frames[:, 2:], "reference_audio": torch.randn(1, 2, plain.config.speech_feature_dim),
    }
    for model in (plain, checkpointed):
        loss, _ = training_step(model, batch, generator=torch.Generator().manual_seed(5))
        loss.backward()
    reference_grads = 0
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        reference_grads += "reference_kv" in name
        torch.testing.assert_close(a.grad, b.grad, msg=name, rtol=1e-4, atol=1e-6)
    assert reference_grads > 0  # the reference pass really received gradients through the checkpoint


def test_prefetched_batches_give_the_same_run_as_reading_each_step(tmp_path):
    plain = make_trainer(tmp_path / "plain", total_steps=6).fit()
    ahead = make_trainer(tmp_path / "ahead", total_steps=6, prefetch_batches=True).fit()
    assert ahead.losses == plain.losses


def test_time_budget_fits_the_schedule_to_the_step_rate_and_stops(monkeypatch):
    from sparse_avatar.training import budget as budget_module

    clock = [100.0]
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: clock[0])
    config = TrainerConfig(total_steps=10_000, lr=1e-3, warmup_steps=100)
    budget = budget_module.TimeBudget(60.0, 10_000, config)
    budget.start()
    for step in range(1, budget_module.REFIT_STEPS + 1):
        clock[0] += 0.5  # 0.5 s a step: 120 steps fit in 60 s
        budget.on_step(step)
        assert not budget.spent(step)
    assert config.total_steps == 120
    assert config.warmup_steps == 12  # a tenth of the fitted run
    clock[0] += 48.0
    assert budget.spent(budget_module.REFIT_STEPS + 1)
    # A resumed run of a fitted schedule counts its own steps and keeps its warm-up.
    budget.start(first_step=500, fitted=True)
    for step in range(501, 501 + budget_module.REFIT_STEPS):
        clock[0] += 1.0
        budget.on_step(step)
    assert config.total_steps == 500 + budget_module.REFIT_STEPS + 60 - budget_module.REFIT_STEPS
    assert config.warmup_steps == 12
    assert not budget_module.TimeBudget(None, 5, config).spent(3)


def test_a_run_resumed_before_its_first_fit_fits_its_warm_up(monkeypatch):
    """Killed in its first steps, a run kept the step limit's schedule (warm-up 100 of 10000): the
    resumed run fits the warm-up at its first fit, a tenth of the whole run from step 0, instead of
    spending the budget warming up."""
    from sparse_avatar.training import budget as budget_module

    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: clock[0])
    config = TrainerConfig(total_steps=10_000, lr=1e-3, warmup_steps=100)  # what the killed run saved at step 20
    budget = budget_module.TimeBudget(60.0, 10_000, config)
    budget.start(first_step=20, fitted=False, spent_before=20.0)
    for step in range(21, 21 + budget_module.REFIT_STEPS):
        clock[0] += 0.5
        budget.on_step(step)
    assert config.total_steps == 45 + 95  # 47.5 s left at 0.5 s a step
    assert config.warmup_steps == 14 and budget.fitted
    for step in range(46, 46 + budget_module.REFIT_STEPS):  # later fits move the end, not the warm-up
        clock[0] += 1.0
        budget.on_step(step)
    assert config.warmup_steps == 14 and config.total_steps < 140


def test_budget_progress_is_meaningful_from_the_first_step(monkeypatch):
    """Before the step count is fitted, progress is the time used: step / planned_steps is the
    fraction of the budget spent (the whole job's when resumed), not step / the step limit."""
    from sparse_avatar.training import budget as budget_module

    clock = [0.0]
    monkeypatch.setattr(budget_module.time, "perf_counter", lambda: clock[0])
    config = TrainerConfig(total_steps=100_000, lr=1e-3, warmup_steps=100)
    budget = budget_module.TimeBudget(600.0, 100_000, config)
    budget.start()
    clock[0] += 60.0  # the first step, compilation included
    assert budget.fraction_used(1) == pytest.approx(0.1) and budget.planned_steps(1) == 10
    clock[0] += 540.0
    assert budget.fraction_used(2) == 1.0 and budget.planned_steps(2) == 2  # time is up: done
    # Resumed at step 20 after 300 s of the 600: half-way from its first step.
    budget = budget_module.TimeBudget(300.0, 100_000, config)
    budget.start(first_step=20, spent_before=300.0)
    clock[0] += 6.0
    assert budget.fraction_used(21) == pytest.approx(0.51) and budget.planned_steps(21) == 42
    # The step limit, when it comes first, is the plan; without a budget it always is.
    config.total_steps = 30
    assert budget.planned_steps(21) == 30 and budget.fraction_used(21) == pytest.approx(0.7)
    assert budget_module.TimeBudget(None, 30, config).planned_steps(5) == 30


def test_cuda_graphs_asked_for_on_a_cpu_warn_and_train_exactly_as_eager(tmp_path, caplog):
    eager = make_trainer(tmp_path / "eager")
    eager.fit()
    with caplog.at_level("WARNING"):
        graphed = make_trainer(tmp_path / "graphs", cuda_graphs=True)
    assert "CUDA graphs are off: the device is cpu" in caplog.text and graphed._graphs is None
    graphed.fit()
    for (name, a), (_, b) in zip(eager.model.named_parameters(), graphed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_a_learning_rate_held_on_the_device_is_set_in_place_and_checkpointed_as_its_number(tmp_path):
    # CUDA graphs keep lr in a tensor (the captured AdamW reads it there); checkpoints are JSON.
    trainer = make_trainer(tmp_path, total_steps=6)
    trainer.fit(until_step=2)
    held = torch.tensor(0.0)
    for group in trainer.optimizer.param_groups:
        group["lr"] = held
    lr = trainer._set_lr(3)
    assert trainer.optimizer.param_groups[0]["lr"] is held and held.item() == pytest.approx(lr)
    path = trainer.save_checkpoint()
    saved = json.loads((path / "trainer_state.json").read_text())["optimizer_values"]["param_groups"]
    assert [group["lr"] for group in saved] == [pytest.approx(lr)] * len(saved)
    resumed = make_trainer(tmp_path, total_steps=6)
    assert resumed.resume() and resumed.step == 2
    assert resumed.fit().step == 6


def test_a_failed_capture_warns_and_the_run_goes_on_eagerly_as_if_graphs_were_never_asked(tmp_path, monkeypatch, caplog):
    """The fallback of the CUDA-graph path, on the CPU: the step graphs are stood in for by one
    whose capture fails the way a host-to-device copy makes it fail on a GPU."""
    import collections

    from sparse_avatar.training import trainer as trainer_module

    class FailingGraphs:
        def __init__(self, device):
            self.generator = torch.Generator(device=device)
            self.captured, self.eager_runs = {}, collections.Counter()

        def run_eager(self, work):
            return work()

        def capture(self, key, batch, work):
            raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture unless the CPU tensor is pinned.")

    def tensor_lr_only(self):  # a CPU AdamW cannot be capturable; the lr tensor is what matters here
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]))

    eager = make_trainer(tmp_path / "eager")
    eager.fit()
    monkeypatch.setattr(trainer_module, "cuda_graphs_unavailable", lambda *args: None)
    monkeypatch.setattr(trainer_module, "_StepGraphs", FailingGraphs)
    monkeypatch.setattr(trainer_module.Trainer, "_prepare_optimizer_for_graphs", tensor_lr_only)
    with caplog.at_level("WARNING"):
        fallen_back = make_trainer(tmp_path / "fallback", cuda_graphs=True)
        fallen_back.fit()
    assert "CUDA graph capture of the training step failed (RuntimeError: Cannot copy" in caplog.text
    assert fallen_back._graphs is None and fallen_back.step == 8
    assert all(isinstance(group["lr"], float) and not group["capturable"] for group in fallen_back.optimizer.param_groups)
    for (name, a), (_, b) in zip(eager.model.named_parameters(), fallen_back.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_releasing_cuda_graphs_hands_back_the_eager_optimizer_and_is_safe_without_graphs(tmp_path, monkeypatch):
    from sparse_avatar.training import trainer as trainer_module

    plain = make_trainer(tmp_path / "plain")
    plain.release_cuda_graphs()  # no graphs: nothing to do
    monkeypatch.setattr(trainer_module, "cuda_graphs_unavailable", lambda *args: None)
    monkeypatch.setattr(trainer_module, "_StepGraphs", lambda device: object())
    monkeypatch.setattr(trainer_module.Trainer, "_prepare_optimizer_for_graphs",
                        lambda self: [group.__setitem__("lr", torch.tensor(float(group["lr"]))) for group in self.optimizer.param_groups])
    graphed = make_trainer(tmp_path / "graphed", cuda_graphs=True)
    assert graphed._graphs is not None
    graphed.release_cuda_graphs()
    assert graphed._graphs is None
    assert all(isinstance(group["lr"], float) and not group["capturable"] for group in graphed.optimizer.param_groups)
    assert graphed.fit().step == 8


def test_the_fused_ema_update_is_the_per_parameter_lerp():
    from sparse_avatar.training.trainer import ExponentialMovingAverage

    torch.manual_seed(0)
    params = {"a": nn.Parameter(torch.randn(3, 4)), "b": nn.Parameter(torch.randn(5))}
    ema = ExponentialMovingAverage(params, 0.9)
    expected = {name: value.clone() for name, value in ema.shadow.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    ema.update(step=100)
    for name, p in params.items():
        expected[name].lerp_(p.detach(), 1 - 0.9)
        torch.testing.assert_close(ema.shadow[name], expected[name])


def test_a_graph_key_tells_batch_shapes_and_host_values_apart():
    from sparse_avatar.training.trainer import _batch_signature

    base = {"x": torch.zeros(2, 3), "n": 3}
    assert _batch_signature(base) == _batch_signature({"x": torch.ones(2, 3), "n": 3})  # values of tensors do not matter
    assert _batch_signature(base) != _batch_signature({"x": torch.zeros(2, 4), "n": 3})
    assert _batch_signature(base) != _batch_signature({"x": torch.zeros(2, 3, dtype=torch.float16), "n": 3})
    assert _batch_signature(base) != _batch_signature({"x": torch.zeros(2, 3), "n": 4})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs a CUDA GPU")
def test_batches_read_ahead_for_a_gpu_are_pinned_and_train_the_same(tmp_path):
    from sparse_avatar.training.distributed import DistributedContext

    def cuda_trainer(out_dir, **overrides):
        torch.manual_seed(0)
        config = TrainerConfig(total_steps=6, lr=3e-2, warmup_steps=2, ema_decay=0.9, seed=5, **overrides)
        context = DistributedContext(0, 1, 0, torch.device("cuda"), None)
        return Trainer(StandInModel(), regression_loss, RegressionSource(), config, out_dir, context=context, log=lambda line: None)

    # Each trainer is fitted as soon as it is built: torch.manual_seed also seeds the CUDA
    # generator the blocks' dropout draws from, and a trainer fitted later would continue it.
    plain = cuda_trainer(tmp_path / "plain").fit()
    ahead = cuda_trainer(tmp_path / "ahead", prefetch_batches=True).fit()
    assert ahead.losses == pytest.approx(plain.losses, rel=1e-5)
    batch = cuda_trainer(tmp_path / "read", prefetch_batches=True)._read_ahead(3, 0, 1)
    assert all(value.is_pinned() for value in batch.values())
    torch.testing.assert_close(batch["x"], RegressionSource().batch(3, 0, 1)["x"])


def test_compiling_blocks_compiles_their_reference_pass_and_undoing_it_restores_each_wrapper():
    class TwoPassBlock(ResidualBlock):
        def forward_reference(self, x):
            return self.forward(x)

    class TwoPassModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([TwoPassBlock(4) for _ in range(2)])

        def block_entry_methods(self):
            return [(block, "forward_reference") for block in self.blocks]

    model = TwoPassModel()
    enable_gradient_checkpointing(model)  # instance wrappers, as the trainer makes them before compiling
    checkpointed = [block.__dict__["forward_reference"] for block in model.blocks]
    names = [name for name, _ in model.named_parameters()]
    compile_blocks(model)
    compile_blocks(model)  # twice is once
    for block, wrapper in zip(model.blocks, checkpointed):
        assert block._compiled_call_impl is not None
        assert block.forward_reference is not wrapper and block.__dict__["_sparse_avatar_uncompiled"] == {"forward_reference": wrapper}
    assert [name for name, _ in model.named_parameters()] == names
    uncompile_blocks(model)
    for block, wrapper in zip(model.blocks, checkpointed):
        assert block._compiled_call_impl is None and block.forward_reference is wrapper
        assert "_sparse_avatar_uncompiled" not in block.__dict__

    plain = TwoPassModel()
    compile_blocks(plain)
    uncompile_blocks(plain)
    assert all("forward_reference" not in block.__dict__ for block in plain.blocks)  # the class's method again
