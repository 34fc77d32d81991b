"""Training-area CLI commands: ``world`` (write an Avatar World dataset) and ``eval`` (score a
model on a held-out Avatar World suite). Each command is a small ``add_*`` function plus a
handler, so adding one means adding a pair and a line in ``register``."""
from __future__ import annotations

import argparse


def _world(args: argparse.Namespace) -> int:
    from .world.generate import generate_world

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
    parser.set_defaults(handler=_world)


def register(subparsers) -> None:
    add_world_command(subparsers)
