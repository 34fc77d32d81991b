"""The generator that learns a person: x-prediction, the pixel refiner, dub context in training,
the shared-reference batch source, and personality fine-tuning (full and LoRA, time budget)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_avatar.errors import UserFacingError
from sparse_avatar.model import new_model, training_step
from sparse_avatar.model.configs import get_config
from sparse_avatar.model.masks import DUB_REGION, dub_mask, jittered_dub_masks
from sparse_avatar.training.personality import PersonClipSource, finetune_personality

X_CONFIG = get_config("tiny").replace(prediction="x", loss_space="v", refiner_channels=8)


def _batch(size=2, frames=4, reference_batch=1, side=32):
    dim = get_config("tiny").speech_feature_dim
    generator = torch.Generator().manual_seed(3)
    return {
        "target_frames": torch.rand(size, frames, side, side, 3, generator=generator),
        "target_audio": torch.randn(size, frames, dim, generator=generator),
        "reference_frames": torch.rand(reference_batch, 6, side, side, 3, generator=generator),
        "reference_audio": torch.randn(reference_batch, 6, dim, generator=generator),
    }


def test_x_prediction_velocity_and_data_outputs_agree():
    model = new_model(X_CONFIG, seed=1)
    for parameter in model.parameters():  # off the zero init, so the prediction is not trivially 0
        parameter.data.add_(torch.randn_like(parameter) * 0.05)
    noisy = torch.randn(1, 48, 3, 8, 8)
    t = torch.tensor([0.3])
    audio = torch.randn(1, 3, X_CONFIG.speech_feature_dim)
    data = model.dit(noisy, t, audio, None, output="data")
    velocity = model.dit(noisy, t, audio, None)
    torch.testing.assert_close(noisy + (1 - t) * velocity, data, atol=1e-5, rtol=1e-5)


def test_refiner_starts_as_the_identity_and_learns():
    config = X_CONFIG
    with_refiner, without = new_model(config, seed=4), new_model(config.replace(refiner_channels=0), seed=4)
    state = {name: value for name, value in with_refiner.dit.state_dict().items() if not name.startswith("refiner.")}
    without.dit.load_state_dict(state)
    noisy = torch.randn(1, 48, 2, 8, 8)
    audio = torch.randn(1, 2, config.speech_feature_dim)
    torch.testing.assert_close(with_refiner.dit(noisy, torch.tensor([0.5]), audio, None, output="data"),
                               without.dit(noisy, torch.tensor([0.5]), audio, None, output="data"))
    loss, _ = training_step(with_refiner, _batch(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert with_refiner.dit.refiner.net[-1].weight.grad.abs().sum() > 0


def test_refiner_needs_x_prediction():
    with pytest.raises(UserFacingError, match="refiner"):
        get_config("tiny").replace(refiner_channels=8)


def test_dub_masks_cover_the_lower_face_and_jitter_around_it():
    mask = dub_mask(100)
    top, bottom, left, right = (round(100 * f) for f in DUB_REGION)
    assert mask[top:bottom, left:right].all() and mask.sum() == (bottom - top) * (right - left)
    masks = jittered_dub_masks(64, 100, jitter=0.04, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (64, 100, 100)
    areas = masks.sum((1, 2))
    assert areas.min() < mask.sum() < areas.max()  # both larger and smaller holes are drawn
    assert (masks[:, 70, 50] == 1).all() and (masks[:, 20, 50] == 0).all()  # mouth always hidden, eyes never


def test_dub_context_reaches_the_model(monkeypatch):
    """With dub_context_prob 1 every sample is given its own frames outside the dub box as
    known context; with 0 (and no motion frames) none is."""
    model = new_model(get_config("tiny").replace(motion_frames_prob=0.0, reference_dropout=0.0), seed=0)
    seen = {}
    original = model.dit.forward

    def spy(noisy, t, speech, caches, *, context_latents=None, context_mask=None, **kwargs):
        seen["context"], seen["mask"] = context_latents, context_mask
        return original(noisy, t, speech, caches, context_latents=context_latents, context_mask=context_mask, **kwargs)

    monkeypatch.setattr(model.dit, "forward", spy)
    batch = _batch()
    training_step(model, batch, generator=torch.Generator().manual_seed(0), dub_context_prob=1.0)
    mask = seen["mask"]  # [B, 1, T, 8, 8] at the pixel-f4 cell grid of a 32² crop
    assert mask.shape == (2, 1, 4, 8, 8)
    assert (mask[:, :, :, 0, :] == 1).all()  # the top rows (eyes, forehead) are known
    assert (mask[:, :, :, 5, 3:5] == 0).all()  # the mouth cells are to be rendered
    target = model.encode_frames(batch["target_frames"])
    known = mask.expand_as(target) > 0
    torch.testing.assert_close(seen["context"][known], target[known])
    training_step(model, batch, generator=torch.Generator().manual_seed(0), dub_context_prob=0.0)
    assert (seen["mask"] == 0).all()


def test_a_shared_reference_trains_like_the_same_reference_repeated():
    """Batch-1 reference broadcast over the batch == the reference given once per sample."""
    model = new_model(X_CONFIG.replace(reference_dropout=0.0), seed=2)
    for parameter in model.parameters():
        parameter.data.add_(torch.randn_like(parameter) * 0.05)
    shared = _batch(size=3, reference_batch=1)
    repeated = dict(shared, reference_frames=shared["reference_frames"].expand(3, -1, -1, -1, -1),
                    reference_audio=shared["reference_audio"].expand(3, -1, -1))
    loss_shared, _ = training_step(model, shared, generator=torch.Generator().manual_seed(7))
    grads_shared = torch.autograd.grad(loss_shared, list(model.parameters()), allow_unused=True)
    loss_repeated, _ = training_step(model, repeated, generator=torch.Generator().manual_seed(7))
    grads_repeated = torch.autograd.grad(loss_repeated, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss_shared, loss_repeated, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_shared, grads_repeated):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_person_clip_source_keeps_the_reference_out_of_the_targets_and_is_pure():
    frames = np.arange(120, dtype=np.uint8)[:, None, None, None].repeat(4, 1).repeat(4, 2).repeat(3, 3)  # frame i holds value i
    speech = np.arange(120, dtype=np.float32)[:, None].repeat(160, 1)
    source = PersonClipSource(frames, speech, batch_size=4, target_frames=10, reference_frames=30, device="cpu", seed=5)
    for step in range(5):
        batch = source.batch(step, 0, 1)
        targets = set((batch["target_frames"][..., 0, 0, 0] * 255).round().long().reshape(-1).tolist())
        reference = (batch["reference_frames"][0, :, 0, 0, 0] * 255).round().long().tolist()
        assert batch["reference_frames"].shape[:2] == (1, 30) and batch["target_frames"].shape[:2] == (4, 10)
        assert not targets & set(reference) and len(set(reference)) == 30
        assert batch["reference_audio"][0, :, 0].long().tolist() == reference  # speech stays aligned with frames
        again = source.batch(step, 0, 1)
        assert torch.equal(again["target_frames"], batch["target_frames"])


def test_finetune_full_and_lora_write_loadable_files(tmp_path):
    from sparse_avatar.model import load_checkpoint
    from sparse_avatar.training.lora import load_lora

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    speech = rng.standard_normal((40, 160)).astype(np.float32)
    updates = []
    model = new_model(X_CONFIG, seed=0)
    path = finetune_personality(model, crops, speech, tmp_path / "me.safetensors", steps=3, lora_rank=0, batch_size=2,
                                target_frames=4, reference_frames=8, log_every=1, progress=lambda s, n, loss: updates.append((s, loss)))
    assert [s for s, _ in updates] == [1, 2, 3] and all(loss is not None and np.isfinite(loss) for _, loss in updates)
    loaded = load_checkpoint(path)
    assert loaded.config == X_CONFIG and loaded.fingerprint() == model.fingerprint()
    base = new_model("tiny", seed=0)
    fingerprint = base.fingerprint()
    lora_path = finetune_personality(base, crops, speech, tmp_path / "lora.safetensors", steps=2, lora_rank=4, batch_size=2,
                                     target_frames=4, reference_frames=8)
    assert load_lora(new_model("tiny", seed=0).dit, lora_path, base_fingerprint=fingerprint)


def test_time_budget_stops_training(tmp_path):
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    speech = rng.standard_normal((40, 160)).astype(np.float32)
    steps = []
    finetune_personality(new_model(X_CONFIG, seed=0), crops, speech, tmp_path / "b.safetensors", steps=10_000, time_budget_s=1.0,
                         lora_rank=0, batch_size=2, target_frames=4, reference_frames=8, progress=lambda s, n, loss: steps.append(s))
    assert 1 <= steps[-1] < 10_000


def test_an_untrained_model_warns_once_when_it_renders(caplog):
    from sparse_avatar.model import extract_identity, render

    model = new_model("tiny", seed=11)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    identity = extract_identity(model, frames)
    features = rng.standard_normal((2, 160)).astype(np.float32)
    with caplog.at_level("WARNING"):
        render(model, identity, features, steps=1)
        render(model, identity, features, steps=1)
    warnings = [r for r in caplog.records if "never trained" in r.getMessage()]
    assert len(warnings) == 1
    caplog.clear()
    model.training_stage = "personality"
    with caplog.at_level("WARNING"):
        render(model, identity, features, steps=1)
    assert not [r for r in caplog.records if "never trained" in r.getMessage()]


def test_absolute_positions_tell_every_token_its_place():
    from sparse_avatar.model.dit import sincos_grid_embedding

    embedding = sincos_grid_embedding(8, 8, 128, "cpu")
    assert embedding.shape == (64, 128) and embedding.abs().max() <= 1.0
    distances = torch.cdist(embedding, embedding) + torch.eye(64) * 10
    assert distances.min() > 0.1  # no two (row, col) cells share an embedding
    config = X_CONFIG.replace(refiner_channels=0)
    with_positions, without = new_model(config.replace(absolute_positions=True), seed=5), new_model(config, seed=5)
    for model in (with_positions, without):
        torch.manual_seed(0)
        for parameter in model.parameters():
            parameter.data.add_(torch.randn_like(parameter) * 0.05)
    noisy = torch.zeros(1, 48, 1, 8, 8)  # every token the same: only a position can tell them apart
    audio = torch.zeros(1, 1, config.speech_feature_dim)
    out_with = with_positions.dit(noisy, torch.tensor([0.0]), audio, None, output="data")
    out_without = without.dit(noisy, torch.tensor([0.0]), audio, None, output="data")
    spread = lambda out: out[0, :, 0].reshape(48, 64).std(dim=1).mean()  # noqa: E731  (across token positions)
    assert spread(out_with) > 5 * spread(out_without)


def test_one_flow_loss_for_every_prediction_and_loss_space():
    from sparse_avatar.model.flow import flow_errors

    target = torch.zeros(2, 3, 1, 2, 2)
    noise = torch.ones_like(target)
    t = torch.tensor([0.999, 0.5])
    noisy = t.view(-1, 1, 1, 1, 1) * target + (1 - t.view(-1, 1, 1, 1, 1)) * noise
    off = 0.1  # every prediction is off by 0.1 in its own space
    # x-prediction, velocity loss: 0.1² / max(1 - t, 0.05)² -> bounded near clean (JiT's clamp)
    torch.testing.assert_close(flow_errors(X_CONFIG, target + off, target, noise, noisy, t), torch.tensor([4.0, 0.04]))
    torch.testing.assert_close(flow_errors(X_CONFIG.replace(loss_space="x"), target + off, target, noise, noisy, t), torch.tensor([0.01, 0.01]))
    v_config = get_config("tiny")
    torch.testing.assert_close(flow_errors(v_config, target - noise + off, target, noise, noisy, t), torch.tensor([0.01, 0.01]))
    # velocity prediction scored as clean data: the velocity error times (1 - t)
    torch.testing.assert_close(flow_errors(v_config.replace(loss_space="x"), target - noise + off, target, noise, noisy, t),
                               torch.tensor([(0.001 * off) ** 2, (0.5 * off) ** 2]))


def test_rope_and_rms_norm_match_their_plain_formulas():
    from sparse_avatar.model.dit import RMSNorm, apply_rope, rope_angles, rope_rotation, token_positions

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2 * 5 * 7, 16, generator=generator, requires_grad=True)
    angles = rope_angles(token_positions(2, 5, 7, "cpu"), 16, 10000.0)
    # Plain RoPE: each channel pair is a complex number turned by its angle.
    plain = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 70, 8, 2)) * torch.polar(torch.ones_like(angles), angles)).reshape(x.shape)
    fast = apply_rope(x, rope_rotation(angles))
    torch.testing.assert_close(fast, plain)
    # The arithmetic of the split-pairs-and-stack form it replaced, to the bit (trained weights
    # see the same rotation), in fp32 and through bf16.
    cos, sin = torch.cos(angles), torch.sin(angles)
    for values in (x.detach(), x.detach().to(torch.bfloat16)):
        pairs = values.float().unflatten(-1, (-1, 2))
        stacked = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos], dim=-1)
        assert torch.equal(apply_rope(values, rope_rotation(angles)), stacked.flatten(-2).to(values.dtype))
    (gx_fast,) = torch.autograd.grad(fast.square().sum(), x)
    (gx_plain,) = torch.autograd.grad(plain.square().sum(), x)
    torch.testing.assert_close(gx_fast, gx_plain)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    y = x.detach().to(torch.bfloat16)
    plain_norm = (y.float() * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight).to(torch.bfloat16)
    torch.testing.assert_close(norm(y), plain_norm, atol=1e-2, rtol=1e-2)
    assert norm(y).dtype == torch.bfloat16


def test_compiled_finetune_trains_like_eager_and_renders_uncompiled(tmp_path):
    """torch.compile stops at the sparse attention (a graph break, model/dit.py) and is undone
    after training, so the same model renders without recompiling."""
    rng = np.random.default_rng(2)
    crops = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    speech = rng.standard_normal((30, 160)).astype(np.float32)
    losses = {}
    for compiled in (False, True):
        model = new_model(X_CONFIG.replace(refiner_channels=0), seed=0)
        model.set_attention_backend("dense")
        record = []
        finetune_personality(model, crops, speech, tmp_path / f"c{compiled}.safetensors", steps=2, lora_rank=0, batch_size=2, target_frames=4,
                             reference_frames=8, log_every=1, compile=compiled, progress=lambda s, n, loss, record=record: record.append(loss))
        losses[compiled] = record
        assert all(getattr(block, "_compiled_call_impl", None) is None and "forward_reference" not in vars(block) for block in model.dit.blocks)
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-3)


def test_personalize_command_and_train_video_run_the_train_avatar_path(tmp_path, monkeypatch, capsys):
    """`personalize --video` and `train --config personality --video` both learn from a video
    file through training.personality.personalize_video and write a loadable personality model."""
    from conftest import CentreFaceDetector

    from sparse_avatar.cli import main
    from sparse_avatar.media import SPEECH_SAMPLE_RATE, face_track, write_video
    from sparse_avatar.model import load_checkpoint

    monkeypatch.setattr(face_track, "default_face_detector", CentreFaceDetector)  # synthetic frames have no real face
    rng = np.random.default_rng(0)
    frames = np.repeat(np.repeat(rng.integers(0, 255, (30, 16, 16, 3), dtype=np.uint8), 4, axis=1), 4, axis=2)
    t = np.arange(int(30 / 25 * SPEECH_SAMPLE_RATE)) / SPEECH_SAMPLE_RATE
    write_video(tmp_path / "me.mp4", frames, 25.0, audio=(0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32))
    # One step each (a step here is Train Avatar's batch: 8 x 16 frames + 48 reference frames):
    # the test is that both commands take this path and write a loadable personality model.
    common = ["--video", str(tmp_path / "me.mp4"), "--minutes", "0", "--steps", "1", "--device", "cpu"]
    # On a CPU both refuse unless asked, before any work, saying what it needs.
    assert main(["personalize", *common, "--config", "tiny", "--out", str(tmp_path / "refused.safetensors")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "refused.safetensors").exists()
    common.append("--allow-cpu")
    assert main(["personalize", *common, "--config", "tiny", "--out", str(tmp_path / "me.safetensors")]) == 0
    assert main(["train", "--config", "personality", "--model-config", "tiny", "--out", str(tmp_path / "run"), *common]) == 0
    for path in (tmp_path / "me.safetensors", tmp_path / "run" / "model.safetensors"):
        model = load_checkpoint(path)
        assert model.config.name == "tiny" and model.training_stage == "personality"


def test_a_failing_compile_falls_back_to_eager_training(tmp_path, monkeypatch, caplog):
    from sparse_avatar.training import personality

    class FakeCompileError(RuntimeError):
        pass

    FakeCompileError.__module__ = "torch._dynamo.exc"  # what torch.compile's failures look like
    real_objective = personality.personality_objective
    calls = []

    def objective(**kwargs):
        loss_fn = real_objective(**kwargs)

        def failing_first(*args):
            calls.append(1)
            if len(calls) == 1:
                raise FakeCompileError("no C compiler")
            return loss_fn(*args)

        return failing_first

    monkeypatch.setattr(personality, "personality_objective", objective)
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    speech = rng.standard_normal((30, 160)).astype(np.float32)
    model = new_model(X_CONFIG.replace(refiner_channels=0), seed=0)
    with caplog.at_level("WARNING"):
        path = finetune_personality(model, crops, speech, tmp_path / "f.safetensors", steps=2, lora_rank=0, batch_size=2, target_frames=4,
                                    reference_frames=8, compile=True)
    assert path.is_file() and "training without it" in caplog.text and len(calls) == 3


def test_a_job_killed_before_its_first_fit_resumes_with_a_fitted_warm_up_and_progress(tmp_path, monkeypatch):
    """A budgeted run stopped in its first steps (before the step count is fitted) kept the step
    limit's schedule (warm-up 100); the resumed run fits its warm-up to the budget like a fresh run,
    and reports progress against the budget from its first step (not against the limit of 10000).
    A fake clock: every step takes one second; the budget fits after 2 steps and every 5."""
    import types

    from sparse_avatar.training import budget as budget_module
    from sparse_avatar.training import personality, state_io

    clock = [0.0]

    def perf_counter():
        clock[0] += 1e-6
        return clock[0]

    fake_time = types.SimpleNamespace(perf_counter=perf_counter)
    monkeypatch.setattr(budget_module, "time", fake_time)
    monkeypatch.setattr(personality, "time", fake_time)
    monkeypatch.setattr(budget_module, "WARMUP_STEPS", 2)
    monkeypatch.setattr(budget_module, "REFIT_STEPS", 5)
    rng = np.random.default_rng(4)
    crops = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    speech = rng.standard_normal((30, 160)).astype(np.float32)
    reports = []

    def one_second_a_step(stop_after=None):
        def should_cancel():  # asked before every step
            clock[0] += 1.0
            return stop_after is not None and len(reports) >= stop_after
        return should_cancel

    kwargs = {"steps": 10_000, "time_budget_s": 20.0, "lora_rank": 0, "batch_size": 1, "target_frames": 4, "reference_frames": 4,
              "work_dir": tmp_path / "job", "progress": lambda step, total, loss: reports.append((step, total))}
    config = X_CONFIG.replace(refiner_channels=0, depth=1)
    finetune_personality(new_model(config, seed=0), crops, speech, tmp_path / "a.safetensors", should_cancel=one_second_a_step(3), **kwargs)
    kept = state_io.read_trainer_state(state_io.latest_checkpoint(tmp_path / "job"))
    assert kept["step"] == 3 and kept["config"]["warmup_steps"] == 100 and kept["schedule_fitted"] is False
    assert reports[0] == (1, 20)  # 1 s of 20 from the first step
    reports.clear()
    finetune_personality(new_model(config, seed=0), crops, speech, tmp_path / "b.safetensors", should_cancel=one_second_a_step(), **kwargs)
    assert reports[0] == (4, 16)  # 5 s of the 20 used (4 kept): a quarter
    final = state_io.read_trainer_state(state_io.latest_checkpoint(tmp_path / "job"))
    assert final["schedule_fitted"] is True and final["config"]["warmup_steps"] == max(1, final["config"]["total_steps"] // 10)
    assert 17 <= final["step"] <= 21 and reports[-1] == (final["step"], final["step"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (the CPU suite checks that asking for them on a CPU trains eagerly)")
def test_cuda_graph_steps_train_like_eager_steps(tmp_path, monkeypatch):
    """The personality step replayed as a CUDA graph trains as the eager step does: the graph's
    generator is re-seeded per step as eager re-seeds its own, and lr lives on the device. The
    GPU's own run-to-run noise (atomics in the attention backward, which Adam's normalised
    update turns into weight differences of the order of lr) is measured by a second eager run,
    and what wrong random numbers do by an eager run with another seed: graphs may differ from
    eager by no more than a few times the first, or a fiftieth of the second. (The eager-again
    floor alone is too noisy a scale: 7.4e-5 and 2.1e-4 in two H200 runs, graphs 3.4e-4 in both;
    another seed 5.5e-2 on a CPU.)"""
    from sparse_avatar.training import trainer as trainer_module

    captured = []
    real_capture = trainer_module._StepGraphs.capture

    def counting_capture(self, key, batch, work):
        entry = real_capture(self, key, batch, work)
        captured.append(key)
        return entry

    monkeypatch.setattr(trainer_module._StepGraphs, "capture", counting_capture)
    rng = np.random.default_rng(4)
    crops = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    speech = rng.standard_normal((40, 160)).astype(np.float32)
    losses, weights = {}, {}
    for run, graphs, seed in (("eager", False, 0), ("eager again", False, 0), ("graphs", True, 0), ("other seed", False, 1)):
        model = new_model(X_CONFIG.replace(refiner_channels=0), seed=0, device="cuda")
        record = []
        finetune_personality(model, crops, speech, tmp_path / "out.safetensors", steps=12, lora_rank=0, batch_size=2, target_frames=4,
                             reference_frames=8, log_every=1, compile=False, cuda_graphs=graphs, seed=seed,
                             progress=lambda s, n, loss, record=record: record.append(loss))
        losses[run] = np.array(record)
        weights[run] = {name: value.detach().float().cpu() for name, value in model.state_dict().items()}
    assert captured, "the graphed run never captured a step: it compared eager with eager"

    def weight_difference(run):
        # Relative L2 over all weights: the largest single difference is one Adam sign flip and
        # too noisy to compare; the whole vector's distance is not.
        squares = sum((weights[run][name] - value).pow(2).sum().item() for name, value in weights["eager"].items())
        return (squares / sum(value.pow(2).sum().item() for value in weights["eager"].values())) ** 0.5

    def loss_difference(run):
        return float(np.abs(losses[run] - losses["eager"]).max())

    floor_w, graph_w, wrong_w = (weight_difference(run) for run in ("eager again", "graphs", "other seed"))
    floor_l, graph_l, wrong_l = (loss_difference(run) for run in ("eager again", "graphs", "other seed"))
    print(f"relative weight distance to eager: eager again {floor_w:.3g}, graphs {graph_w:.3g}, other seed {wrong_w:.3g}; "
          f"largest loss difference: {floor_l:.3g}, {graph_l:.3g}, {wrong_l:.3g}")
    assert graph_w <= max(3 * floor_w, wrong_w / 50), (graph_w, floor_w, wrong_w)
    assert graph_l <= max(3 * floor_l + 1e-5 * float(np.abs(losses["eager"]).max()), wrong_l / 50), (graph_l, floor_l, wrong_l)
