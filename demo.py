"""``python -m sparse_avatar demo``: the main job on the model that ships, on a CPU.

An Avatar World person the model never saw (held-out seeds) gives a short reference clip; new
espeak-ng speech of another text drives it; the shipped model (``models/avatar``, trained on
Avatar World only) renders the talking head. ``--reference VIDEO`` uses your own clip instead
(face tracked and cropped as ``render`` does) and ``--audio FILE`` your own speech; on a real
person the shipped model is only a starting point (``python -m sparse_avatar personalize``).

Writes, atomically, into ``--out``: ``reference.mp4`` (the reference crops with their sound),
``demo.mp4`` (the rendered head with the driving speech) and ``side_by_side.mp4`` (reference,
looped, | result, with the driving speech), and prints how long each phase took.
"""
from __future__ import annotations
# Imports inside the functions: this module is loaded for `python -m sparse_avatar --help`, which
# must stay fast; the demo's own stack (PyAV, the model, espeak-ng speech) loads when it runs.

import argparse
import time
from pathlib import Path

import numpy as np

from .errors import UserFacingError

# Held-out Avatar World seeds (>= HELD_OUT_SEED_BASE, away from the evaluation suite's ranges):
# the demo person was never trained on.
_DEMO_SEED = 1_900_000_000


def register(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="the main job: the shipped model makes an Avatar World person (or your --reference) say new speech")
    demo.add_argument("--out", default="demo_output", help="folder for the outputs (default demo_output)")
    demo.add_argument("--seconds", type=float, default=10.0, help="length of the new speech when no --audio is given (default 10)")
    demo.add_argument("--reference-seconds", type=float, default=4.0, help="length of the Avatar World reference clip (default 4)")
    demo.add_argument("--reference", help="your own reference video instead of an Avatar World person")
    demo.add_argument("--audio", help="your own driving speech instead of espeak-ng's")
    demo.add_argument("--model", help="checkpoint (default: the shipped model)")
    demo.add_argument("--steps", type=int, default=1, help="sampler steps (default 1: the x-prediction model's one-step render "
                                                              "scored best on the person benchmark, and it is what a CPU affords)")
    demo.add_argument("--seed", type=int, default=0, help="which Avatar World person, and the sampler seed")
    demo.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    demo.set_defaults(handler=run_demo)


def _world_reference(seconds: float, size: int, seed: int):
    from .avatar_world.generate import ClipSpec, make_clip

    base = _DEMO_SEED + 100 * int(seed)
    clip = make_clip(ClipSpec(identity_seed=base, voice_seed=base + 1, text_seed=base + 2, scene_seed=base + 3, clip_seed=base + 4,
                              seconds=seconds, size=size, fps=25.0))
    return clip.frame_array(), clip.audio, 25.0, base


def _side_by_side(reference: np.ndarray, result: np.ndarray) -> np.ndarray:
    from .model.pipeline import ping_pong_order

    looped = reference[ping_pong_order(len(reference), len(result))]
    if looped.shape[1:3] != result.shape[1:3]:
        import cv2

        looped = np.stack([cv2.resize(frame, result.shape[2:0:-1], interpolation=cv2.INTER_AREA) for frame in looped])
    return np.concatenate([looped, result], axis=2)


def run_demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .media import load_audio, load_reference_video, write_video
    from .media.audio import SPEECH_SAMPLE_RATE
    from .model.checkpoint import load_checkpoint, shipped_model_path
    from .model.identity import extract_identity
    from .model.pipeline import prepare_reference_video, render, speech_features_for
    from .avatar_world.speech import synthesize_speech

    if not 0.5 <= args.seconds <= 120:
        raise UserFacingError(f"--seconds must be between 0.5 and 120, got {args.seconds}.")
    if not 1 <= args.reference_seconds <= 60:
        raise UserFacingError(f"--reference-seconds must be between 1 and 60, got {args.reference_seconds}.")
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[demo {time.perf_counter() - started:6.1f} s] {message}", flush=True)

    out_dir = Path(args.out).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model_path = Path(args.model) if args.model else shipped_model_path()
    model = load_checkpoint(model_path, device=device).eval()
    size = model.config.frame_size
    say(f"model {model_path.name} ({model.config.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters) on {device}")

    if args.reference:
        video = load_reference_video(args.reference)
        prepared = prepare_reference_video(model, video)
        reference, fps = prepared.crops, float(prepared.fps)
        reference_audio = prepared.audio if prepared.audio is not None else np.zeros(0, np.float32)
        reference_features = prepared.speech_for(model)
        voice_seed = _DEMO_SEED + 100 * int(args.seed) + 1
        say(f"reference {Path(args.reference).name}: {len(reference)} face crops at {size}px, {fps:g} fps")
    else:
        reference, reference_audio, fps, base = _world_reference(args.reference_seconds, size, args.seed)
        reference_features = speech_features_for(reference_audio, fps, model.config)
        voice_seed = base + 1
        say(f"reference: Avatar World person {base} (held out from training), {len(reference)} frames at {size}px")

    if args.audio:
        speech = load_audio(args.audio, sample_rate=SPEECH_SAMPLE_RATE)
        speech_kind = Path(args.audio).name
    else:
        speech, voice = synthesize_speech(voice_seed, voice_seed + 10_000, float(args.seconds))
        speech_kind = f"espeak-ng {voice['voice']}: {' '.join(voice['texts'])[:60]}..."
    say(f"driving speech: {len(speech) / SPEECH_SAMPLE_RATE:.1f} s ({speech_kind})")

    with torch.inference_mode():
        identity = extract_identity(model, reference, reference_features, fps=fps)
        say("identity extracted (static tokens + per-layer reference keys)")
        features = speech_features_for(speech, fps, model.config)
        bar = tqdm(total=100, desc="render", unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}% [{elapsed}<{remaining}]")

        def progress(event) -> None:
            bar.n = round(100 * event.fraction, 1)
            bar.refresh()

        try:
            frames = render(model, identity, features, steps=args.steps, fps=fps, seed=args.seed, progress=progress)
        finally:
            bar.close()
    render_s = time.perf_counter() - started
    say(f"rendered {len(frames)} frames ({len(frames) / fps:.1f} s of video)")

    write_video(out_dir / "reference.mp4", reference, fps, audio=reference_audio if len(reference_audio) else None)
    write_video(out_dir / "demo.mp4", frames, fps, audio=speech)
    write_video(out_dir / "side_by_side.mp4", _side_by_side(reference, frames), fps, audio=speech)
    say(f"wrote reference.mp4, demo.mp4, side_by_side.mp4 in {out_dir} (render finished at {render_s:.0f} s)")
    if not args.model:
        print(SHIPPED_MODEL_NOTE)
    return 0


# What the shipped model can and cannot do, said every time the demo uses it (its model card,
# models/avatar/sparse-avatar-world.md, has the numbers).
SHIPPED_MODEL_NOTE = (
    "note: the shipped model had 12 minutes of one GPU on Avatar World (2456 steps, 740 people). It does not yet render a "
    "person it has not trained on: a held-out Avatar World face comes out as a blocky mosaic, a real face too (dlib identity "
    "0.68, cut-off 0.6). What it is for today is a starting point: Train Avatar / `python -m sparse_avatar personalize --init "
    "models/avatar/sparse-avatar-world.safetensors --video me.mp4 --out me.safetensors` on a GPU."
)
