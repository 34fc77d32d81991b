"""Avatar World's CLI commands: ``world`` (write clips or training shards) and ``eval`` (score a
model on a held-out suite). Imports inside the handlers keep ``python -m sparse_avatar --help``
fast (the generator pulls in OpenCV and the speech stack)."""
from __future__ import annotations

import argparse


def _world(args: argparse.Namespace) -> int:
    from .generate import generate_world, generate_world_shards

    if args.shards or args.speech_only:
        index = generate_world_shards(args.n, args.seconds, args.size, args.out, seed=args.seed, clips_per_identity=args.clips_per_identity,
                                      workers=args.workers, speech_only=args.speech_only)
        print(f"{args.n} clips' speech in {args.out}/speech" if index is None else f"{args.n} training shards, index {index}")
        return 0
    paths = generate_world(args.n, args.seconds, args.size, args.out, seed=args.seed,
                           clips_per_identity=args.clips_per_identity, workers=args.workers)
    print(f"{len(paths)} clips in {args.out}")
    return 0


def add_world_command(subparsers) -> None:
    parser = subparsers.add_parser("world", help="write Avatar World clips (mp4 + wav + ground truth)",
                                   description="Render procedural talking heads with espeak-ng speech and per-frame "
                                               "ground truth. Resumable: finished clips are skipped.")
    parser.add_argument("--n", type=int, required=True, help="number of clips")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each clip (default 8)")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels, 64–256 (default 128)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: different seeds give different people")
    parser.add_argument("--clips-per-identity", type=int, default=2, help="clips sharing one person (default 2)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    parser.add_argument("--shards", action="store_true",
                        help="write training shards (OUT/clips + OUT/index.json, what `train --data OUT` reads) instead of mp4 clips")
    parser.add_argument("--speech-only", action="store_true",
                        help="with --shards: only the speech half (OUT/speech/*.npz, needs espeak-ng); the same command without it "
                             "renders the frames from those files on a machine without espeak-ng")
    parser.set_defaults(handler=_world)


def _eval(args: argparse.Namespace) -> int:
    import json

    from .suite import evaluate

    summary = evaluate(args.suite, args.model, args.out, limit=args.limit, steps=args.steps, device=args.device) \
        if args.model not in ("ground-truth", "copy-reference") else evaluate(args.suite, args.model, args.out, limit=args.limit)
    print(json.dumps(summary, indent=1))
    print(f"report: {args.out}/report.md")
    return 0


def add_eval_command(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="score a model on a held-out Avatar World suite",
                                   description="Render the suite's held-out cases (reference clip + different driving "
                                               "speech), run the model, and write summary.json, cases.json, report.md "
                                               "and plots/ into --out.")
    parser.add_argument("--suite", default="avatar-world-v1", help="suite name (default avatar-world-v1)")
    parser.add_argument("--model", required=True,
                        help="a checkpoint (.safetensors), 'ground-truth' (the renderer: ceiling) or 'copy-reference' (floor)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps for checkpoint models (default 20)")
    parser.add_argument("--device", default="cpu", help="torch device for checkpoint models (default cpu)")
    parser.set_defaults(handler=_eval)


def register(subparsers) -> None:
    add_world_command(subparsers)
    add_eval_command(subparsers)
