"""Generation speed of the Sparse-Reference DiT: frames/s vs reference length, sparse vs dense.

    python bench/generation.py --device cuda --out bench/results   # small + base, 256², 10 s / 60 s reference
    python bench/generation.py --device cpu  --out bench/results   # seconds per frame, tiny + small

For every config and reference length it extracts an identity (the reference pass, timed once),
then times denoising steps of one chunk with
  - sparse: the config's top_k reference blocks per query block (what ships), and
  - dense:  top_k = every reference block, i.e. plain attention over the whole reference
            (same kernel, so the difference is only the sparsity).
frames/s = chunk frames / (steps × seconds per step). Weights are random: speed does not depend
on them. Results merge into <out>/generation.json (one section per device) and generation.md.
The target: a 60 s reference costs at most 1.5× a 10 s one (sparse).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import _checkout  # noqa: F401,E402  (sparse_avatar importable from a bare checkout)

from sparse_avatar.model import extract_identity, new_model  # noqa: E402
from sparse_avatar.model.flow import guided_velocity  # noqa: E402


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def run_case(config_name: str, reference_seconds: float, *, device: str, dtype: str, backend: str, chunk_frames: int, fps: float, steps: int, timed_steps: int, modes) -> list[dict]:
    model = new_model(config_name, dtype=dtype, device=device).eval()
    model.set_attention_backend(backend)
    config = model.config
    size = config.frame_size
    reference_frames = max(1, int(round(reference_seconds * fps)))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (reference_frames, size, size, 3), dtype=np.uint8)
    reference_audio = rng.standard_normal((reference_frames, config.speech_feature_dim)).astype(np.float32)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    identity = extract_identity(model, frames, reference_audio, fps=fps)
    synchronize(device)
    reference_pass_s = time.perf_counter() - start
    del frames
    caches = identity.layer_caches(device=device, dtype=model.dtype)
    reference_tokens = int(identity.ref_lengths[0])
    reference_blocks = identity.centroids.shape[3]
    side = size // model.codec.spatial_factor
    noise = torch.randn(1, config.latent_channels, chunk_frames, side, side, device=device, dtype=model.dtype)
    features = torch.randn(1, chunk_frames, config.speech_feature_dim, device=device)
    t = torch.full((1,), 0.5, device=device)
    rows = []
    for mode in modes:
        top_k = config.top_k if mode == "sparse" else reference_blocks
        model.dit.config = model.config = config.replace(top_k=top_k)
        for block in model.dit.blocks:
            block.config = model.config
        velocity = guided_velocity(model, caches, features)
        row = {
            "config": config_name, "reference_seconds": reference_seconds, "reference_tokens": reference_tokens,
            "reference_blocks": reference_blocks, "attention": mode, "top_k": top_k, "chunk_frames": chunk_frames,
            "frame_size": size, "dtype": dtype, "backend": backend, "steps": steps, "reference_pass_s": round(reference_pass_s, 4),
        }
        try:
            with torch.no_grad():
                velocity(noise, t)  # warm-up (kernel compilation, allocator)
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                step_s = timed(lambda: velocity(noise, t), device, timed_steps)
            row.update({
                "seconds_per_step": round(step_s, 5),
                "frames_per_second": round(chunk_frames / (steps * step_s), 4),
                "seconds_per_frame": round(steps * step_s / chunk_frames, 4),
            })
            if device.startswith("cuda"):
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    del caches, identity, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def markdown(results: dict) -> str:
    lines = ["# Generation speed (bench/generation.py)", ""]
    for section, data in sorted(results.items()):
        lines += [f"## {section}: {data['device_name']}", "", f"torch {data['torch']}, backend {data['rows'][0]['backend'] if data['rows'] else '?'}, {data['steps']} sampler steps, chunk of {data['rows'][0]['chunk_frames'] if data['rows'] else '?'} frames, random weights.", ""]
        lines += ["| config | reference | ref tokens | attention | top_k | s/step | frames/s | s/frame | peak GiB | reference pass s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in data["rows"]:
            lines.append(
                f"| {row['config']} | {row['reference_seconds']:g} s | {row['reference_tokens']} | {row['attention']} | {row['top_k']} | "
                f"{row.get('seconds_per_step', row.get('error', ''))} | {row.get('frames_per_second', '')} | {row.get('seconds_per_frame', '')} | "
                f"{row.get('peak_memory_gib', '')} | {row['reference_pass_s']} |"
            )
        ratios = data.get("long_over_short", {})
        if ratios:
            lines += ["", "Cost of the longest reference over the shortest (sparse, seconds per step; target ≤ 1.5):", ""]
            lines += [f"- {name}: {value:.2f}×" for name, value in ratios.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--configs", nargs="+", default=None, help="default: small base (cuda), tiny small (cpu)")
    parser.add_argument("--reference-seconds", nargs="+", type=float, default=None, help="default: 10 60 (cuda), 2 4 (cpu)")
    parser.add_argument("--chunk-frames", type=int, default=None, help="default 48 (cuda), 8 (cpu)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps the frames/s figure assumes")
    parser.add_argument("--timed-steps", type=int, default=None, help="steps actually timed (default 5 cuda, 2 cpu)")
    parser.add_argument("--dtype", default=None, help="default bf16 (cuda), fp32 (cpu)")
    parser.add_argument("--modes", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    parser.add_argument("--fps", type=float, default=25.0)
    # On CPU "auto" picks the dense-mask backend, which scores every reference token whatever
    # top_k is; the plain reference backend only touches the selected blocks, so it shows the
    # sparsity (and is the faster one on CPU for these shapes).
    parser.add_argument("--backend", default=None, help="attention backend (default: auto on cuda, naive on cpu)")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    configs = args.configs or (["small", "base"] if cuda else ["tiny", "small"])
    reference_seconds = args.reference_seconds or ([10.0, 60.0] if cuda else [2.0, 4.0])
    chunk_frames = args.chunk_frames or (48 if cuda else 8)
    timed_steps = args.timed_steps or (5 if cuda else 2)
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    backend = args.backend or ("auto" if cuda else "naive")
    if not cuda:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = []
    for name in configs:
        for seconds in reference_seconds:
            rows += run_case(name, seconds, device=args.device, dtype=dtype, backend=backend, chunk_frames=chunk_frames, fps=args.fps, steps=args.steps, timed_steps=timed_steps, modes=args.modes)
    ratios = {}
    for name in configs:
        sparse = [row for row in rows if row["config"] == name and row["attention"] == "sparse" and "seconds_per_step" in row]
        if len(sparse) >= 2:
            ratios[name] = sparse[-1]["seconds_per_step"] / sparse[0]["seconds_per_step"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "generation.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {}
    section = "cuda" if cuda else "cpu"
    results[section] = {
        "device_name": torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "steps": args.steps, "rows": rows, "long_over_short": ratios,
    }
    for path, text in ((json_path, json.dumps(results, indent=2)), (out / "generation.md", markdown(results))):
        temp = path.with_suffix(path.suffix + ".tmp")
        temp.write_text(text)
        os.replace(temp, path)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
