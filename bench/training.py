"""Training throughput of stage 2 (audio-to-video) on Avatar World data.

    python bench/training.py --device cuda --out bench/results                 # small + base, ~2 min each
    python bench/training.py --device cpu --configs tiny --seconds 20 --out /tmp/bench   # smoke test

Per model config: samples/s, tokens/s (target-clip tokens; the reference pass is counted in the
FLOPs, not in tokens), model FLOPs utilisation (MFU), peak memory, and the loss curve. Writes
``OUT/training.json``, ``OUT/training.md`` (table) and ``OUT/training_loss.png``.

Data: ``--data SHARDS`` (from ``python -m sparse_avatar preprocess``), else Avatar World clips are
generated and preprocessed into a temporary folder at each model's frame size (needs espeak-ng).

MFU = achieved model FLOPs / peak dense bf16 FLOPs of the GPU. Model FLOPs per sample (training
= 3x forward) count the matmuls of the blocks over clip AND reference tokens (the reference pass
runs with gradients), plus clip attention over [clip + static + selected reference] keys and the
frame-local attention of the reference pass. Embedders, norms and the router are left out, so MFU
is slightly understated.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import _checkout  # noqa: F401,E402  (sparse_avatar importable from a bare checkout)

# Peak dense bf16 tensor-core FLOP/s (no sparsity) by GPU name fragment.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return flops
    return None


def block_matmul_params(config) -> int:
    """Weights of the per-token matmuls in one block (qkv, out, reference K/V, audio q/out, MLP)."""
    hidden, head_dim = config.hidden, config.head_dim
    mlp_hidden = int(hidden * config.mlp_ratio)
    return (
        3 * hidden * hidden + hidden * hidden  # qkv + attention out
        + hidden * 2 * config.kv_heads * head_dim  # reference K/V projection
        + 2 * hidden * hidden  # audio query + audio out
        + 2 * hidden * mlp_hidden  # MLP
    )


def training_flops_per_sample(config, clip_tokens: int, reference_tokens: int, tokens_per_frame: int, audio_tokens_per_frame: int) -> float:
    matmul = 2 * block_matmul_params(config) * (clip_tokens + reference_tokens)
    attended_reference = min(reference_tokens, config.top_k * config.block_size)
    clip_attention = 4 * config.hidden * clip_tokens * (clip_tokens + config.static_tokens + attended_reference)
    reference_attention = 4 * config.hidden * reference_tokens * tokens_per_frame  # frame-local
    audio_attention = 4 * config.hidden * (clip_tokens + reference_tokens) * audio_tokens_per_frame
    forward = config.depth * (matmul + clip_attention + reference_attention + audio_attention)
    return 3.0 * forward  # backward ~ 2x forward


def make_shards(frame_size: int, workdir: Path, clips: int, seconds: float) -> Path:
    from sparse_avatar.training.preprocess import preprocess_folder
    from sparse_avatar.avatar_world.generate import generate_world

    world = workdir / f"world_{frame_size}"
    shards = workdir / f"shards_{frame_size}"
    generate_world(clips, seconds, min(256, max(64, frame_size)), world, seed=0, clips_per_identity=2)
    preprocess_folder(world, shards, size=frame_size, crop="full")
    return shards


class ReferenceLengths:
    """A batch source that records each step's reference length in frames: the batch's
    shortest, which is what the batched objective trains on and what the FLOP count must use."""

    def __init__(self, source):
        self.source = source
        self.global_batch_size = source.global_batch_size
        self.frames: dict[int, int] = {}

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        batch = self.source.batch(step, rank, world_size)
        self.frames[step] = int(batch["shortest_reference"])
        return batch


def bench_config(entry: str, args, device: torch.device, workdir: Path) -> dict:
    """entry: a model config name, optionally ``NAME:OPTIONS`` with OPTIONS from ``compile``
    (torch.compile of the blocks) and ``graphs`` (the step replayed as a CUDA graph, which
    turns gradient checkpointing off), joined by '+', e.g. ``small:compile+graphs``."""
    name, _, option_text = entry.partition(":")
    options = {option for option in option_text.split("+") if option}
    if options - {"compile", "graphs"}:
        raise ValueError(f"unknown options {sorted(options - {'compile', 'graphs'})} in {entry!r} (NAME:compile, NAME:graphs, NAME:compile+graphs)")
    use_compile = args.compile or "compile" in options
    use_graphs = "graphs" in options
    checkpointing = args.gradient_checkpointing and not use_graphs
    from sparse_avatar.model.checkpoint import new_model
    from sparse_avatar.model.flow import keeps_reference
    from sparse_avatar.training.data import ShardedClipDataset, TensorOnlyBatches
    from sparse_avatar.training.distributed import DistributedContext
    from sparse_avatar.training.objectives import StepModule, model_flow_objective
    from sparse_avatar.training.train import BATCHED_REFERENCE_MULTIPLE
    from sparse_avatar.training.trainer import Trainer, TrainerConfig

    avatar = new_model(name)
    config = avatar.config
    shards = Path(args.data) if args.data else make_shards(config.frame_size, workdir, args.world_clips, args.world_seconds)
    # The batch source and trainer settings of `train --config world` (a batched objective).
    dataset = ShardedClipDataset(
        shards, global_batch_size=args.batch_size, target_frames=(args.frames, args.frames),
        reference_frames=(args.reference_frames, args.reference_frames), seed=0, cut_references_to_multiple=BATCHED_REFERENCE_MULTIPLE,
    )
    dataset.require_model(config)
    trainer_config = TrainerConfig(
        total_steps=10**6, lr=1e-4, warmup_steps=20, ema_decay=0.999, precision="bf16", log_every=args.log_every, prefetch_batches=True,
        gradient_checkpointing=checkpointing, compile=use_compile, cuda_graphs=use_graphs, parallel="none",
    )
    context = DistributedContext(0, 1, 0, device, None)
    lengths = ReferenceLengths(TensorOnlyBatches(dataset) if use_graphs else dataset)
    trainer = Trainer(
        StepModule(avatar, model_flow_objective(per_sample=False)), lambda m, b, g: m(b, g), lengths,
        trainer_config, workdir / f"run_{name}", context=context, log=lambda line: None,
        graph_key=(lambda generator: keeps_reference(config, generator)) if use_graphs else None,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Steps are timed in windows of log_every steps (the trainer syncs with the GPU only at a
    # window's end, as in training, so the host queues ahead); windows ending inside the warm-up
    # (compilation, autotuning, graph capture) are not timed.
    tokens_per_frame = avatar.tokens_per_frame()
    audio_tokens_per_frame = config.patch_size[0] + 2 * config.audio_window
    clip_tokens = args.frames * tokens_per_frame // config.patch_size[0]

    def step_flops_per_sample(step: int) -> float:
        reference_tokens = lengths.frames[step] * tokens_per_frame // config.patch_size[0]
        return training_flops_per_sample(config, clip_tokens, reference_tokens, tokens_per_frame, audio_tokens_per_frame)

    curve, timed_samples, timed_tokens, timed_seconds, data_seconds, timed_flops = [], 0, 0.0, 0.0, 0.0, 0.0
    timed_reference_frames = []
    last_synced = 0
    # --seconds of timed steps: a compiled row's warm-up (minutes of compilation) is not taken
    # out of its budget, so every row is timed over about as many seconds.
    while timed_seconds < args.seconds:
        record = trainer.train_step()
        if not record.get("synced", True):
            continue
        window_steps, last_synced = record["step"] - last_synced, record["step"]
        curve.append([record["step"], record["loss"]])
        if record["step"] - window_steps >= args.warmup:
            timed_samples += args.batch_size * window_steps
            timed_tokens += record["tokens"] * window_steps
            timed_seconds += record["step_time_s"] * window_steps
            data_seconds += record["data_time_s"] * window_steps
            window = range(record["step"] - window_steps, record["step"])
            timed_flops += args.batch_size * sum(step_flops_per_sample(step) for step in window)
            timed_reference_frames += [lengths.frames[step] for step in window]
        if args.max_steps and trainer.step >= args.max_steps:
            break
    trainer.release_cuda_graphs()
    if args.profile_steps and entry == args.configs.split(",")[0].strip():
        write_profile(trainer, args, device, Path(args.out) / f"training_profile_{name}.txt")
    samples_per_s = timed_samples / timed_seconds
    peak = peak_flops(device, args.peak_tflops)
    reference_frames = sum(timed_reference_frames) / len(timed_reference_frames)
    return {
        "config": entry,
        "parameters": sum(p.numel() for p in avatar.parameters()),
        "frame_size": config.frame_size,
        "batch_size": args.batch_size,
        "target_frames": args.frames,
        "reference_frames": reference_frames,  # mean over the timed steps of what the step trained on (the batch's shortest)
        "reference_frames_drawn": args.reference_frames,
        "clip_tokens_per_sample": clip_tokens,
        "reference_tokens_per_sample": reference_frames * tokens_per_frame / config.patch_size[0],
        "steps": trainer.step,
        "samples_per_s": samples_per_s,
        "data_time_fraction": data_seconds / timed_seconds,
        "tokens_per_s": timed_tokens / timed_seconds,
        "model_tflops_per_sample": timed_flops / timed_samples / 1e12,
        "achieved_tflops": timed_flops / timed_seconds / 1e12,
        "mfu": (timed_flops / timed_seconds / peak) if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "gradient_checkpointing": checkpointing,
        "compile": use_compile,
        "cuda_graphs": use_graphs,
        "timed_steps": int(timed_samples // args.batch_size),
        "loss_first": curve[0][1],
        "loss_last": sum(l for _, l in curve[-10:]) / len(curve[-10:]),
        "loss_curve": curve,
    }


def write_profile(trainer, args, device: torch.device, path: Path) -> None:
    """torch.profiler over a few more steps: where a step's time goes (GPU kernels and host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            trainer.train_step()
    events = prof.key_averages()
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "cpu_time_total"  # kernels first
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"{args.profile_steps} steps; operator calls {sum(e.count for e in events)}\n\n"
        + events.table(sort_by=sort_key, row_limit=40, max_name_column_width=70)
        + "\n\nby self CPU time:\n"
        + events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    )


def personality_defaults(finetune_personality) -> str:
    """The settings the timed fine-tune ran with: finetune_personality's own defaults."""
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(finetune_personality).parameters.items()}
    return (f"LoRA rank {defaults['lora_rank']}, batch {defaults['batch_size']}, target {defaults['target_frames']} frames, "
            f"reference {defaults['reference_frames']} frames, compile and CUDA graphs on CUDA, bf16 autocast")


def bench_personality(args, device: torch.device, shards: Path) -> dict:
    """Stage 3 as the Train Avatar node runs it: ``finetune_personality`` on one clip of the
    shards, timed per step; projected to the node's default step count. Step time does not depend
    on the video's length (each step samples windows of it), only on the window sizes."""
    from safetensors.numpy import load_file

    from sparse_avatar.model.checkpoint import new_model
    from sparse_avatar.training.data import read_index
    from sparse_avatar.training.personality import finetune_personality

    clip = read_index(shards)[0]
    arrays = load_file(str(shards / clip.file))
    model = new_model(args.personality_config).to(device)
    times = []

    def progress(step, total, loss):
        times.append(time.perf_counter())

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = finetune_personality(model, arrays["frames"], arrays["speech"], Path(folder) / "me.safetensors",
                                    steps=args.personality_steps, progress=progress)
        lora_bytes = path.stat().st_size
    total_s = time.perf_counter() - started
    warm = times[args.warmup:]
    seconds_per_step = (warm[-1] - warm[0]) / (len(warm) - 1) if len(warm) > 1 else total_s / max(1, len(times))
    return {
        "config": args.personality_config, "steps": len(times), "seconds_per_step": seconds_per_step,
        "wall_s_including_setup": total_s, "projected_minutes_for_1500_steps": 1500 * seconds_per_step / 60,
        "lora_file_bytes": lora_bytes,
        "defaults": personality_defaults(finetune_personality),
    }


def write_outputs(results: list[dict], environment: dict, out: Path, personality: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps({"environment": environment, "results": results, "personality_finetune": personality}, indent=1))
    lines = [
        f"# Training throughput (stage 2, Avatar World) — {environment['device_name']}",
        "",
        "| config | params | batch × frames (ref frames) | checkpointing | s/step | samples/s | tokens/s | MFU | peak mem GB | loss first → last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
        lines.append(
            f"| {r['config']} | {r['parameters'] / 1e6:.1f} M | {r['batch_size']} × {r['target_frames']} ({r['reference_frames']:.0f}) | "
            f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['batch_size'] / r['samples_per_s']:.3f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {mfu} | {memory} | {r['loss_first']:.3f} → {r['loss_last']:.3f} |"
        )
    for entry, reason in environment.get("failed", {}).items():
        lines.append(f"| {entry} | failed: {reason} | | | | | | | | |")
    lines += ["", f"torch {environment['torch']}, bf16 autocast, {environment['seconds']} s of timed steps per config after {environment['warmup']} "
              "warm-up steps; `:compile` = torch.compile of the blocks, `+graphs` = the whole step replayed as a CUDA graph."]
    if personality:
        lines += ["", f"Personality fine-tune (Train Avatar node defaults: {personality['defaults']}), {personality['config']}: "
                  f"{personality['seconds_per_step']:.3f} s/step over {personality['steps']} steps, projected "
                  f"{personality['projected_minutes_for_1500_steps']:.1f} min for the default 1500 steps; LoRA file "
                  f"{personality['lora_file_bytes'] / 2**20:.1f} MiB."]
    (out / "training.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for r in results:
        steps, losses = zip(*r["loss_curve"])
        axis.plot(steps, losses, label=r["config"])
    axis.set_xlabel("step")
    axis.set_ylabel("flow-matching loss")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "training_loss.png", dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default="small,base", help="comma-separated model configs, each NAME[:compile][+graphs] (e.g. small:compile+graphs)")
    parser.add_argument("--data", help="shard folder (default: generate Avatar World clips)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds of timed steps per config (after the warm-up)")
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, autotuning, CUDA-graph capture)")
    parser.add_argument("--log-every", type=int, default=5, help="steps between the trainer's GPU syncs (the timing windows)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--reference-frames", type=int, default=64)
    parser.add_argument("--world-clips", type=int, default=16)
    parser.add_argument("--world-seconds", type=float, default=8.0)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--profile-steps", type=int, default=0, help="profile N extra steps of the first config -> OUT/training_profile_<config>.txt")
    parser.add_argument("--personality-steps", type=int, default=0, help="also time N steps of the personality fine-tune (needs --data)")
    parser.add_argument("--personality-config", default="small")
    parser.add_argument("--peak-tflops", type=float, help="override the GPU's peak bf16 TFLOP/s for MFU")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    environment = {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": sys.version.split()[0], "seconds": args.seconds, "warmup": args.warmup,
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as workdir:
        for name in [entry for entry in args.configs.split(",") if entry.strip()]:  # --configs "" times the personality step alone
            print(f"benchmarking {name} ...", flush=True)
            try:
                result = bench_config(name.strip(), args, device, Path(workdir))
            except Exception as error:  # e.g. a compile failure: keep the other rows
                environment.setdefault("failed", {})[name.strip()] = f"{type(error).__name__}: {str(error)[:300]}"
                print(f"{name} failed: {environment['failed'][name.strip()]}", flush=True)
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}), flush=True)
            results.append(result)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        personality = None
        if args.personality_steps and args.data:
            print(f"timing {args.personality_steps} personality fine-tune steps ...", flush=True)
            personality = bench_personality(args, device, Path(args.data))
            print(json.dumps(personality), flush=True)
    write_outputs(results, environment, Path(args.out), personality)
    print((Path(args.out) / "training.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
