"""Where a compiled training step's GPU time goes, piece by piece (issue "Training speed").

    python bench/step_probe.py --out DIR [--variants model,stacked] [--batch 16] [--sweep]

For each RoPE variant (``--variants``; each one a fresh torch.compile): the stage-2 training step
of ``small`` (``model.flow.training_step`` at 128², batch × 16 target frames, 48 reference frames,
bf16 autocast, blocks compiled as ``TrainerConfig.compile`` does) timed over 10 steps after 4
warm-up steps, then 2 profiled steps (kernel table by self CUDA time; ``--timed-steps``,
``--warmup-steps``, ``--profile-steps``). The model's RoPE functions are put back after each
variant. ``--sweep``: the fused sparse attention's tiles at the same step's attention shape,
forward and forward + backward.
Writes ``DIR/step_probe.{json,md}`` and ``DIR/step_probe_<variant>.txt``. On a CPU
(``--device cpu --config tiny --no-compile``) it checks its own code path; the numbers mean nothing there.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import _checkout  # noqa: F401  (sparse_avatar importable from a bare checkout)


def make_batch(batch: int, frames: int, reference_frames: int, size: int, feature_dim: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(0)
    return {
        "target_frames": torch.rand(batch, frames, size, size, 3, generator=generator).to(device),
        "target_audio": torch.randn(batch, frames, feature_dim, generator=generator).to(device),
        "reference_frames": torch.rand(batch, reference_frames, size, size, 3, generator=generator).to(device),
        "reference_audio": torch.randn(batch, reference_frames, feature_dim, generator=generator).to(device),
    }


def seed_keeping_reference(config, device) -> int:
    from sparse_avatar.model.flow import keeps_reference

    for seed in range(1000):
        if keeps_reference(config, torch.Generator(device=device).manual_seed(seed)):
            return seed
    raise RuntimeError("no seed keeps the reference")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, steps: int) -> float:
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - started) / steps


def probe_variant(variant: str, args, out: Path) -> dict:
    import torch._dynamo

    from sparse_avatar.model import dit as dit_module

    torch._dynamo.reset()
    model_rope = dit_module.apply_rope, dit_module.rope_rotation
    dit_module.apply_rope, dit_module.rope_rotation = ROPE_VARIANTS[variant]
    try:
        return _probe_step(variant, args, out)
    finally:
        dit_module.apply_rope, dit_module.rope_rotation = model_rope


def _probe_step(variant: str, args, out: Path) -> dict:
    from sparse_avatar.model.checkpoint import new_model
    from sparse_avatar.model.flow import training_step
    from sparse_avatar.training.objectives import StepModule, model_flow_objective
    from sparse_avatar.training.trainer import compile_blocks

    device = args.device
    avatar = new_model(args.config).to(device)
    step_module = StepModule(avatar, model_flow_objective(per_sample=False))
    if args.compile:
        compile_blocks(step_module)
    batch = make_batch(args.batch, 16, 48, avatar.config.frame_size, avatar.config.speech_feature_dim, device)
    seed = seed_keeping_reference(avatar.config, device)
    parameters = [p for p in avatar.parameters() if p.requires_grad]

    def step():
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device != "cpu"):
            loss, _ = training_step(avatar, batch, generator=generator)
        loss.backward()
        for p in parameters:
            p.grad = None

    started = time.perf_counter()
    for _ in range(args.warmup_steps):
        step()
    synchronize()
    warmup_s = time.perf_counter() - started
    seconds = time_steps(step, args.timed_steps)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(args.profile_steps):
            step()
        synchronize()
    events = prof.key_averages()
    shapes = prof.key_averages(group_by_input_shape=True)
    (out / f"step_probe_{variant}.txt").write_text(
        f"{variant}: {seconds * 1e3:.1f} ms/step (eager steps, {'compiled' if args.compile else 'uncompiled'} blocks), batch {args.batch}, {args.profile_steps} profiled steps\n\n"
        + events.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=110)
        + "\n\ncopies and fills by input shape:\n"
        + "\n".join(
            f"{e.key:<22} {str(e.input_shapes)[:150]:<150} calls {e.count:5d} cuda {e.self_device_time_total / 1e3:8.2f} ms"
            for e in sorted(shapes, key=lambda e: -e.self_device_time_total)
            if e.key in ("aten::copy_", "aten::fill_", "aten::zero_", "aten::clone", "aten::contiguous", "aten::cat")
        )[:20000]
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None
    del avatar, step_module
    if device != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"variant": variant, "ms_per_step": seconds * 1e3, "warmup_s": warmup_s, "peak_memory_gb": peak, "batch": args.batch}


def attention_sweep(args, lq: int = 16 * 256, lr: int = 48 * 256, configs_per_kernel: int | None = None, reps: int = 10) -> list[dict]:
    """The fused kernel's tiles at the `small` step's clip attention: B, H=8, Hkv=2, d=64, S=32,
    Lq=16·256, Lr=48·256, k=8 blocks of 128. Each row: one kernel's tiles changed, the others
    at their defaults; mean wall time of `reps` synchronised calls after up to 2 untimed ones."""
    from sparse_avatar.sparse_attention import triton_fused
    from sparse_avatar.sparse_attention.routing import block_centroids, select_reference_blocks

    batch, heads, kv_heads, d, static = args.batch, 8, 2, 64, 32
    device = args.device
    dtype = torch.bfloat16 if device != "cpu" else torch.float16  # the interpreter's bf16 is wrong
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=g, dtype=dtype).requires_grad_()

    q, k, v = rand(batch, heads, lq, d), rand(batch, heads, lq, d), rand(batch, heads, lq, d)
    sk, sv = rand(batch, kv_heads, static, d), rand(batch, kv_heads, static, d)
    rk, rv = rand(batch, kv_heads, lr, d), rand(batch, kv_heads, lr, d)
    lengths = torch.full((batch,), lr, device=device, dtype=torch.int32)
    with torch.no_grad():
        indices = select_reference_blocks(q, block_centroids(rk, lengths, 128), lengths, 128, 8, None)
    grad = torch.randn(batch, heads, lq, d, device=device, generator=g, dtype=dtype)
    original = triton_fused._tile_config
    kernels = {"fwd": triton_fused._FORWARD_CONFIG, "dq": triton_fused._DQ_CONFIG, "dkdv": triton_fused._DKDV_CONFIG}

    def run(backward: bool):
        out, lse = triton_fused.fused_sparse_attention(q, k, v, sk, sv, rk, rv, lengths, indices, 128, None)
        if backward:
            torch.autograd.grad(out, (q, k, v, sk, sv, rk, rv), grad)

    def timed(backward: bool) -> float:
        for _ in range(min(2, reps)):
            run(backward)
        return 1e3 * time_steps(lambda: run(backward), reps)

    rows = [{"kernel": "defaults", "fwd_ms": timed(False), "fwd_bwd_ms": timed(True)}]
    print(json.dumps(rows[-1]), flush=True)
    candidates = {
        "fwd": [(m, n, w, s) for m in (64, 128) for n in (64, 128) for w in (4, 8) for s in (2, 3, 4) if not (m == 64 and w == 8)],
        "dq": [(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3) if not (m == 64 and w == 8)],
        "dkdv": [(m, n, w, s) for m in (32, 64, 128) for n in (64, 128) for w in (4, 8) for s in (2, 3) if not (n == 64 and w == 8 and m < 64)],
    }
    if args.sweep_configs:  # "dq:128,64,4,3;fwd:64,64,4,4": only these
        candidates = {}
        for item in args.sweep_configs.split(";"):
            kernel, _, numbers = item.partition(":")
            candidates.setdefault(kernel, []).append(tuple(int(n) for n in numbers.split(",")))
    for kernel, configs in candidates.items():
        for m, n, w, s in configs[:configs_per_kernel]:
            chosen = {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}

            def patched(base, block_size, head_dim, dtype, small_head=None, _kernel=kernel, _chosen=chosen):
                if base is kernels[_kernel]:
                    return dict(_chosen)
                return original(base, block_size, head_dim, dtype, small_head)

            triton_fused._tile_config = patched
            try:
                row = {"kernel": kernel, **chosen, "fwd_ms": timed(False), "fwd_bwd_ms": timed(True)}
            except Exception as error:  # out of shared memory and the like
                row = {"kernel": kernel, **chosen, "error": f"{type(error).__name__}: {str(error)[:200]}"}
            finally:
                triton_fused._tile_config = original
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------- RoPE candidates
def _rope_rotation_pairs(angles):
    return torch.cos(angles), torch.sin(angles)


def _apply_rope_pairs(x, rotation):
    cos, sin = rotation
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def _model_rope():
    from sparse_avatar.model import dit

    return dit.apply_rope, dit.rope_rotation


# "stacked": the form model/dit.py had before (split the pairs, stack the two results);
# "model": model/dit.py's apply_rope / rope_rotation as they are (pair swap, signed sin).
ROPE_VARIANTS = {"stacked": (_apply_rope_pairs, _rope_rotation_pairs), "model": _model_rope()}


def write_table(result: dict, out: Path) -> str:
    """DIR/step_probe.md: ms/step per RoPE form, and the fastest tiles per kernel of the sweep."""
    lines = [f"# Training step probe — {result['device']} (torch {result['torch']})", "",
             "| RoPE form | batch | ms/step | warm-up s | peak GB |", "|---|---|---|---|---|"]
    for row in result["steps"]:
        if "error" in row:
            lines.append(f"| {row['variant']} | | failed: {row['error']} | | |")
            continue
        peak = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] is not None else "n/a"
        lines.append(f"| {row['variant']} | {row['batch']} | {row['ms_per_step']:.1f} | {row['warmup_s']:.0f} | {peak} |")
    sweep = result.get("attention_sweep") or []
    if sweep:
        lines += ["", f"Fused attention, current tiles: forward {sweep[0]['fwd_ms']:.2f} ms, forward + backward {sweep[0]['fwd_bwd_ms']:.2f} ms.", "",
                  "| kernel | fastest tiles (BLOCK_M×BLOCK_N, warps, stages) | forward ms | fwd + bwd ms | tried |", "|---|---|---|---|---|"]
        for kernel in ("fwd", "dq", "dkdv"):
            key = "fwd_ms" if kernel == "fwd" else "fwd_bwd_ms"
            rows = [r for r in sweep if r.get("kernel") == kernel and key in r]
            if rows:
                best = min(rows, key=lambda r: r[key])
                lines.append(f"| {kernel} | {best['BLOCK_M']}×{best['BLOCK_N']}, {best['num_warps']}, {best['num_stages']} | "
                             f"{best['fwd_ms']:.2f} | {best['fwd_bwd_ms']:.2f} | {len(rows)} |")
    text = "\n".join(lines) + "\n"
    (out / "step_probe.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", default="model", help="comma-separated RoPE forms: model (model/dit.py's), stacked (the form before)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-configs", default="", help='only these tiles, e.g. "dq:128,64,4,3;fwd:64,64,4,4" (KERNEL:BLOCK_M,BLOCK_N,warps,stages)')
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="small")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=2)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for variant in [v for v in args.variants.split(",") if v]:
        try:
            rows.append(probe_variant(variant, args, out))
        except Exception as error:  # keep the other variants
            rows.append({"variant": variant, "error": f"{type(error).__name__}: {str(error)[:400]}"})
        print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu", "torch": torch.__version__, "steps": rows}
    if args.sweep:
        try:
            result["attention_sweep"] = attention_sweep(args)
        except Exception as error:
            result["attention_sweep_error"] = f"{type(error).__name__}: {str(error)[:400]}"
            print(result["attention_sweep_error"], flush=True)
    (out / "step_probe.json").write_text(json.dumps(result, indent=1))
    print(write_table(result, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
