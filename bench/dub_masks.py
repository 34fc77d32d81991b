"""Dub masks on the shared real clips: the person's lower face from the face mesh against the box,
and what dub compositing keeps of the source (CPU, no model).

    python bench/dub_masks.py [--size 128] [--out bench/results]     # writes dub_masks.{md,json}

For each clip of ``../shared/media`` (read in place; nothing of it is written but numbers), through
the pack's own reference path (``prepare_reference_video`` at the model's crop size, the default
tracker):

* the mask ``PreparedReference.dub_mask()`` makes (landmarks or the box, and why), its area and how
  it sits against the box (share of the box it covers, share of it outside the box), and the time
  the face mesh took;
* the ceiling of dub compositing: the crops themselves taken as a perfect render at the model's
  resolution, composited into the full frames as dub mode does, PSNR against the original frames
  over the face square (the crop's region of the frame): before (``paste_back`` of the whole crop,
  so the whole face comes back through the model's resolution) and now (only the mask's part,
  ``media.soft_region``). No model can do better than this column at that resolution.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import _checkout  # noqa: F401  (bare checkouts)
import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED_MEDIA = Path(os.environ.get("SPARSE_AVATAR_SHARED_MEDIA", REPO.parent / "shared" / "media"))


def _face_square_psnr(original: np.ndarray, composite: np.ndarray, transforms) -> float:
    """PSNR over every frame's crop square (the part of the frame the face crop covers)."""
    from sparse_avatar.media.crop import region_of

    errors, count = 0.0, 0
    for frame_a, frame_b, transform in zip(original, composite, transforms):
        left, top, right, bottom = region_of(transform.matrix, transform.size, transform.frame_size)
        a = frame_a[top:bottom, left:right].astype(np.float64)
        b = frame_b[top:bottom, left:right].astype(np.float64)
        errors += ((a - b) ** 2).sum()
        count += a.size
    mse = errors / max(1, count)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def measure(path: Path, size: int) -> dict:
    from sparse_avatar import media
    from sparse_avatar.model.masks import dub_mask
    from sparse_avatar.model.pipeline import composite_frames, keep_source_outside_mask, prepare_reference_video

    video = media.load_reference_video(str(path))
    prepared = prepare_reference_video(size, video)
    started = time.perf_counter()
    mask = prepared.dub_mask()
    mask_s = time.perf_counter() - started
    box = dub_mask(size)
    inside = mask > 0.5
    perfect = prepared.crops  # a render that is exactly the source at the model's resolution
    now = composite_frames(prepared, perfect, mode="dub", color_match=False)
    whole_crop = media.paste_back(prepared.frames, keep_source_outside_mask(perfect, prepared.crops, mask), prepared.transforms, color_match=False)
    return {
        "clip": path.stem, "frames": int(prepared.n_frames), "source_side": int(max(prepared.frames.shape[1:3])), "mask": prepared.dub_mask_source,
        "mask_s": mask_s, "area": float(inside.mean()), "box_area": float(box.mean()),
        "covers_box": float((inside & (box > 0.5)).sum() / (box > 0.5).sum()), "outside_box": float((inside & (box < 0.5)).sum() / max(1, inside.sum())),
        "psnr_whole_crop_db": _face_square_psnr(prepared.frames, whole_crop, prepared.transforms),
        "psnr_mask_only_db": _face_square_psnr(prepared.frames, now, prepared.transforms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="the model's crop size (small and compact: 128)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    clips = sorted(SHARED_MEDIA.glob("v*.mp4"))
    if not clips:
        raise SystemExit(f"no clips in {SHARED_MEDIA}: the shared media folder is missing")
    rows = []
    for path in clips:
        row = measure(path, args.size)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dub_masks.json").write_text(json.dumps({"size": args.size, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "rows": rows}, indent=1))
    lines = [
        "# Dub masks on the shared real clips (CPU, no model)", "",
        f"`python bench/dub_masks.py --size {args.size}`: each clip of `../shared/media` through `prepare_reference_video` at {args.size}² "
        f"(the crop size of `small` and `compact`). *mask*: what `PreparedReference.dub_mask()` made; *area*: share of the crop "
        f"re-rendered (the box: {rows[0]['box_area']:.3f}); *covers box*: share of the box inside the mask; *outside box*: share of the "
        "mask outside the box (the jaw line and cheeks beside it). Ceiling of compositing: the crops themselves as a perfect "
        f"{args.size}² render, composited into the full frames in dub mode, PSNR against the original frames over the face square; "
        "*whole crop*: the crop pasted back whole, as dub did before (the upper face too came back through "
        f"{args.size}²); *mask only*: only the mask's part of the crop (soft edge), the rest the source's own pixels.", "",
        "| clip | frames | source px | mask | mesh s | area | covers box | outside box | ceiling PSNR whole crop dB | mask only dB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['clip']} | {row['frames']} | {row['source_side']} | {row['mask']} | {row['mask_s']:.1f} | {row['area']:.3f} | "
                     f"{row['covers_box']:.2f} | {row['outside_box']:.2f} | {row['psnr_whole_crop_db']:.2f} | {row['psnr_mask_only_db']:.2f} |")
    mean = {key: float(np.mean([row[key] for row in rows])) for key in ("area", "covers_box", "outside_box", "psnr_whole_crop_db", "psnr_mask_only_db")}
    lines.append(f"| **mean** | | | | | {mean['area']:.3f} | {mean['covers_box']:.2f} | {mean['outside_box']:.2f} | {mean['psnr_whole_crop_db']:.2f} | {mean['psnr_mask_only_db']:.2f} |")
    from sparse_avatar.files import write_text

    write_text(out / "dub_masks.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
