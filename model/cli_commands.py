"""CLI: ``init-checkpoint`` (random weights, for tests and as the start of training) and
``render`` (reference video + driving audio -> lip-synced mp4, exactly as long as the audio)."""
from __future__ import annotations
# Imports inside the handlers: `python -m sparse_avatar --help` imports every cli_commands module
# and must stay fast; each command loads only its own stack.

import argparse
import logging
import sys


def register(subparsers) -> None:
    init = subparsers.add_parser("init-checkpoint", help="write a randomly initialised model checkpoint (.safetensors)")
    init.add_argument("--config", required=True, help="model size: tiny, small, base or xl")
    init.add_argument("--out", required=True, help="output .safetensors path")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    init.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="stored weight precision")
    init.add_argument("--speech-features", default="logmel", choices=("logmel", "whisper"),
                      help="what the model hears: logmel (default) or whisper (Whisper tiny.en's encoder; needs the whisper extra)")
    init.set_defaults(handler=_init_checkpoint)

    render = subparsers.add_parser("render", help="render a lip-synced video from a reference video and speech")
    render.add_argument("--model", default=None, help="model checkpoint (.safetensors; default: the shipped model, "
                                                       "trained on Avatar World only: personalize it for a real person)")
    render.add_argument("--avatar", default=None, help="an avatar folder made by personalize --out FOLDER: its model and "
                                                        "identity, and its video as the reference (instead of --model/--reference)")
    render.add_argument("--reference", default=None, help="reference video of the person (a few seconds to minutes); with "
                                                          "--avatar, another video of the same person to dub or to take the framing from")
    render.add_argument("--audio", required=True, help="driving speech (wav/mp3/flac/m4a/ogg)")
    render.add_argument("--out", required=True, help="output .mp4")
    render.add_argument("--face", default=None, choices=("largest", "left", "right"),
                        help="which face of the reference to follow when several are in view (default largest; "
                             "with --avatar, the one it was trained on)")
    render.add_argument("--mode", default="generate", choices=("generate", "dub"), help="generate: new performance; dub: keep the source motion, re-render the mouth")
    render.add_argument("--steps", type=int, default=20, help="sampler steps (1-50)")
    render.add_argument("--sampler", default="euler", choices=("euler", "heun", "dpmpp_2m"))
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--audio-guidance", type=float, default=1.0, help="guidance scale for lip sync (1 = off)")
    render.add_argument("--reference-guidance", type=float, default=1.0, help="guidance scale for identity (1 = off)")
    render.add_argument("--chunk-frames", type=int, default=None, help="frames per chunk (default from the model config)")
    render.add_argument("--overlap-frames", type=int, default=None, help="motion frames carried between chunks")
    render.add_argument("--crop-only", action="store_true",
                        help="write the face crops at the model's size instead of full frames (the face placed back into the "
                             "reference's framing, background looped ping-pong; the default in both modes)")
    render.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    render.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    render.set_defaults(handler=_render)


def _init_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import new_model, save_checkpoint
    from .configs import get_config, with_speech_features

    model = new_model(with_speech_features(get_config(args.config), args.speech_features), seed=args.seed)
    path = save_checkpoint(model, args.out, dtype=args.dtype, training_stage="init")
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {path} ({args.config}, {params / 1e6:.2f} M parameters, {args.dtype})")
    return 0


def _render(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UserFacingError
    from .avatar_folder import read_avatar_folder
    from .checkpoint import load_checkpoint, shipped_model_path
    from .identity import load_identity
    from .pipeline import render_files

    logger = logging.getLogger("sparse_avatar")

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    identity = None
    reference = args.reference
    face = args.face or "largest"
    if args.avatar:
        if args.model:
            raise UserFacingError("--avatar brings its own model; pass --avatar or --model, not both.")
        avatar = read_avatar_folder(args.avatar)
        if not avatar.finished:
            logger.warning("%s; run the same personalize command again to finish it.", avatar.summary())
        model = load_checkpoint(avatar.model_path, dtype=args.dtype, device=device)
        identity = load_identity(avatar.identity_path)
        face = args.face or avatar.manifest["video"].get("face", "largest")
        if reference is None:
            reference = avatar.video_path
            if not reference.is_file():
                raise UserFacingError(f"the avatar's video {reference} is gone (moved or deleted); pass it, or another video of "
                                      "the same person, with --reference.")
    else:
        if reference is None:
            raise UserFacingError("render needs --reference VIDEO (the person to animate), or --avatar FOLDER made by personalize.")
        model = load_checkpoint(args.model or shipped_model_path(), dtype=args.dtype, device=device)

    def progress(event) -> None:
        print(f"\rchunk {event.chunk + 1}/{event.chunks} step {event.step}/{event.steps}", end="", file=sys.stderr, flush=True)

    path = render_files(
        model, reference, args.audio, args.out, mode=args.mode, steps=args.steps, sampler=args.sampler, seed=args.seed,
        audio_guidance=args.audio_guidance, reference_guidance=args.reference_guidance,
        chunk_frames=args.chunk_frames, overlap_frames=args.overlap_frames, full_frame=not args.crop_only, progress=progress,
        identity=identity, face=face, log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(f"\nwrote {path}")
    return 0
