"""``python -m sparse_avatar preprocess --in VIDEOS --out SHARDS``: talking-head videos -> shards.

For each video under ``--in`` (recursively: .mp4 .mov .mkv .webm .avi .m4v):

1. decode at a constant frame rate (``--fps``, default the source's), streaming;
2. face crops at the model's frame size: ``--crop face`` tracks the face (media.track_face, a
   first streaming pass) and crops each frame (second pass) — never all full frames in RAM;
   ``--crop full`` resizes whole frames (Avatar World clips are already head shots); ``--crop
   auto`` (default) is ``full`` for Avatar World clips (sidecar JSON) and ``face`` otherwise;
3. speech features of the clip's own audio, one vector per frame (media.speech_features): the
   driving audio when the clip is a target, the reference's audio features when it is a
   reference;
4. one ``clips/<stem>-<hash>.safetensors`` per video (written atomically), then ``index.json``.

Codec latents are not stored: the shipped models use the parameter-free pixel codec, whose
latents are a reshape of the crops. Who is who: an Avatar World sidecar ``<stem>.json`` gives
``person`` (and the scene caption for stage 1); otherwise a video's parent folder names the
person (put each person's videos in one folder), or, for videos directly in ``--in``, its stem.

Parallel (one process per video, ``--workers``), resumable (finished shards are skipped; the hash
in the name covers the settings, so other settings make new shards), with a progress bar.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserFacingError
from ..files import open_safetensors, save_safetensors, write_text
from .data import INDEX_NAME, SHARD_FORMAT, SHARD_VERSION, shard_metadata

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


@dataclass
class PreprocessResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # already done (resume)
    failed: dict[str, str] = field(default_factory=dict)  # video -> reason
    index: Path | None = None


def find_videos(in_dir: Path) -> list[Path]:
    if not in_dir.is_dir():
        raise UserFacingError(f"--in {in_dir} is not a folder; pass the folder that holds your videos.")
    videos = sorted(p for p in in_dir.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not videos:
        raise UserFacingError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) found under {in_dir}.")
    return videos


def caption_from_world_metadata(metadata: dict) -> str:
    """Scene text for stage 1 from an Avatar World clip's JSON (traits -> a short sentence)."""
    static = metadata.get("identity", {}).get("static", {})
    scene = metadata.get("scene", {})
    words = ["a person"]
    if static.get("hair_style"):
        words.append(f"with {static.get('hair_colour_name', '')} {static['hair_style']} hair".replace("  ", " "))
    if static.get("eye_colour_name"):
        words.append(f"{static['eye_colour_name']} eyes")
    for accessory in ("glasses", "earrings", "hat"):
        if static.get(accessory):
            words.append(accessory)
    if scene.get("kind"):
        words.append(f"in front of a {scene['kind']} background")
    return ", ".join(words)


def _is_avatar_world_clip(video: Path) -> bool:
    sidecar = video.with_suffix(".json")
    if not sidecar.is_file():
        return False
    try:
        return json.loads(sidecar.read_text()).get("format") == "avatar-world-clip"
    except json.JSONDecodeError:
        return False


def describe_video(video: Path, in_dir: Path) -> tuple[str, str]:
    """(person id, caption) from a sidecar JSON, else from the folder layout."""
    sidecar = video.with_suffix(".json")
    if sidecar.is_file():
        try:
            metadata = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            metadata = {}
        if metadata.get("person"):
            return str(metadata["person"]), caption_from_world_metadata(metadata)
    caption_file = video.with_suffix(".txt")
    caption = caption_file.read_text().strip() if caption_file.is_file() else ""
    relative_parent = video.parent.relative_to(in_dir)
    return (str(relative_parent) if str(relative_parent) != "." else video.stem), caption


def shard_name(video: Path, in_dir: Path, *, size: int, fps: float | None, crop: str) -> str:
    key = json.dumps([str(video.relative_to(in_dir)), size, fps, crop, SHARD_VERSION])
    return f"{video.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.safetensors"


def _resize(frame: np.ndarray, size: int) -> np.ndarray:
    import cv2

    if frame.shape[:2] == (size, size):
        return frame
    # Centre-crop to a square first so faces keep their aspect ratio.
    height, width = frame.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return cv2.resize(frame[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_AREA)


def process_video(video: Path, in_dir: Path, out_file: Path, *, size: int, fps: float | None, crop: str) -> Path:
    """One video -> one shard (atomic). Raises UserFacingError for unusable videos."""
    # media needs PyAV; the rest of training imports without it (GPU boxes train from shards).
    from ..media import crop_transforms, iter_video_frames, load_audio, probe_media, track_face
    from ..media.features import speech_features

    if crop == "auto":
        crop = "full" if _is_avatar_world_clip(video) else "face"
    info = probe_media(video)
    if not info.has_audio:
        raise UserFacingError(f"{video.name} has no audio track; training needs the person's speech.")
    fps = float(fps or info.fps)
    if crop == "face":
        track = track_face(iter_video_frames(video, fps=fps), fps=fps)
        transforms = crop_transforms(track, size)
        frames = [transforms[min(i, len(transforms) - 1)].apply(frame) for i, _, frame in iter_video_frames(video, fps=fps)]
    elif crop == "full":
        frames = [_resize(frame, size) for _, _, frame in iter_video_frames(video, fps=fps)]
    else:
        raise UserFacingError(f"--crop must be 'auto', 'face' or 'full' (got {crop!r}).")
    if len(frames) < 2:
        raise UserFacingError(f"{video.name} has fewer than 2 frames at {fps} fps.")
    frame_array = np.ascontiguousarray(np.stack(frames), dtype=np.uint8)
    wave = load_audio(str(video), duration_s=len(frames) / fps)
    speech = np.ascontiguousarray(speech_features(wave, 16000, fps, n_frames=len(frames)), dtype=np.float32)
    person, caption = describe_video(video, in_dir)
    metadata = shard_metadata(person=person, caption=caption, fps=fps, frame_size=size, crop=crop, source=str(video.relative_to(in_dir)))
    return save_safetensors({"frames": frame_array, "speech": speech}, out_file, metadata)


def _process_job(job: tuple) -> tuple[str, str | None]:
    video, in_dir, out_file, size, fps, crop = job
    try:
        process_video(Path(video), Path(in_dir), Path(out_file), size=size, fps=fps, crop=crop)
        return str(video), None
    except UserFacingError as error:
        return str(video), str(error)


def write_index(out_dir: Path) -> Path:
    """Rebuild index.json from the shard files' own metadata (atomic)."""
    clips = []
    for path in sorted((out_dir / "clips").glob("*.safetensors")):
        with open_safetensors(path, what="shard", if_missing="Re-run preprocess.", framework="np",
                              if_damaged="Delete it and re-run preprocess to rebuild it.") as reader:
            metadata = reader.metadata
        if metadata.get("format") != SHARD_FORMAT:
            continue
        if "frames" not in reader.tensors or not reader.shape("frames"):
            raise UserFacingError(f"shard {path} has no frames; delete it and re-run preprocess to rebuild it.")
        n_frames = reader.shape("frames")[0]
        clips.append({
            "file": f"clips/{path.name}", "person": metadata["person"], "n_frames": int(n_frames),
            "fps": float(metadata["fps"]), "caption": metadata.get("caption", ""),
        })
    return write_text(out_dir / INDEX_NAME, json.dumps({"format": SHARD_FORMAT, "version": SHARD_VERSION, "clips": clips}, indent=1))


def preprocess_folder(in_dir, out_dir, *, size: int = 256, fps: float | None = None, crop: str = "auto", workers: int | None = None, progress: bool = True) -> PreprocessResult:
    in_dir, out_dir = Path(in_dir).resolve(), Path(out_dir)
    if size < 16 or size % 8:
        raise UserFacingError(f"--size must be a multiple of 8 and at least 16 (got {size}); use the model's frame size, e.g. 256.")
    videos = find_videos(in_dir)
    result = PreprocessResult()
    jobs = []
    for video in videos:
        out_file = out_dir / "clips" / shard_name(video, in_dir, size=size, fps=fps, crop=crop)
        if out_file.is_file():
            result.skipped.append(out_file)
        else:
            jobs.append((str(video), str(in_dir), str(out_file), size, fps, crop))
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="preprocess", unit="video", disable=not progress)
    if workers == 1:
        outcomes = (_process_job(job) for job in jobs)
        for video, error in outcomes:
            _record(result, jobs, video, error)
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_process_job, job) for job in jobs]
            for future in as_completed(futures):
                video, error = future.result()
                _record(result, jobs, video, error)
                bar.update(1)
    bar.close()
    result.index = write_index(out_dir)
    return result


def _record(result: PreprocessResult, jobs, video: str, error: str | None) -> None:
    if error is None:
        out_file = next(Path(job[2]) for job in jobs if job[0] == video)
        result.written.append(out_file)
    else:
        result.failed[video] = error
