"""Model pieces on the tiny config: configs, codecs, DiT shapes/dtypes, sparse = dense when every
reference block is selected, samplers, identity files, checkpoint files and their errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sparse_avatar.errors import UserFacingError
from sparse_avatar.model import (
    CONFIGS,
    ComfyVAECodec,
    PixelCodec,
    SamplingCancelled,
    codec_for_config,
    extract_identity,
    get_config,
    load_checkpoint,
    load_identity,
    mix_identity,
    new_model,
    resolve_checkpoint,
    sample_flow,
    save_checkpoint,
    save_identity,
    training_step,
)
from sparse_avatar.model import dit as dit_module
from sparse_avatar.model.dit import AvatarDiT
from sparse_avatar.model.pipeline import chunk_plan


@pytest.fixture(autouse=True)
def one_thread():
    # The CI box has 2 cores shared by several test processes: one thread avoids oversubscription.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    return new_model("tiny", seed=0).eval()


def random_frames(count, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def random_features(count, dim, seed=0):
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


# -- configs ------------------------------------------------------------------------------------

def test_configs_are_data_and_sizes_are_as_documented():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in AvatarDiT(config).parameters()) for name, config in CONFIGS.items()}
    assert counts["tiny"] < 2_000_000
    assert counts["tiny"] < counts["small"] < counts["base"] < counts["xl"]
    assert 1_000_000_000 <= counts["xl"] <= 2_000_000_000
    # The shipped default must fit the 40 MB a Manager-cloned repository can carry (bf16).
    assert counts["compact"] * 2 <= 40_000_000 and counts["compact"] < counts["small"]
    for config in CONFIGS.values():
        assert type(config).from_json(config.to_json()) == config
        if config.name not in ("tiny", "compact"):
            assert config.group_size == 4
    with pytest.raises(UserFacingError, match="unknown model config"):
        get_config("huge")
    with pytest.raises(UserFacingError, match="multiple of kv_heads"):
        get_config("tiny").replace(kv_heads=3)


def test_speech_feature_constants_mirror_media():
    from sparse_avatar.media import features

    config = get_config("tiny")
    assert config.speech_feature_dim == features.SPEECH_FEATURE_DIM
    assert config.speech_feature_id == features.SPEECH_FEATURE_ID


# -- codecs -------------------------------------------------------------------------------------

def test_pixel_codec_round_trip_is_exact():
    codec = PixelCodec(4)
    frames = torch.from_numpy(random_frames(3, 32)).float()[None] / 255.0
    latents = codec.encode(frames)
    assert latents.shape == (1, 48, 3, 8, 8)
    assert latents.min() >= -1 and latents.max() <= 1
    assert torch.allclose(codec.decode(latents), frames, atol=1e-6)
    with pytest.raises(UserFacingError, match="divisible"):
        codec.encode(torch.rand(1, 2, 30, 32, 3))


class FakeImageVAE:
    """Duck-typed like ComfyUI's VAE: 4 latent channels, /8, encode [N,H,W,3] -> [N,4,h,w]."""

    latent_channels = 4
    downscale_ratio = 8

    def encode(self, pixels):
        n, h, w, _ = pixels.shape
        pooled = torch.nn.functional.avg_pool2d(pixels.permute(0, 3, 1, 2), 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)

    def decode(self, latents):
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=8).permute(0, 2, 3, 1)


def test_comfy_vae_codec_adapts_and_mismatch_is_refused():
    codec = ComfyVAECodec(FakeImageVAE())
    assert codec.id == "comfy-vae:FakeImageVAE:c4:s8:t1"
    frames = torch.rand(2, 3, 16, 16, 3)
    latents = codec.encode(frames)
    assert latents.shape == (2, 4, 3, 2, 2)
    assert codec.decode(latents).shape == (2, 3, 16, 16, 3)
    vae_config = get_config("tiny").replace(latent_codec=codec.id, latent_channels=4)
    assert codec_for_config(vae_config, FakeImageVAE()).id == codec.id
    with pytest.raises(UserFacingError, match="connect the matching VAE"):
        codec_for_config(vae_config)
    with pytest.raises(UserFacingError, match="was trained in"):
        codec_for_config(vae_config.replace(latent_codec="comfy-vae:WanVAE:c4:s8:t1"), FakeImageVAE())
    with pytest.raises(UserFacingError, match="was trained in"):
        codec_for_config(get_config("tiny"), PixelCodec(2))


# -- DiT ------------------------------------------------------------------------------------------

def _inputs(model, frames=3, reference_frames=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    latents = torch.randn(1, config.latent_channels, frames, 8, 8, generator=generator)
    reference = torch.randn(1, config.latent_channels, reference_frames, 8, 8, generator=generator)
    audio = torch.randn(1, frames, config.speech_feature_dim, generator=generator)
    reference_audio = torch.randn(1, reference_frames, config.speech_feature_dim, generator=generator)
    return latents, reference, audio, reference_audio


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_shapes_and_dtypes_through_every_path(tiny, dtype):
    model = new_model("tiny", seed=1, dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]).eval()
    latents, reference, audio, reference_audio = _inputs(model)
    latents, reference = latents.to(dtype), reference.to(dtype)
    with torch.no_grad():
        kv = model.dit.encode_reference(reference, reference_audio)
        caches = model.dit.layer_caches(kv)
        config = model.config
        assert len(caches) == config.depth
        assert caches[0].ref_k.shape == (1, config.kv_heads, 5 * 64, config.head_dim)
        assert caches[0].static_k.shape == (1, config.kv_heads, config.static_tokens, config.head_dim)
        assert caches[0].centroids.shape == (1, config.kv_heads, 5, config.head_dim)
        silent = model.dit.encode_reference(reference, None)  # a reference without sound
        mask = torch.zeros_like(latents[:, :1])
        mask[:, :, 0] = 1
        for kwargs in ({}, {"context_latents": latents, "context_mask": mask}):
            for layer_caches in (caches, None, model.dit.layer_caches(silent)):
                out = model.dit(latents, torch.full((1,), 0.3), audio, layer_caches, audio_keep=torch.tensor([False]), **kwargs)
                assert out.shape == latents.shape and out.dtype == dtype
                assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("with_audio", [True, False])
def test_reference_pass_in_chunks_equals_the_whole_pass(tiny, with_audio, monkeypatch):
    """The reference pass in chunks of frames (what bounds its GPU memory on long references) is
    the whole pass: same K/V, and extract_identity's per-layer caches equal layer_caches'."""
    model = new_model("tiny", seed=3).eval()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (13, model.config.frame_size, model.config.frame_size, 3), dtype=np.uint8)
    speech = rng.standard_normal((13, model.config.speech_feature_dim)).astype(np.float32) if with_audio else None
    latents = model.encode_frames(model.frames_to_tensor(frames)[None])
    audio = model.features_to_tensor(speech, 13)[None] if with_audio else None
    with torch.no_grad():
        whole = model.dit.encode_reference(latents, audio)
        tokens_per_frame = whole[0][0].shape[2] // 13
        for chunk_tokens in (1, tokens_per_frame, 4 * tokens_per_frame, 5 * tokens_per_frame + 3, 10**9):
            parts = model.dit.encode_reference(latents, audio, chunk_tokens=chunk_tokens, store_device="cpu")
            for (k, v), (k2, v2) in zip(whole, parts):
                torch.testing.assert_close(k2, k, rtol=0, atol=1e-6)
                torch.testing.assert_close(v2, v, rtol=0, atol=1e-6)
        expected = model.dit.layer_caches(whole)
    monkeypatch.setattr("sparse_avatar.model.identity.REFERENCE_CHUNK_TOKENS", 3 * tokens_per_frame)  # several chunks
    identity = extract_identity(model, frames, speech)
    for name in ("static_k", "static_v", "ref_k", "ref_v", "centroids"):
        torch.testing.assert_close(getattr(identity, name), torch.stack([getattr(cache, name) for cache in expected]), rtol=0, atol=1e-6)


def test_training_step_gives_gradients_to_every_parameter():
    model = new_model("tiny", seed=2).train()
    torch.manual_seed(0)
    for parameter in model.parameters():  # move off the zero init (adaLN-Zero gates block gradients)
        parameter.data.add_(torch.randn_like(parameter) * 0.05)
    dim = model.config.speech_feature_dim
    batch = {
        "target_frames": torch.rand(2, 4, 32, 32, 3), "target_audio": torch.randn(2, 4, dim),
        "reference_frames": torch.rand(2, 4, 32, 32, 3), "reference_audio": torch.randn(2, 4, dim),
    }
    model.config = model.config.replace(audio_dropout=0.0, reference_dropout=0.0)
    loss, metrics = training_step(model, batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert set(metrics) >= {"loss", "flow_loss", "static_consistency"} and metrics["static_consistency"] > 0
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert no_grad == ["dit.speech_embedder.null_audio"], no_grad  # only used when audio is dropped
    model.zero_grad()
    model.config = model.config.replace(audio_dropout=1.0)
    training_step(model, batch, generator=torch.Generator().manual_seed(0))[0].backward()
    assert torch.any(model.dit.speech_embedder.null_audio.grad != 0)


def _dense_attention(q, k, v, static_k=None, static_v=None, ref_k=None, ref_v=None, ref_lengths=None, **_):
    """Plain softmax over [clip; static; valid reference] keys: the meaning of the sparse op."""
    group = q.shape[1] // (ref_k.shape[1] if ref_k is not None else static_k.shape[1])
    keys, values = [k], [v]
    for extra_k, extra_v in ((static_k, static_v), (ref_k, ref_v)):
        if extra_k is not None:
            keys.append(extra_k.repeat_interleave(group, dim=1))
            values.append(extra_v.repeat_interleave(group, dim=1))
    keys, values = torch.cat(keys, 2).float(), torch.cat(values, 2).float()
    scores = q.float() @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5
    if ref_lengths is not None and ref_k is not None:
        positions = torch.arange(keys.shape[2])
        start = keys.shape[2] - ref_k.shape[2]
        invalid = (positions[None] >= start + ref_lengths[:, None])[:, None, None]
        scores = scores.masked_fill(invalid, float("-inf"))
    return (scores.softmax(-1) @ values).to(q.dtype)


def test_sparse_path_equals_dense_attention_when_every_block_is_selected(monkeypatch):
    model = new_model(get_config("tiny").replace(top_k=16), seed=3).eval()
    torch.manual_seed(0)
    for parameter in model.parameters():  # leave the zero init so every branch matters
        parameter.data.add_(torch.randn_like(parameter) * 0.05)
    model.set_attention_backend("naive")
    latents, reference, audio, reference_audio = _inputs(model, frames=3, reference_frames=5)
    with torch.no_grad():
        caches = model.dit.layer_caches(model.dit.encode_reference(reference, reference_audio))
        sparse = model.dit(latents, torch.full((1,), 0.5), audio, caches)
        monkeypatch.setattr(dit_module, "sparse_reference_attention", _dense_attention)
        dense = model.dit(latents, torch.full((1,), 0.5), audio, caches)
    assert torch.allclose(sparse, dense, atol=1e-4, rtol=1e-4), (sparse - dense).abs().max()
    # ... and with fewer blocks than the reference has, the result really differs (routing is live).
    monkeypatch.undo()
    model.config = model.dit.config = model.config.replace(top_k=1)
    for block in model.dit.blocks:
        block.config = model.config
    with torch.no_grad():
        routed = model.dit(latents, torch.full((1,), 0.5), audio, caches)
    assert not torch.allclose(routed, dense, atol=1e-4)


# -- samplers -------------------------------------------------------------------------------------

def _gaussian_flow(mean: float, std: float):
    """Exact velocity of the flow from N(0, 1) noise to N(mean, std²) data (smooth on [0, 1]);
    its ODE maps noise z to mean + std·z."""

    def velocity(x, t):
        t = t.double().view(-1, 1, 1, 1, 1)
        covariance = t * std**2 - (1 - t)
        variance = t**2 * std**2 + (1 - t) ** 2
        return (mean + covariance / variance * (x.double() - t * mean)).float()

    return velocity


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m"])
def test_samplers_solve_a_known_flow_and_higher_order_is_more_accurate(sampler):
    noise = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    velocity = _gaussian_flow(0.7, 0.3)
    exact = 0.7 + 0.3 * noise
    out = sample_flow(velocity, noise, steps=50, sampler=sampler, shift=2.0)
    # euler is first order; heun second order; dpmpp_2m second order except its final
    # data-prediction step, which leaves an O(last step) error (as in k-diffusion).
    assert torch.allclose(out, exact, atol={"euler": 6e-2, "heun": 2e-3, "dpmpp_2m": 1e-2}[sampler])
    error = {name: (sample_flow(velocity, noise, steps=20, sampler=name) - exact).abs().max() for name in ("euler", sampler)}
    if sampler != "euler":
        assert error[sampler] < error["euler"] / 3
    one_step = sample_flow(velocity, noise, steps=1, sampler=sampler)
    assert one_step.shape == noise.shape and torch.isfinite(one_step).all()


def test_sampler_known_region_cancel_and_argument_errors():
    target = torch.zeros(1, 2, 2, 2, 2)
    known = torch.randn(1, 2, 2, 2, 2)
    mask = torch.zeros(1, 1, 2, 2, 2)
    mask[:, :, 0] = 1
    out = sample_flow(lambda x, t: -x, torch.randn_like(target), steps=4, known=(known, mask))
    assert torch.equal(out[:, :, 0], known[:, :, 0])
    calls = []
    with pytest.raises(SamplingCancelled):
        sample_flow(lambda x, t: x, target, steps=5, on_step=lambda i, n, x: calls.append(i), should_cancel=lambda: len(calls) >= 2)
    assert calls == [0, 1]
    with pytest.raises(UserFacingError, match="steps"):
        sample_flow(lambda x, t: x, target, steps=0)
    with pytest.raises(UserFacingError, match="sampler"):
        sample_flow(lambda x, t: x, target, steps=2, sampler="ddim")


def test_chunk_plan_makes_every_frame_once():
    for total in (1, 15, 16, 17, 100, 750):
        plan = chunk_plan(total, 16, 4)
        made = [frame for start, end, known in plan for frame in range(start + known, end)]
        assert made == list(range(total))
        assert all(known == (4 if index else 0) for index, (_, _, known) in enumerate(plan))
    with pytest.raises(UserFacingError, match="overlap"):
        chunk_plan(10, 4, 4)


# -- identity -------------------------------------------------------------------------------------

def test_identity_save_load_is_exact_and_mix_takes_static_from_a(tiny, tmp_path):
    dim = tiny.config.speech_feature_dim
    a = extract_identity(tiny, random_frames(6, seed=1), random_features(6, dim, seed=1), fps=25, metadata={"source_hash": "aaa"})
    b = extract_identity(tiny, random_frames(9, seed=2), None, fps=30, metadata={"source_hash": "bbb"})
    path = save_identity(a, tmp_path / "a.safetensors")
    loaded = load_identity(path)
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, loaded.tensors()[name]) and tensor.dtype == loaded.tensors()[name].dtype, name
    assert loaded.metadata["source_hash"] == "aaa" and loaded.fps == 25.0
    assert loaded.metadata["model_fingerprint"] == tiny.fingerprint()
    mixed = mix_identity(a, b)
    assert torch.equal(mixed.static_k, a.static_k) and torch.equal(mixed.ref_k, b.ref_k) and torch.equal(mixed.centroids, b.centroids)
    assert mixed.metadata["static_source_hash"] == "aaa" and mixed.metadata["dynamic_source_hash"] == "bbb"
    other = extract_identity(new_model("tiny", seed=9), random_frames(3), None)
    with pytest.raises(UserFacingError, match="different models"):
        mix_identity(a, other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserFacingError, match="not a readable"):
        load_identity(tmp_path / "bad.safetensors")
    with pytest.raises(UserFacingError, match="not found"):
        load_identity(tmp_path / "missing.safetensors")


# -- checkpoints -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_checkpoint_round_trip_in_every_dtype(tiny, tmp_path, dtype):
    path = save_checkpoint(tiny, tmp_path / f"tiny-{dtype}.safetensors", dtype=dtype)
    loaded = load_checkpoint(path, dtype=dtype)
    expected_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for (name, original), restored in zip(tiny.dit.state_dict().items(), loaded.dit.state_dict().values()):
        assert restored.dtype == expected_dtype
        assert torch.equal(original.to(expected_dtype), restored), name
    assert loaded.config == tiny.config
    if dtype == "fp32":
        assert loaded.fingerprint() == tiny.fingerprint()


def test_checkpoint_errors_are_clear(tiny, tmp_path):
    from safetensors.torch import save_file

    good = save_checkpoint(tiny, tmp_path / "good.safetensors")
    metadata_of_good = dict(__import__("safetensors").safe_open(str(good), "pt").metadata())
    state = {name: tensor.contiguous() for name, tensor in tiny.dit.state_dict().items()}

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something-else"})
    with pytest.raises(UserFacingError, match="not a sparse-avatar model checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")

    partial = dict(state)
    partial.pop(next(iter(partial)))
    save_file(partial, str(tmp_path / "missing.safetensors"), metadata=metadata_of_good)
    with pytest.raises(UserFacingError, match="missing 1 weights"):
        load_checkpoint(tmp_path / "missing.safetensors")

    wider = json.loads(metadata_of_good["config"])
    wider["hidden"] = 256
    save_file(state, str(tmp_path / "incompatible.safetensors"), metadata={**metadata_of_good, "config": json.dumps(wider)})
    with pytest.raises(UserFacingError, match="incompatible|has shape"):
        load_checkpoint(tmp_path / "incompatible.safetensors")
    with pytest.raises(UserFacingError, match="differs from the expected"):
        load_checkpoint(good, expected_config="small")

    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserFacingError, match="damaged|truncated"):
        load_checkpoint(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserFacingError, match="not a readable"):
        load_checkpoint(tmp_path / "garbage.safetensors")
    with pytest.raises(UserFacingError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(UserFacingError, match=r"\.safetensors"):
        save_checkpoint(tiny, tmp_path / "model.pt")


def test_resolve_checkpoint_finds_files_and_never_downloads_offline(tiny, tmp_path, monkeypatch):
    path = save_checkpoint(tiny, tmp_path / "avatar-tiny.safetensors")
    assert resolve_checkpoint(str(path)) == path
    assert resolve_checkpoint("avatar-tiny", tmp_path) == path
    with pytest.raises(UserFacingError, match="not on disk"):
        resolve_checkpoint("someone/avatar-model", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserFacingError, match="offline"):
        resolve_checkpoint("someone/avatar-model", tmp_path, allow_download=True)
    with pytest.raises(UserFacingError, match="not found"):
        resolve_checkpoint("no such thing!", tmp_path)
    # Online but without the optional package: say which package, never an ImportError.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(UserFacingError, match="needs the 'huggingface_hub' package"):
        resolve_checkpoint("someone/avatar-model", tmp_path, allow_download=True)


def test_cli_init_checkpoint_writes_a_loadable_file(tmp_path):
    out = tmp_path / "tiny.safetensors"
    result = subprocess.run([sys.executable, "-m", "sparse_avatar", "init-checkpoint", "--config", "tiny", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(out).config.name == "tiny"
    bad = subprocess.run([sys.executable, "-m", "sparse_avatar", "init-checkpoint", "--config", "giant", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model config" in bad.stderr


def test_dub_forces_the_reference_blocks_of_the_source_frames(monkeypatch):
    from sparse_avatar.model import render
    from sparse_avatar.model.pipeline import aligned_reference_blocks

    # 64 tokens per frame, blocks of 128: frames 2k and 2k+1 share block k.
    forced = aligned_reference_blocks(np.array([5, 0, 3]), 64, 128, 6 * 64)
    assert forced.tolist() == [[[[0, 2], [1, -1]]]]
    model = new_model("tiny", seed=8).eval()
    source = random_frames(6, seed=3)
    identity = extract_identity(model, source, None)
    features = random_features(5, model.config.speech_feature_dim)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("forced_blocks"))
        return real(*args, **kwargs)

    real = dit_module.sparse_reference_attention
    monkeypatch.setattr(dit_module, "sparse_reference_attention", spy)
    render(model, identity, features, mode="dub", dub_frames=source, dub_reference_frames=np.array([4, 5, 4, 3, 2]), steps=1, chunk_frames=5, overlap_frames=0)
    assert seen and all(blocks is not None and blocks[0, 0, :, 0].tolist() == [4, 5, 4, 3, 2] for blocks in seen)


def test_mouth_weighted_flow_loss_is_the_weighted_mean_and_one_is_the_plain_mean():
    from sparse_avatar.model.flow import flow_errors, mouth_cell_weights
    from sparse_avatar.model.masks import dub_mask, known_cells

    model = new_model("tiny", seed=0)
    config = model.config.replace(prediction="x", loss_space="x")
    assert mouth_cell_weights(model) is None  # weight 1: the plain mean, nothing built
    weights = mouth_cell_weights(model, weight=4.0)
    region = 1.0 - known_cells(torch.from_numpy(dub_mask(config.frame_size)), model.codec.spatial_factor)
    assert weights.shape == (1, 1, 1, *region.shape) and 0 < region.mean() < 0.5
    torch.testing.assert_close(weights[0, 0, 0], 1 + 3 * region)
    generator = torch.Generator().manual_seed(0)
    shape = (2, model.config.latent_channels, 3, *region.shape)
    predicted, target = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    noise, t = torch.randn(shape, generator=generator), torch.rand(2, generator=generator)
    plain = flow_errors(config, predicted, target, noise, target, t)
    torch.testing.assert_close(plain, (predicted - target).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(flow_errors(config, predicted, target, noise, target, t, torch.ones_like(weights)), plain)
    squared = (predicted - target).pow(2)
    inside = (squared * region).sum(dim=(1, 2, 3, 4)) / (region.sum() * shape[1] * shape[2])
    outside = (squared * (1 - region)).sum(dim=(1, 2, 3, 4)) / ((1 - region).sum() * shape[1] * shape[2])
    share = 4 * region.mean() / (4 * region.mean() + (1 - region.mean()))  # the mouth's share of the weight
    torch.testing.assert_close(flow_errors(config, predicted, target, noise, target, t, weights), share * inside + (1 - share) * outside)
    with pytest.raises(UserFacingError, match="must be positive"):
        mouth_cell_weights(model, weight=0.0)
