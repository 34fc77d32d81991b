"""Avatar World render speed on ONE core: frames/s of HeadRenderer at several sizes, and the whole
clip cost (espeak-ng speech + mouth track + motion + frames, no video encoding).

    python bench/world_render_speed.py [--out bench/results/world_render_speed.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402

from sparse_avatar.avatar_world import ClipSpec, make_clip  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    cv2.setNumThreads(1)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, whatever the machine
    rows = []
    for size in (64, 128, 256):
        rates, clip_rates = [], []
        for identity_seed in range(6):
            started = time.perf_counter()
            clip = make_clip(ClipSpec(identity_seed, identity_seed, identity_seed, identity_seed, identity_seed, args.seconds, size))
            setup = time.perf_counter() - started
            started = time.perf_counter()
            count = sum(1 for _ in clip.frames())
            render = time.perf_counter() - started
            rates.append(count / render)
            clip_rates.append(count / (render + setup))
        rates.sort()
        clip_rates.sort()
        rows.append((size, rates[len(rates) // 2], min(rates), clip_rates[len(clip_rates) // 2]))
    lines = ["# Avatar World render speed (one core)", "",
             f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, OpenCV {cv2.__version__}; "
             f"6 identities × {args.seconds:.0f} s clips at 25 fps; the machine was shared, so these are lower bounds.", "",
             "| size | frames/s (median) | frames/s (slowest identity) | frames/s incl. speech synthesis |", "|---|---|---|---|"]
    lines += [f"| {size}² | {median:.0f} | {slowest:.0f} | {whole:.0f} |" for size, median, slowest, whole in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
