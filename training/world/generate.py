"""Avatar World clips: a spec of seeds -> frames, speech, ground truth; and the dataset writer.

A clip is fully described by a ``ClipSpec`` (five seeds + duration, size, fps), so any clip can be
re-rendered bit-identically from its JSON. Seed ranges keep training and evaluation apart:
training identities use seeds below ``HELD_OUT_SEED_BASE``, the evaluation suite only seeds at or
above it (see ``suite.py``).

Files per clip in the output folder (all written atomically; the JSON last, so its presence marks
a finished clip and a rerun skips it):

    NAME.mp4   H.264 video with the speech (through ``media.write_video``)
    NAME.wav   the speech, 16 kHz mono 16-bit
    NAME.npz   per-frame ground truth: every ``FaceState`` field (openness, blink, yaw_deg,
               pitch_deg, roll_deg, shift_x, ...) plus ``audio_openness``/``audio_width``/
               ``audio_rounding`` (the documented audio -> mouth function before the person's habits)
    NAME.json  the spec, identity (static + dynamic traits), scene and voice parameters
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UserFacingError
from ...files import atomic_output, write_text
from .render import FaceState, HeadRenderer, motion_track
from .speech import SAMPLE_RATE, MouthTrack, VoiceSpec, audio_mouth_track, espeak_binary, synthesize_speech
from .traits import Identity, sample_scene_traits

HELD_OUT_SEED_BASE = 1_000_000_000
FORMAT = "avatar-world-clip"
VERSION = 1


@dataclass(frozen=True)
class ClipSpec:
    identity_seed: int
    voice_seed: int
    text_seed: int
    scene_seed: int
    clip_seed: int
    seconds: float = 8.0
    size: int = 128
    fps: float = 25.0

    @property
    def n_frames(self) -> int:
        return int(round(self.seconds * self.fps))


@dataclass
class WorldClip:
    """Everything about one clip except its frames (render those with ``frames()``)."""
    spec: ClipSpec
    identity: Identity
    audio: np.ndarray              # float32 mono 16 kHz, exactly n_frames / fps long
    voice: dict
    audio_mouth: MouthTrack        # the documented function of the audio
    state: FaceState               # per-frame truth after the person's habits
    renderer: HeadRenderer

    def frames(self):
        return self.renderer.render_clip(self.state)

    def frame_array(self) -> np.ndarray:
        return np.stack(list(self.frames()))

    def truth_arrays(self) -> dict:
        arrays = self.state.as_arrays()
        arrays.update(audio_openness=self.audio_mouth.openness, audio_width=self.audio_mouth.width,
                      audio_rounding=self.audio_mouth.rounding)
        return arrays

    def metadata(self) -> dict:
        scene = sample_scene_traits(self.spec.scene_seed)
        return {"format": FORMAT, "version": VERSION, "spec": dataclasses.asdict(self.spec),
                "person": f"world-{self.spec.identity_seed}", "identity": self.identity.to_dict(),
                "scene": dataclasses.asdict(scene), "voice": self.voice, "n_frames": self.spec.n_frames,
                "sample_rate": SAMPLE_RATE}


def make_clip(spec: ClipSpec, *, identity: Identity | None = None, audio: np.ndarray | None = None) -> WorldClip:
    """Build a clip from its spec; ``identity``/``audio`` override the seeded ones (used to make
    controlled variants: another person's habits, another driving speech)."""
    if not 16 <= spec.size <= 1024:
        raise UserFacingError(f"clip size must be between 16 and 1024 pixels (64–256 recommended), got {spec.size}")
    if spec.seconds <= 0:
        raise UserFacingError(f"clip duration must be positive, got {spec.seconds} s")
    identity = identity or Identity.from_seed(spec.identity_seed)
    voice = {"voice_seed": spec.voice_seed, "text_seed": spec.text_seed}
    if audio is None:
        audio, voice = synthesize_speech(spec.voice_seed, spec.text_seed, spec.n_frames / spec.fps)
    mouth = audio_mouth_track(audio, spec.fps, spec.n_frames)
    state = motion_track(identity.dynamic, mouth, spec.fps, spec.clip_seed)
    renderer = HeadRenderer(identity.static, sample_scene_traits(spec.scene_seed), spec.size)
    return WorldClip(spec, identity, np.asarray(audio, np.float32), voice, mouth, state, renderer)


# -- writing ----------------------------------------------------------------------------------
def write_clip(clip: WorldClip, folder: Path, name: str) -> Path:
    """Write NAME.mp4/.wav/.npz and finally NAME.json; returns the JSON path."""
    from ...media import write_video
    from ...media.audio import write_wav

    folder.mkdir(parents=True, exist_ok=True)
    write_video(folder / f"{name}.mp4", clip.frames(), clip.spec.fps, audio=clip.audio, sample_rate=SAMPLE_RATE)
    write_wav(folder / f"{name}.wav", clip.audio, SAMPLE_RATE)
    with atomic_output(folder / f"{name}.npz") as temporary, open(temporary, "wb") as handle:
        np.savez_compressed(handle, **clip.truth_arrays())
    metadata = clip.metadata()
    metadata["files"] = {kind: f"{name}.{kind}" for kind in ("mp4", "wav", "npz")}
    write_text(folder / f"{name}.json", json.dumps(metadata, indent=1))
    return folder / f"{name}.json"


def dataset_spec(index: int, *, seed: int, seconds: float, size: int, clips_per_identity: int) -> ClipSpec:
    """Clip ``index`` of a training set: ``clips_per_identity`` consecutive clips share a person
    (and that person's voice), each with its own text, scene and events."""
    identity_index = index // clips_per_identity
    base = seed * 10_000_000
    if base + index >= HELD_OUT_SEED_BASE:
        raise UserFacingError(f"--seed {seed} with {index + 1} clips reaches the held-out evaluation seeds; use a smaller --seed")
    return ClipSpec(identity_seed=base + identity_index, voice_seed=base + identity_index, text_seed=base + index,
                    scene_seed=base + index, clip_seed=base + index, seconds=seconds, size=size)


def _write_one(job: tuple) -> str:
    spec, folder, name = job
    write_clip(make_clip(spec), Path(folder), name)
    return name


def generate_world(n_clips: int, seconds: float, size: int, out_dir, *, seed: int = 0, clips_per_identity: int = 2,
                   workers: int | None = None, progress: bool = True) -> list[Path]:
    """Write ``n_clips`` clips into ``out_dir`` in parallel; clips already finished are skipped."""
    from tqdm import tqdm

    if n_clips < 1:
        raise UserFacingError(f"--n must be at least 1, got {n_clips}")
    if not 64 <= size <= 256:
        raise UserFacingError(f"--size must be between 64 and 256 pixels, got {size}")
    if clips_per_identity < 1:
        raise UserFacingError("--clips-per-identity must be at least 1")
    espeak_binary()  # fail before starting any worker
    VoiceSpec.from_seed(0)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for index in range(n_clips):
        name = f"clip_{index:06d}"
        if not (out / f"{name}.json").is_file():
            jobs.append((dataset_spec(index, seed=seed, seconds=seconds, size=size, clips_per_identity=clips_per_identity), str(out), name))
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = tqdm(total=n_clips, initial=n_clips - len(jobs), desc="avatar world", unit="clip", disable=not progress)
    try:
        if workers == 1:
            for job in jobs:
                _write_one(job)
                bar.update()
        else:
            # spawn: workers must not inherit a forked torch/OpenMP state from the parent.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_write_one, jobs):
                    bar.update()
    finally:
        bar.close()
    return [out / f"clip_{index:06d}.json" for index in range(n_clips)]


def load_clip_truth(json_path) -> tuple[dict, dict]:
    """(metadata, per-frame truth arrays) of a written clip."""
    json_path = Path(json_path)
    try:
        metadata = json.loads(json_path.read_text())
    except (OSError, ValueError) as error:
        raise UserFacingError(f"cannot read Avatar World clip metadata {json_path}: {error}; regenerate the clip") from error
    if metadata.get("format") != FORMAT:
        raise UserFacingError(f"{json_path} is not an Avatar World clip (format {metadata.get('format')!r})")
    with np.load(json_path.with_suffix(".npz"), allow_pickle=False) as data:
        truth = {key: data[key] for key in data.files}
    return metadata, truth
