"""GPU memory of a render with a long reference, under a card-sized cap (issue "ComfyUI
experience", item 4: a render of a 60 s reference must fit a 12 GB card).

On a large GPU the process is capped with ``torch.cuda.set_per_process_memory_fraction`` to the
card size asked for (default 12 GiB), so an allocation beyond it fails exactly as it would on
that card. Per model size: the reference pass (``extract_identity``) over a 60 s reference and a
10 s render in generate and dub mode through ``model.pipeline.render`` (the call the CLI and the
nodes make), each with its peak allocated / reserved memory and wall time, or the OOM.

The frames are smooth random images at the model's frame size: memory and time depend on the
shapes, not on the content. The shipped model is loaded from its file; other sizes are random.

    python bench/vram.py --out bench/results            # GPU
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _checkout  # noqa: F401  (exposes the repository as `sparse_avatar`)
import numpy as np
import torch

from sparse_avatar.model.checkpoint import load_checkpoint, new_model, shipped_model_path
from sparse_avatar.model.identity import extract_identity
from sparse_avatar.model.pipeline import render


def smooth_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n uint8 frames [n, size, size, 3]: low-frequency noise drifting over time."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n // 25 + 2, 8, 8, 3), dtype=np.float32)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        a, w = divmod(i, 25)
        blend = coarse[a] * (1 - w / 25) + coarse[a + 1] * (w / 25)
        out[i] = np.kron(blend, np.ones((size // 8, size // 8, 1), np.float32)).clip(0, 1) * 255
    return out


def measure(label: str, model, reference_seconds: float, render_seconds: float, steps: int, fps: float = 25.0) -> dict:
    size = model.config.frame_size
    n_reference, n_render = int(reference_seconds * fps), int(render_seconds * fps)
    frames = smooth_frames(n_reference, size)
    rng = np.random.default_rng(1)
    dim = model.config.speech_feature_dim
    reference_speech = rng.standard_normal((n_reference, dim)).astype(np.float32)
    driving = rng.standard_normal((n_render, dim)).astype(np.float32)
    row = {"model": label, "config": model.config.name, "frame_size": size, "reference_s": reference_seconds,
           "render_s": render_seconds, "sampler_steps": steps,
           "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    identity = None
    for phase in ("reference pass", "generate", "dub"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            if phase == "reference pass":
                identity = extract_identity(model, frames, reference_speech, fps=fps)
            else:
                render(model, identity, driving, mode=phase, steps=steps, fps=fps, seed=0,
                       dub_frames=frames[:n_render] if phase == "dub" else None)
            torch.cuda.synchronize()
            row[phase] = {"ok": True, "seconds": time.perf_counter() - started,
                          "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                          "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        except torch.cuda.OutOfMemoryError as error:
            row[phase] = {"ok": False, "error": str(error).splitlines()[0][:200]}
            if phase == "reference pass":
                break
        print(label, phase, row[phase], flush=True)
    return row


def write_report(rows: list[dict], cap_gib: float, device: str, out: Path) -> None:
    lines = [f"# Render memory under a {cap_gib:g} GiB cap — {device}", "",
             f"`torch.cuda.set_per_process_memory_fraction` caps the process at {cap_gib:g} GiB, so an allocation beyond it fails as on "
             "that card. 60 s reference (reference pass), then 10 s rendered from it in each mode; peak allocated / reserved GiB "
             f"and wall seconds. torch {torch.__version__}, bf16 weights. Made by `bench/vram.py`.", "",
             "| model | frame | weights MB | phase | fits | peak allocated GiB | peak reserved GiB | seconds |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for phase in ("reference pass", "generate", "dub"):
            if phase not in row:
                continue
            m = row[phase]
            if m["ok"]:
                lines.append(f"| {row['model']} | {row['frame_size']}² | {row['weights_mb']:.0f} | {phase} | yes | {m['peak_allocated_gib']:.2f} | "
                             f"{m['peak_reserved_gib']:.2f} | {m['seconds']:.1f} |")
            else:
                lines.append(f"| {row['model']} | {row['frame_size']}² | {row['weights_mb']:.0f} | {phase} | **no** (OOM) | | | |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "vram.md").write_text("\n".join(lines) + "\n")
    (out / "vram.json").write_text(json.dumps({"cap_gib": cap_gib, "device": device, "torch": torch.__version__, "rows": rows}, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--cap-gib", type=float, default=12.0)
    parser.add_argument("--models", default="shipped,small,base", help="comma-separated: shipped, or config names (random weights)")
    parser.add_argument("--reference-seconds", type=float, default=60.0)
    parser.add_argument("--render-seconds", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=2, help="sampler steps (memory does not grow with them)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/vram.py measures GPU memory: run it on a machine with a CUDA GPU")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    device = torch.cuda.get_device_name(0)
    rows = []
    for name in args.models.split(","):
        if name == "shipped":
            model, label = load_checkpoint(shipped_model_path(), dtype="bf16", device="cuda"), "shipped (compact)"
        else:
            model, label = new_model(name, dtype="bf16", device="cuda"), f"{name} (random)"
        model.eval()
        with torch.no_grad():
            rows.append(measure(label, model, args.reference_seconds, args.render_seconds, args.steps))
        del model
        torch.cuda.empty_cache()
    write_report(rows, args.cap_gib, device, Path(args.out))
    print((Path(args.out) / "vram.md").read_text())


if __name__ == "__main__":
    main()
