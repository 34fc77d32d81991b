"""The person benchmark: learn a real person from the first 10/11 of their video, re-render the
last 1/11 from its own audio, compare with the real frames (issue "A real person").

Three phases, because the GPU box has no PyAV/librosa/mediapipe/dlib and this CPU box no GPU:

    python bench/person.py prepare --out .bench_data/person          # CPU: crops + speech features
    python bench/person.py run --data .bench_data/person --out OUT \\
        --variant x128 --budget 470 --dub-steps 1                  # GPU: Train Avatar + render
    python bench/person.py score --runs OUT --data .bench_data/person --out SCORED   # CPU
    python bench/person.py report SCORED/person.json ... --out bench/results   # merge scored runs

and ``profile`` (GPU): the personality step's s/step per variant, eager or compiled, with a
torch.profiler table.

prepare: every clip of ../shared/media at least --min-seconds long (v03, v07) through the pack's
  own reference path (``media.load_reference_video`` -> ``model.pipeline.reference_face_crops``
  at 256² -> ``reference_speech_features``), plus 60 s of driving speech (a09) for the drift
  test. Crops travel as JPEG q95 (the carry limit); the truth for scoring is decoded again here.
  The data folder is git-ignored: the clips' licences allow evaluation only, never the repo.
run: per clip, ``training.personality.finetune_personality`` (the Train Avatar node's call) on
  the first 10/11 with a fixed wall-time budget, ``extract_identity`` on the same frames, then
  ``render`` of the last 1/11 in dub mode (the real test crops, lower face masked) and in
  generate mode, and a 60 s generate render for drift. Frames come back as npz.
score: metrics (``evaluation.face_metrics``) against the real held-out crops, beside the
  mean-frame and speech-nearest-neighbour baselines and the real clip as the ceiling; writes
  person.json / person.md, and into person_media/ (git-ignored: it holds frames of the licensed
  clips) a strip (real / dub / generate) and short side-by-side mp4s.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

import numpy as np

import _checkout  # noqa: F401  (sparse_avatar importable from a bare checkout)
from sparse_avatar.media.whisper_features import WHISPER_FEATURE_DIM, WHISPER_FEATURE_ID

REPO = Path(__file__).resolve().parents[1]
MEDIA = REPO.parent / "shared" / "media"
FRAME_SIZE = 256
LONG_AUDIO = "a09_musetalk_eng_60s.wav"
TRAIN_FRACTION = 10 / 11  # the ER-NeRF split

# Generator variants compared on the benchmark (model config changes over `small`).
_AT_256 = dict(frame_size=256, latent_codec="pixel-f8", latent_channels=192)  # 16x16 tokens of 768 values
VARIANTS = {
    "vpred": dict(prediction="v", loss_space="v", absolute_positions=False, **_AT_256),  # as first shipped: velocity prediction
    "xpred": dict(prediction="x", loss_space="v", absolute_positions=False, **_AT_256),  # JiT: clean-frame prediction, velocity loss
    "xpred-refine": dict(prediction="x", loss_space="v", absolute_positions=False, refiner_channels=32, **_AT_256),
    "xpred-xloss-refine": dict(prediction="x", loss_space="x", absolute_positions=False, refiner_channels=32, **_AT_256),
    # `small` before the person benchmark moved it to 128²: x-prediction, clean-frame loss,
    # absolute positions, at 256².
    "x256": dict(_AT_256),
    # `small` as it ships: the same at 128², 16x16 tokens of 192 values (pixel-f4, patch 2);
    # renders are upsampled to the 256² crops for scoring (the 128² round trip alone keeps the
    # dub region at 31.9 dB on v03, 34.9 dB on v07: above the 30 dB target).
    "x128": {},
    "x128-refine": dict(refiner_channels=32),
    # The flow loss weighted towards the lower face (model.masks.dub_mask cells count N times).
    "x128-mouth2": dict(mouth_loss_weight=2.0),
    "x128-mouth4": dict(mouth_loss_weight=4.0),
    # The same with Whisper tiny.en encoder features instead of log-mel (media/whisper_features.py).
    "x128-mouth4-whisper": dict(mouth_loss_weight=4.0, speech_feature_dim=WHISPER_FEATURE_DIM, speech_feature_id=WHISPER_FEATURE_ID),
}
# Variant fields that change only how a model trains, so they apply to a --init checkpoint too.
TRAINING_ONLY_FIELDS = {"mouth_loss_weight", "dub_context_prob"}


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Crops to the model's working size (area) or renders back to the 256² crops (cubic)."""
    import cv2

    if frames.shape[1] == size:
        return frames
    interpolation = cv2.INTER_AREA if size < frames.shape[1] else cv2.INTER_CUBIC
    return np.stack([cv2.resize(frame, (size, size), interpolation=interpolation) for frame in frames])


# ----------------------------------------------------------------------------------- prepare

def _encode_jpegs(frames: np.ndarray, quality: int = 95, png: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Frames as one byte array + offsets (npz without pickle); PNG when the bytes must be exact."""
    import cv2

    if png:
        chunks = [cv2.imencode(".png", frame[..., ::-1])[1].reshape(-1) for frame in frames]
    else:
        chunks = [cv2.imencode(".jpg", frame[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])[1].reshape(-1) for frame in frames]
    offsets = np.cumsum([0] + [len(c) for c in chunks]).astype(np.int64)
    return np.concatenate(chunks), offsets


def _decode_jpegs(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([cv2.imdecode(data[offsets[i]:offsets[i + 1]], cv2.IMREAD_COLOR)[..., ::-1] for i in range(len(offsets) - 1)])


def person_clips(min_seconds: float) -> list[dict]:
    manifest = MEDIA / "manifest.csv"
    if not manifest.is_file():
        raise SystemExit(f"no {manifest}: the person benchmark needs the shared real clips beside the repository.")
    with manifest.open() as handle:
        rows = [row for row in csv.DictReader(handle) if row["kind"] == "video" and row["notes"].startswith("real")]
    return [row for row in rows if float(row["duration_s"]) >= min_seconds]


def real_clip(file_name: str):
    """(crops uint8 [T, 256, 256, 3], speech [T, F], fps) through the pack's reference path."""
    from sparse_avatar import media
    from sparse_avatar.model.pipeline import reference_face_crops, reference_speech_features

    video = media.load_reference_video(str(MEDIA / file_name))
    crops, _, _ = reference_face_crops(video, FRAME_SIZE)
    speech = reference_speech_features(video, len(crops))
    return crops, speech, float(video.fps)


def _whisper_features(file_name: str, n_frames: int, fps: float):
    """The clip's own audio as Whisper features (None where the optional extra is missing)."""
    from sparse_avatar import media
    from sparse_avatar.media.whisper_features import whisper_available, whisper_speech_features

    if not whisper_available():
        return None
    wave = media.load_audio(str(MEDIA / file_name), sample_rate=16000)
    return whisper_speech_features(wave, 16000, fps, n_frames=n_frames)


def prepare(args) -> None:
    from sparse_avatar import media
    from sparse_avatar.media.mediapipe_face import face_mesh_landmarks, mediapipe_available
    from sparse_avatar.media.whisper_features import whisper_available, whisper_speech_features

    out = Path(args.out)
    if not mediapipe_available():
        print("no mediapipe (pip install \"sparse-avatar[person-eval]\"): runs with --dub-masks landmarks will refuse this data")
    out.mkdir(parents=True, exist_ok=True)
    fps_seen = set()
    if not whisper_available():
        print("no Whisper features (pip install \"sparse-avatar[whisper]\"): the *-whisper variants will refuse this data")
    for row in person_clips(args.min_seconds):
        crops, speech, fps = real_clip(row["file"])
        fps_seen.add(fps)
        data, offsets = _encode_jpegs(crops, quality=args.jpeg_quality)
        whisper = _whisper_features(row["file"], len(crops), fps)
        extra = {} if whisper is None else {"speech_whisper": whisper.astype(np.float16)}  # fp16: the carry limit
        if mediapipe_available():  # the dub masks' landmarks (the GPU box has no mediapipe), px of the 256² crops
            extra["landmarks"] = face_mesh_landmarks(crops).astype(np.float16)
        np.savez(out / f"{Path(row['file']).stem}.npz", jpeg=data, offsets=offsets, speech=speech.astype(np.float32), fps=np.float32(fps), **extra)
        print(f"{row['file']}: {len(crops)} frames at {fps} fps, {data.nbytes / 2**20:.1f} MiB of JPEG")
    for fps in sorted(fps_seen):
        wave = media.load_audio(str(MEDIA / LONG_AUDIO), sample_rate=16000)
        np.save(out / f"long_speech_{int(fps)}fps.npy", media.speech_features(wave, 16000, fps).astype(np.float32))
        if whisper_available():
            np.save(out / f"long_speech_whisper_{int(fps)}fps.npy", whisper_speech_features(wave, 16000, fps).astype(np.float16))


def _speech_arrays(config, arrays, data_dir: Path, fps: float):
    """(the clip's speech features, the 60 s driving features) in the config's feature definition."""
    whisper = config.speech_feature_id == WHISPER_FEATURE_ID
    key, long_name = ("speech_whisper", f"long_speech_whisper_{int(fps)}fps.npy") if whisper else ("speech", f"long_speech_{int(fps)}fps.npy")
    if key not in arrays or not (data_dir / long_name).is_file():
        raise SystemExit(f"{data_dir} has no {config.speech_feature_id} features: run `prepare` with the whisper extra installed")
    return arrays[key].astype(np.float32), np.load(data_dir / long_name).astype(np.float32)


# ----------------------------------------------------------------------------------- run (GPU)

def _dub_masks(arrays, split: int, size: int, kind: str, frames: int):
    """(training mask, render mask) [size, size] of one clip: "box" -> (None, the box), as the pack
    does without mediapipe; "landmarks" -> the person's lower face (``person_dub_mask``) over the
    training frames and over the held-out frames that dub re-renders (what a user's source video
    would give), from the face mesh that ``prepare`` ran on the real 256² crops."""
    from sparse_avatar.model.masks import dub_mask, person_dub_mask

    if kind == "box":
        return None, dub_mask(size)
    if "landmarks" not in arrays:
        raise SystemExit("this data has no face-mesh landmarks: run `prepare` again with mediapipe installed (the person-eval extra)")
    landmarks = arrays["landmarks"].astype(np.float32)[:frames] * (size / FRAME_SIZE)
    masks = [person_dub_mask(part, size) for part in (landmarks[:split], landmarks[split:])]
    if any(mask is None for mask in masks):
        raise SystemExit("the face mesh found too few faces for a landmark dub mask on this clip")
    return masks[0], masks[1]


def run(args) -> None:
    import cv2
    import torch

    from sparse_avatar.model import extract_identity, new_model, render
    from sparse_avatar.model.configs import get_config
    from sparse_avatar.training.personality import compiles_by_default, finetune_personality

    data_dir, out = Path(args.data), Path(args.out)
    if args.budget <= 0 and not args.init:
        raise SystemExit("--budget 0 renders a trained model as it is: give it with --init")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    config = get_config(args.config).replace(dub_context_prob=0.0, **VARIANTS[args.variant])
    label = args.name or args.variant  # the row's name (e.g. a variant at another learning rate)
    if args.smoke:  # the code path on CPU in seconds: a one-block model, a few frames
        config = config.replace(name="smoke", hidden=64, depth=1, heads=2, kv_heads=1, static_tokens=4, top_k=2)
    for path in sorted(data_dir.glob("v*.npz")):
        if args.clips and path.stem.split("_")[0] not in args.clips.split(","):
            continue
        arrays = np.load(path)
        crops = _resize_frames(_decode_jpegs(arrays["jpeg"], arrays["offsets"]), config.frame_size)
        fps = float(arrays["fps"])
        if args.smoke:
            crops = crops[:44]
        split = int(len(crops) * TRAIN_FRACTION)
        train_mask, test_mask = _dub_masks(arrays, split, config.frame_size, args.dub_masks, len(crops))
        torch.manual_seed(args.seed)
        if args.init:  # personal fine-tuning from a trained model (e.g. the shipped one), as Train Avatar does
            from sparse_avatar.training.personality import starting_model

            changes = VARIANTS[args.variant]
            if set(changes) - TRAINING_ONLY_FIELDS:
                raise SystemExit(f"--init takes only variants that change training ({sorted(TRAINING_ONLY_FIELDS)}); {args.variant} changes {sorted(changes)}")
            model = starting_model(args.init, args.config, device=str(device), seed=args.seed)
            model.config = model.config.replace(dub_context_prob=0.0, **changes)
            config = model.config
        else:
            model = new_model(config, seed=args.seed, device=str(device))
        speech, long_speech = _speech_arrays(model.config, arrays, data_dir, fps)  # what this model hears (an --init's own)
        speech = speech[: len(crops)]
        losses, last_step = [], [0]
        started = time.perf_counter()

        def progress(step, total, loss):
            last_step[0] = step
            if loss is not None:
                losses.append((step, loss))

        weights = finetune_personality(
            model, crops[:split], speech[:split], out / f"{label}_{path.stem}.safetensors", steps=100_000,
            time_budget_s=args.budget, lora_rank=0, lr=args.lr, batch_size=args.batch, target_frames=args.target_frames,
            reference_frames=args.reference_frames, dub_context_prob=args.dub_prob, fps=fps, seed=args.seed,
            progress=progress, compile=args.compile, mouth_loss_weight=config.mouth_loss_weight, dub_region=train_mask,
        ) if args.budget > 0 else None
        train_s = time.perf_counter() - started
        if weights is not None:
            weights.unlink()  # 150 MB: not brought back
        model = model.to(torch.bfloat16).eval()
        with torch.no_grad():
            started = time.perf_counter()
            identity = extract_identity(model, crops[:split], speech[:split], fps=fps)
            identity_s = time.perf_counter() - started
            test_speech = speech[split:]
            # Warm-up outside the timed renders: kernel compilation and autotuning for exactly the
            # shapes timed below, in both modes (dub's forced reference blocks differ from generate).
            for mode in ("dub", "generate"):
                render(model, identity, test_speech, mode=mode, steps=1, fps=fps, dub_frames=crops[split:] if mode == "dub" else None, dub_mask=test_mask)
            timings = {}
            results = {}
            for mode in ("dub", "generate"):
                torch.cuda.synchronize() if device.type == "cuda" else None
                started = time.perf_counter()
                results[mode] = render(model, identity, test_speech, mode=mode, steps=args.steps, fps=fps, seed=args.seed,
                                       dub_frames=crops[split:] if mode == "dub" else None, dub_mask=test_mask)
                timings[mode] = time.perf_counter() - started
            # The same trained model rendered otherwise (scored as extra rows): dub with other sampler
            # step counts; dub and generate with more audio guidance (classifier-free, the model is
            # trained with audio dropout), which may widen a mouth that opens too little.
            other_renders = {f"@{steps}steps": {"dub": render(model, identity, test_speech, mode="dub", steps=steps, fps=fps, seed=args.seed,
                                                                dub_frames=crops[split:], dub_mask=test_mask)}
                             for steps in _int_list(args.dub_steps) if steps != args.steps}
            for guidance in _float_list(args.audio_guidance):
                other_renders[f"@audio{guidance:g}"] = {
                    mode: render(model, identity, test_speech, mode=mode, steps=args.steps, fps=fps, seed=args.seed, audio_guidance=guidance,
                                 dub_frames=crops[split:] if mode == "dub" else None, dub_mask=test_mask) for mode in ("dub", "generate")}
            long_features = long_speech[: 30 if args.smoke else None]
            started = time.perf_counter()
            long_frames = render(model, identity, long_features, mode="generate", steps=args.steps, fps=fps, seed=args.seed)
            timings["long_generate"] = time.perf_counter() - started
        results = {mode: _resize_frames(frames, FRAME_SIZE) for mode, frames in results.items()}
        other_renders = {suffix: {mode: _resize_frames(frames, FRAME_SIZE) for mode, frames in modes.items()} for suffix, modes in other_renders.items()}
        # At most 16 MiB a file comes back: held-out renders as JPEG q95 (~45 dB, far above what is
        # measured), the 60 s render every 2nd frame at 128² q85 (identity, blinks, motion only).
        small_long = np.stack([cv2.resize(frame, (128, 128), interpolation=cv2.INTER_AREA) for frame in long_frames[::2]])
        encoded = {}
        for name, frames, options in (("dub", results["dub"], {}), ("generate", results["generate"], {}), ("long", small_long, {"quality": 85})):
            encoded[f"{name}_bytes"], encoded[f"{name}_offsets"] = _encode_jpegs(frames, **options)
        np.savez(out / f"{label}_{path.stem}.npz", split=np.int64(split), **encoded)
        for suffix, modes in other_renders.items():  # modes not re-rendered repeat the run's own
            changed = {}
            for mode, frames in modes.items():
                changed[f"{mode}_bytes"], changed[f"{mode}_offsets"] = _encode_jpegs(frames)
            np.savez(out / f"{label}{suffix}_{path.stem}.npz", split=np.int64(split), **(encoded | changed))
        record = {
            "variant": label, "clip": path.stem, "config": json.loads(config.to_json()), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "budget_s": args.budget, "train_s": train_s, "steps": last_step[0],
            "s_per_step": train_s / max(1, last_step[0]), "loss_curve": losses, "identity_s": identity_s,
            "render_s": timings, "render_fps": {mode: len(results[mode]) / timings[mode] for mode in results} | {"long_generate": len(long_frames) / timings["long_generate"]},
            "sampler_steps": args.steps, "batch": args.batch, "target_frames": args.target_frames, "reference_frames": args.reference_frames,
            "lr": args.lr, "dub_context_prob": args.dub_prob, "train_frames": split, "test_frames": len(crops) - split, "total_frames": len(crops), "fps": fps,
            "concurrent_runs": args.concurrent, "init": Path(args.init).name if args.init else "", "dub_masks": args.dub_masks, "compile": compiles_by_default(device) if args.compile is None else args.compile,
        }
        (out / f"{label}_{path.stem}.json").write_text(json.dumps(record, indent=1))
        for suffix, modes in other_renders.items():  # same training; only these renders differ
            guidance = float(suffix[len("@audio"):]) if suffix.startswith("@audio") else 1.0
            steps = args.steps if suffix.startswith("@audio") else int(suffix[1:-len("steps")])
            (out / f"{label}{suffix}_{path.stem}.json").write_text(json.dumps(
                record | {"variant": f"{label}{suffix}", "dub_sampler_steps": steps, "audio_guidance": guidance, "rerendered": sorted(modes)}, indent=1))
        print(f"{label} {path.stem}: {record['steps']} steps in {train_s:.0f} s, loss {losses[-1][1] if losses else 'n/a'}, "
              f"render fps {record['render_fps']}", flush=True)


def profile(args) -> None:
    """GPU: the personality step as the node runs it (batch, windows, dub share, bf16): s/step
    per variant (NAME[:OPTIONS], OPTIONS compile|eager and graphs|nographs, joined by '+'; what is
    not named is as Train Avatar decides), peak memory, and a torch.profiler table of a few steps."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from sparse_avatar.model import new_model
    from sparse_avatar.model.configs import get_config
    from sparse_avatar.training.personality import finetune_personality

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = sorted(Path(args.data).glob(f"{args.clip}*.npz"))[0]
    arrays = np.load(path)
    decoded = _decode_jpegs(arrays["jpeg"], arrays["offsets"])
    split = int(len(decoded) * TRAIN_FRACTION)
    speech = arrays["speech"][:split]
    rows = []
    # The trainer says here when CUDA graphs are off or their capture failed: the row must say it too.
    trainer_warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: trainer_warnings.append(record.getMessage())
    logging.getLogger("sparse_avatar.training").addHandler(handler)
    for entry in args.variants.split(","):
        trainer_warnings.clear()
        name, _, flag = entry.partition(":")
        options = set(flag.split("+")) - {""}
        if not options <= {"compile", "eager", "graphs", "nographs"}:
            raise SystemExit(f"unknown option in {entry!r}: NAME[:compile|eager][+graphs|nographs]")
        config = get_config(args.config).replace(dub_context_prob=0.0, **VARIANTS[name])
        crops = _resize_frames(decoded[:split], config.frame_size)
        cuda = args.device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        if args.smoke:
            config = config.replace(name="smoke", hidden=64, depth=1, heads=2, kv_heads=1, static_tokens=4, top_k=2)
        model = new_model(config, seed=0, device=args.device)
        marks, state = {}, {}
        profiler = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        total = args.steps + args.profile_steps

        def progress(step, _total, loss, marks=marks, state=state, profiler=profiler, total=total):
            if loss is not None:  # synced steps: the GPU has caught up
                marks[step] = time.perf_counter()
            if step == args.steps and args.profile_steps:
                profiler.start()
                state["profiling"] = True
            if step == total and state.get("profiling"):
                if cuda:
                    torch.cuda.synchronize()
                profiler.stop()

        try:
            finetune_personality(model, crops, speech, out / "profile.safetensors", steps=total, lora_rank=0, lr=args.lr, batch_size=args.batch,
                                 target_frames=args.target_frames, reference_frames=args.reference_frames, dub_context_prob=args.dub_prob,
                                 log_every=10, progress=progress,
                                 compile=True if "compile" in options else False if "eager" in options else None,
                                 cuda_graphs=True if "graphs" in options else False if "nographs" in options else None)
        except Exception as error:  # one failing variant (e.g. compile) must not lose the others' rows
            rows.append({"variant": entry, "error": f"{type(error).__name__}: {error}"[:2000]})
            print(rows[-1], flush=True)
            continue
        (out / "profile.safetensors").unlink()
        first = min(step for step in marks if step >= 10)
        seconds_per_step = (marks[args.steps] - marks[first]) / (args.steps - first)
        row = {"variant": entry, "s_per_step": seconds_per_step, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               "batch": args.batch, "target_frames": args.target_frames, "reference_frames": args.reference_frames,
               "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "trainer_warnings": list(trainer_warnings)}
        if state.get("profiling"):
            events = profiler.key_averages()
            row["operator_calls_per_step"] = sum(event.count for event in events if not event.key.startswith("ProfilerStep")) / args.profile_steps
            table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=40)
            cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=25)
            (out / f"profile_{entry.replace(':', '-')}.txt").write_text(f"{row}\n\n{table}\n\nby host time:\n{cpu_table}\n")
        rows.append(row)
        print(row, flush=True)
        (out / "profile.json").write_text(json.dumps(rows, indent=1))
        del model
        if cuda:
            torch.cuda.empty_cache()
    (out / "profile.json").write_text(json.dumps(rows, indent=1))


# ----------------------------------------------------------------------------------- score (CPU)

def speech_windows(features: np.ndarray, radius: int) -> np.ndarray:
    """[T, F] -> [T, (2·radius + 1)·F]: each frame's features with its neighbours' (edges repeated)."""
    padded = np.pad(features, ((radius, radius), (0, 0)), mode="edge")
    return np.stack([padded[i:i + len(features)] for i in range(2 * radius + 1)], axis=1).reshape(len(features), -1)


def _speech_nearest_frames(train_speech: np.ndarray, test_speech: np.ndarray, radius: int = 2) -> np.ndarray:
    """Index of the training frame whose speech window (±radius frames) is nearest to each test frame's."""
    a, b = speech_windows(train_speech, radius), speech_windows(test_speech, radius)
    distances = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None]
    return distances.argmin(1)


def _dub_metrics(fm, real, candidate, mask, real_landmarks) -> dict:
    landmarks = fm.face_landmarks(candidate)
    return {
        "psnr_region_db": fm.psnr(real, candidate, mask), "ssim_region": fm.ssim(real, candidate, mask),
        "lmd_px": fm.landmark_distance(real_landmarks, landmarks),
        "mouth_corr": fm.correlation(fm.mouth_aperture(real_landmarks), fm.mouth_aperture(landmarks)),
        "face_found": float(np.mean(~np.isnan(landmarks[:, 0, 0]))),
    }


def _every(frames: np.ndarray, most: int = 40) -> np.ndarray:
    """At most `most` evenly spaced frames (dlib's ResNet costs ~0.15 s a frame on this CPU)."""
    return frames[np.linspace(0, len(frames) - 1, min(most, len(frames))).round().astype(int)]


def _generate_metrics(fm, real, candidate, real_landmarks, real_embeddings_mean) -> dict:
    landmarks = fm.face_landmarks(candidate)
    embeddings = fm.identity_embeddings(_every(candidate))
    return {
        "psnr_db": fm.psnr(real, candidate), "identity_distance": fm.embedding_distance(embeddings, real_embeddings_mean),
        "mouth_corr": fm.correlation(fm.mouth_aperture(real_landmarks), fm.mouth_aperture(landmarks)),
        "face_found": float(np.mean(~np.isnan(landmarks[:, 0, 0]))),
    }


def _long_metrics(fm, frames, fps, real_all_landmarks, real_embeddings_mean) -> dict:
    landmarks = fm.face_landmarks(frames)
    seconds = int(10 * fps)
    head, tail = _every(frames[:seconds]), _every(frames[-seconds:])
    embeddings = fm.identity_embeddings(np.concatenate([head, tail]))
    first = fm.embedding_distance(embeddings[:len(head)], real_embeddings_mean)
    last = fm.embedding_distance(embeddings[len(head):], real_embeddings_mean)
    real_motion, motion = fm.head_motion(real_all_landmarks, fps), fm.head_motion(landmarks, fps)
    return {
        "identity_first_10s": first, "identity_last_10s": last, "drift_ratio": last / first if first > 0 else float("nan"),
        "blink_rate_per_min": fm.blink_rate(landmarks, fps), "real_blink_rate_per_min": fm.blink_rate(real_all_landmarks, fps),
        "head_sway_px": float(np.hypot(motion["nose_std_x_px"], motion["nose_std_y_px"])),
        "real_head_sway_px": float(np.hypot(real_motion["nose_std_x_px"], real_motion["nose_std_y_px"])),
        "head_speed_px_per_s": motion["nose_speed_px_per_s"], "real_head_speed_px_per_s": real_motion["nose_speed_px_per_s"],
    }


def score(args) -> None:
    import cv2

    from sparse_avatar.evaluation import face_metrics as fm
    from sparse_avatar.model.masks import dub_mask, person_dub_mask
    from sparse_avatar.model.pipeline import keep_source_outside_mask

    available = fm.available()
    if not all(available.values()):
        raise SystemExit(f"scoring needs mediapipe and dlib ({available}): pip install \"sparse-avatar[person-eval]\"")
    runs, out = Path(args.runs), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    box = dub_mask(FRAME_SIZE)
    rows, strips = [], []
    clips = sorted({path.stem.split("_", 1)[1] for path in runs.glob("*.json")})
    for clip in clips:
        crops, speech, fps = real_clip(clip + ".mp4")  # the truth, decoded again (not the JPEG copy)
        records = sorted(runs.glob(f"*_{clip}.json"))
        first = json.loads(records[0].read_text())
        split = first["train_frames"]
        crops, speech = crops[: first["total_frames"]], speech[: first["total_frames"]]
        train, test = crops[:split], crops[split:]
        real_landmarks = fm.face_landmarks(test)
        real_all_landmarks = fm.face_landmarks(crops)
        # Dub is composited with each run's own mask (the box, or the person's lower face from the
        # held-out frames' face mesh, as the run rendered it) and scored over the union of both, so
        # every row of a clip is compared on the same pixels.
        person_mask = person_dub_mask(real_landmarks, FRAME_SIZE)
        masks = {"box": box, "landmarks": box if person_mask is None else person_mask}
        region = np.maximum(masks["box"], masks["landmarks"])
        real_embeddings_mean = fm.identity_embeddings(_every(train, 60)).mean(0)
        mean_frame = np.repeat(train.astype(np.float32).mean(0, keepdims=True).round().astype(np.uint8), len(test), 0)
        nearest = train[_speech_nearest_frames(speech[:split], speech[split:])]
        baselines = {"mean training frame": mean_frame, "speech-nearest training frame": nearest}
        for name, frames in baselines.items():
            generate = _generate_metrics(fm, test, frames, real_landmarks, real_embeddings_mean)
            for kind, mask in masks.items():
                rows.append({"clip": clip, "method": f"baseline: {name} ({kind} mask)", "dub": _dub_metrics(fm, test, keep_source_outside_mask(frames, test, mask), region, real_landmarks),
                             "generate": generate})
        ceiling_gen = _generate_metrics(fm, test, test, real_landmarks, real_embeddings_mean)
        rows.append({"clip": clip, "method": "ceiling: the real clip", "dub": {"psnr_region_db": float("inf"), "ssim_region": 1.0, "lmd_px": 0.0, "mouth_corr": 1.0, "face_found": ceiling_gen["face_found"]},
                     "generate": ceiling_gen})
        for record_path in records:
            record = json.loads(record_path.read_text())
            arrays = np.load(record_path.with_suffix(".npz"))
            arrays = {name: _decode_jpegs(arrays[f"{name}_bytes"], arrays[f"{name}_offsets"]) for name in ("dub", "generate", "long")}
            dub = keep_source_outside_mask(arrays["dub"], test, masks[record.get("dub_masks", "box")])
            long_frames = np.stack([cv2.resize(frame, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_CUBIC) for frame in arrays["long"]])
            row = {"clip": clip, "method": record["variant"], "run": record,
                   "dub": _dub_metrics(fm, test, dub, region, real_landmarks),
                   "generate": _generate_metrics(fm, test, arrays["generate"], real_landmarks, real_embeddings_mean),
                   "long": _long_metrics(fm, long_frames, fps / 2, real_all_landmarks, real_embeddings_mean)}
            rows.append(row)
            strips.append((f"{clip} {record['variant']}", test, dub, arrays["generate"]))
            _write_clip_videos(out, clip, record["variant"], test, dub, arrays["generate"], speech, split, fps)
    write_report(rows, strips, out)


def _write_clip_videos(out, clip, variant, real, dub, generate, speech, split, fps) -> None:
    """Side-by-side mp4 (real | dub | generate) of the held-out part, with the clip's own audio."""
    from sparse_avatar import media

    video = media.load_reference_video(str(MEDIA / f"{clip}.mp4"))
    start = int(round(split / fps * 16000))
    audio = np.asarray(video.audio, np.float32).reshape(-1)[start:start + int(round(len(real) / fps * 16000))] if video.audio is not None else None
    frames = np.concatenate([real, dub, generate[: len(real)]], axis=2)
    media.write_video(out / "person_media" / f"{clip}_{variant}.mp4", frames, fps, audio=audio, sample_rate=16000)


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, float) and np.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def write_report(rows, strips, out: Path) -> None:
    from sparse_avatar.files import write_text

    (out / "person.json").write_text(json.dumps(rows, indent=1, default=float))
    lines = ["# Person benchmark: learn a real person from their own video", "",
             "Train on the first 10/11 of each clip with `finetune_personality` (the Train Avatar node's call), render the last 1/11 "
             "from its own audio. Dub: the real test crops with the lower face masked give pose and upper face; the mask is the run's "
             "(`dub masks` column): the fixed box of model/masks.py, or the person's lower face from the face mesh of the frames "
             "re-rendered (`person_dub_mask`, the pack's default with mediapipe); training hides the same kind. Metrics over the "
             "union of both masks (PSNR, SSIM; every row of a clip on the same pixels, the rest is the source's) and the mouth landmarks (LMD, mean-centred, px of the 256² crop; "
             "mouth-aperture correlation with the real clip) from mediapipe's face mesh. Generate: dlib face-recognition distance "
             "to the real training frames' mean embedding (same-person cut-off 0.6), mouth-aperture correlation; 60 s render: "
             "identity first vs last 10 s, blinks and head sway vs the whole real clip. SyncNet, LPIPS and FID need models that "
             "cannot be had offline here: not reported.", "",
             "Training column: wall-time budget, learning rate, torch.compile or eager, how many runs shared the GPU "
             "(the s/step of a shared run is slower than alone). `@1steps`: the same trained model, dub rendered with 1 "
             "sampler step instead of the run's default (generate and 60 s columns repeat the run's). `@audio2`: the same trained "
             "model, dub and generate rendered with audio guidance 2 instead of 1 (the 60 s columns repeat the run's).", "",
             "| clip | method | dub masks | training | dub PSNR dB | dub SSIM | LMD px | dub mouth r | gen identity | gen mouth r | gen PSNR dB | steps (s/step) | render fps dub/gen |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(rows, key=lambda row: (row["clip"], 0 if not row.get("run") else 1))
    for row in rows:
        d, g, run = row["dub"], row["generate"], row.get("run")
        steps = f"{run['steps']} ({_fmt(run['s_per_step'], 3)})" if run else ""
        fps = f"{_fmt(run['render_fps']['dub'], 1)} / {_fmt(run['render_fps']['generate'], 1)}" if run else ""
        training = ""
        if run:
            compiled = {True: "compile", False: "eager"}.get(run.get("compile"), "eager")
            training = f"{run['budget_s']:.0f} s, lr {run['lr']:g}, {compiled}, {run['concurrent_runs']} sharing"
        kind = run.get("dub_masks", "box") if run else ("landmarks" if "(landmarks mask)" in row["method"] else "box" if "(box mask)" in row["method"] else "")
        lines.append(f"| {row['clip']} | {row['method']} | {kind} | {training} | {_fmt(d['psnr_region_db'])} | {_fmt(d['ssim_region'], 3)} | {_fmt(d['lmd_px'])} | "
                     f"{_fmt(d['mouth_corr'])} | {_fmt(g['identity_distance'], 3)} | {_fmt(g['mouth_corr'])} | {_fmt(g['psnr_db'])} | {steps} | {fps} |")
    long_rows = [row for row in rows if "long" in row]
    if long_rows:
        lines += ["", "60 s generate render (long audio a09, every 2nd frame scored):", "",
                  "| clip | method | identity first 10 s | last 10 s | ratio | blinks/min (real) | head sway px (real) | head speed px/s (real) |", "|---|---|---|---|---|---|---|---|"]
        for row in long_rows:
            m = row["long"]
            lines.append(f"| {row['clip']} | {row['method']} | {_fmt(m['identity_first_10s'], 3)} | {_fmt(m['identity_last_10s'], 3)} | {_fmt(m['drift_ratio'])} | "
                         f"{_fmt(m['blink_rate_per_min'], 1)} ({_fmt(m['real_blink_rate_per_min'], 1)}) | {_fmt(m['head_sway_px'], 1)} ({_fmt(m['real_head_sway_px'], 1)}) | "
                         f"{_fmt(m['head_speed_px_per_s'], 1)} ({_fmt(m['real_head_speed_px_per_s'], 1)}) |")
    runs = [row["run"] for row in rows if row.get("run")]
    if runs:
        run = runs[0]
        lines += ["", f"Device: {', '.join(sorted({r['device'] for r in runs}))}, torch {', '.join(sorted({r['torch'] for r in runs}))}; "
                  f"batch {run['batch']} × {run['target_frames']} frames, reference {run['reference_frames']} frames, "
                  f"dub samples {run['dub_context_prob']:.0%}; {run['sampler_steps']} euler steps per render unless the method says otherwise."]
    write_text(out / "person.md", "\n".join(lines) + "\n")
    # Pictures hold frames of the licensed clips (evaluation only, never in the repository):
    # written beside the tables into person_media/, which git ignores.
    (out / "person_media").mkdir(parents=True, exist_ok=True)
    _write_strip(strips, out / "person_media" / "person_strip.png")


def report(args) -> None:
    """Merge the scored rows of several GPU runs (person.json files written by `score`) into one
    table; baselines and ceilings are kept once per clip. Row names can be changed with
    --rename OLD=NEW (runs of the same variant with other settings)."""
    renames = dict(item.split("=", 1) for item in args.rename)
    rows, seen = [], set()
    for path in args.scored:
        for row in json.loads(Path(path).read_text()):
            if not row.get("run"):
                key = (row["clip"], row["method"])
                if key in seen:
                    continue
                seen.add(key)
            else:
                row["method"] = renames.get(f"{Path(path).parent.name}:{row['method']}", row["method"])
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_report(rows, [], out)


def _write_strip(strips, path: Path) -> None:
    """Per run: 6 held-out frames; rows real / dub / generate."""
    import cv2

    panels = []
    for label, real, dub, generate in strips:
        picks = np.linspace(0, len(real) - 1, 6).round().astype(int)
        grid = np.concatenate([np.concatenate(list(images[picks]), axis=1) for images in (real, dub, generate[: len(real)])], axis=0)
        grid = cv2.resize(grid, (grid.shape[1] // 2, grid.shape[0] // 2), interpolation=cv2.INTER_AREA)
        bar = np.full((24, grid.shape[1], 3), 255, np.uint8)
        cv2.putText(bar, f"{label}: real / dub / generate", (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(np.concatenate([bar, grid], axis=0))
    if panels:
        width = max(p.shape[1] for p in panels)
        panels = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels]
        cv2.imwrite(str(path), np.concatenate(panels, axis=0)[..., ::-1])


# ----------------------------------------------------------------------------------- CPU ablation

def ablate_cpu(args) -> None:
    """The same split and calls at 32² with `tiny` on this CPU: a cheap way to compare generator
    changes when no GPU is left (numbers are for ranking variants, not for the targets)."""
    import cv2

    from sparse_avatar.evaluation.face_metrics import psnr
    from sparse_avatar.files import write_text
    from sparse_avatar.model import extract_identity, new_model, render
    from sparse_avatar.model.configs import get_config
    from sparse_avatar.model.masks import dub_mask
    from sparse_avatar.training.personality import finetune_personality

    arrays = np.load(Path(args.data) / f"{args.clip}.npz")
    crops = _decode_jpegs(arrays["jpeg"], arrays["offsets"])
    speech = arrays["speech"]
    frames = np.stack([cv2.resize(frame, (32, 32), interpolation=cv2.INTER_AREA) for frame in crops])
    split = int(len(frames) * TRAIN_FRACTION)
    train, test, mask = frames[:split], frames[split:], dub_mask(32)
    mean = np.repeat(train.mean(0, keepdims=True).round().astype(np.uint8), len(test), 0)
    rows = [("baseline: mean training frame", psnr(test, mean), psnr(test, mean, mask), None)]
    variants = {
        "xpred": dict(prediction="x", loss_space="v"),
        "xpred-abs": dict(prediction="x", loss_space="v", absolute_positions=True),
        "xpred-abs-xloss": dict(prediction="x", loss_space="x", absolute_positions=True),
    }
    for name in args.variants.split(","):
        model = new_model(get_config("tiny").replace(**variants[name]), seed=0)
        model.set_attention_backend("dense")
        started = time.perf_counter()
        finetune_personality(model, train, speech[:split], Path(args.out) / f"ablation_{name}.safetensors", steps=args.steps, lora_rank=0, lr=1e-3,
                             batch_size=4, target_frames=8, reference_frames=24, dub_context_prob=0.5)
        (Path(args.out) / f"ablation_{name}.safetensors").unlink()
        identity = extract_identity(model.eval(), train, speech[:split], fps=float(arrays["fps"]))
        generated = render(model, identity, speech[split:], mode="generate", steps=10)
        dubbed = render(model, identity, speech[split:], mode="dub", steps=10, dub_frames=test)
        rows.append((name, psnr(test, generated), psnr(test, dubbed, mask), time.perf_counter() - started))
        print(rows[-1], flush=True)
    lines = [f"# Person benchmark, CPU ablation at 32² (`tiny`, {args.steps} steps, {args.clip})", "",
             "`python bench/person.py ablate-cpu`: the benchmark's split and calls at 32² on this 2-core CPU, for ranking generator "
             "changes without a GPU. Not comparable with the 256² targets.", "",
             "| variant | generate PSNR dB | dub region PSNR dB | train + render s |", "|---|---|---|---|"]
    lines += [f"| {name} | {gen:.2f} | {dub:.2f} | {'' if seconds is None else f'{seconds:.0f}'} |" for name, gen, dub, seconds in rows]
    write_text(Path(args.out) / "person_cpu_ablation.md", "\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("--out", default=".bench_data/person")
    p.add_argument("--min-seconds", type=float, default=15.0)
    p.add_argument("--jpeg-quality", type=int, default=95, help="crops travel as JPEG; 90 fits both clips with both feature sets in the GPU carry")
    r = commands.add_parser("run")
    r.add_argument("--data", default=".bench_data/person")
    r.add_argument("--out", required=True)
    r.add_argument("--variant", choices=sorted(VARIANTS), default="xpred-refine")
    r.add_argument("--config", default="small")
    r.add_argument("--name", default="", help="row name (default: the variant's)")
    r.add_argument("--init", default="", help="start from this checkpoint (.safetensors) instead of an untrained --config model")
    r.add_argument("--clips", default="", help="comma-separated clip ids (v03,v07); default all prepared")
    r.add_argument("--budget", type=float, default=600.0, help="training wall seconds per clip (0 with --init: render the checkpoint as it is, zero-shot)")
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--target-frames", type=int, default=16)
    r.add_argument("--reference-frames", type=int, default=48)
    r.add_argument("--dub-prob", type=float, default=0.5)
    r.add_argument("--dub-masks", choices=("landmarks", "box"), default="landmarks",
                   help="what dub training hides and dub renders re-render: the person's lower face from the face mesh (the pack's "
                        "default with mediapipe) or the fixed box (its fallback)")
    r.add_argument("--steps", type=int, default=10, help="sampler steps per render")
    r.add_argument("--dub-steps", default="", help="comma-separated extra sampler step counts for the dub render (extra rows)")
    r.add_argument("--audio-guidance", default="", help="comma-separated audio guidance scales for extra dub and generate renders "
                                                       "(extra rows NAME@audioX; the run's own renders use 1)")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the blocks for training (default: as Train Avatar, on CUDA with Triton)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cuda")
    r.add_argument("--smoke", action="store_true", help="a one-block model on 44 frames: checks the code path, numbers mean nothing")
    r.add_argument("--concurrent", type=int, default=1, help="how many runs share the GPU (recorded, not enforced)")
    f = commands.add_parser("profile")
    f.add_argument("--data", default=".bench_data/person")
    f.add_argument("--out", required=True)
    f.add_argument("--clip", default="v07")
    f.add_argument("--config", default="small")
    f.add_argument("--variants", default="x128:compile+nographs,x128:compile+graphs", help="NAME[:compile|eager][+graphs|nographs] (what is not named: as Train Avatar decides)")
    f.add_argument("--steps", type=int, default=40, help="timed steps (s/step from step 10 to this)")
    f.add_argument("--profile-steps", type=int, default=3)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--batch", type=int, default=8)
    f.add_argument("--target-frames", type=int, default=16)
    f.add_argument("--reference-frames", type=int, default=48)
    f.add_argument("--dub-prob", type=float, default=0.5)
    f.add_argument("--device", default="cuda")
    f.add_argument("--smoke", action="store_true", help="a one-block model on CPU: checks the code path")
    s = commands.add_parser("score")
    s.add_argument("--runs", required=True)
    s.add_argument("--data", default=".bench_data/person")
    s.add_argument("--out", default="bench/results")
    m = commands.add_parser("report")
    m.add_argument("scored", nargs="+", help="person.json files written by score")
    m.add_argument("--rename", action="append", default=[], help="FOLDER:OLD=NEW (FOLDER: the person.json's folder name)")
    m.add_argument("--out", default="bench/results")
    a = commands.add_parser("ablate-cpu")
    a.add_argument("--data", default=".bench_data/person")
    a.add_argument("--clip", default="v07_infinitetalk_ref_man_15s")
    a.add_argument("--variants", default="xpred,xpred-abs,xpred-abs-xloss")
    a.add_argument("--steps", type=int, default=300)
    a.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    {"prepare": prepare, "run": run, "profile": profile, "score": score, "report": report, "ablate-cpu": ablate_cpu}[args.command](args)


if __name__ == "__main__":
    main()
