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
# media/ is imported inside the functions that write mp4/wav or compute speech features: the shard
# half of Avatar World runs on GPU boxes that have no PyAV.

import dataclasses
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserFacingError
from ..files import atomic_output, save_safetensors, write_text
from ..training.data import shard_metadata
from ..training.preprocess import caption_from_world_metadata, write_index
from .render import FaceState, HeadRenderer, motion_track
from .speech import SAMPLE_RATE, MouthTrack, VoiceSpec, audio_mouth_track, espeak_binary, synthesize_speech
from .traits import WorldPerson, sample_scene_traits

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
    identity: WorldPerson
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
                "person": person_id(self.spec), "identity": self.identity.to_dict(),
                "scene": dataclasses.asdict(scene), "voice": self.voice, "n_frames": self.spec.n_frames,
                "sample_rate": SAMPLE_RATE}


def make_clip(spec: ClipSpec, *, identity: WorldPerson | None = None, audio: np.ndarray | None = None) -> WorldClip:
    """Build a clip from its spec; ``identity``/``audio`` override the seeded ones (used to make
    controlled variants: another person's habits, another driving speech)."""
    if not 16 <= spec.size <= 1024:
        raise UserFacingError(f"clip size must be between 16 and 1024 pixels (64–256 recommended), got {spec.size}")
    if spec.seconds <= 0:
        raise UserFacingError(f"clip duration must be positive, got {spec.seconds} s")
    identity = identity or WorldPerson.from_seed(spec.identity_seed)
    voice = {"voice_seed": spec.voice_seed, "text_seed": spec.text_seed}
    if audio is None:
        audio, voice = synthesize_speech(spec.voice_seed, spec.text_seed, spec.n_frames / spec.fps)
    mouth = audio_mouth_track(audio, spec.fps, spec.n_frames)
    state, renderer = animate(spec, identity, mouth)
    return WorldClip(spec, identity, np.asarray(audio, np.float32), voice, mouth, state, renderer)


def animate(spec: ClipSpec, identity: WorldPerson, mouth: MouthTrack) -> tuple[FaceState, HeadRenderer]:
    """The per-frame face state (the person's habits over the mouth track) and the renderer of
    the clip's person and scene: everything ``make_clip`` and the shard writer render from."""
    state = motion_track(identity.dynamic, mouth, spec.fps, spec.clip_seed)
    return state, HeadRenderer(identity.static, sample_scene_traits(spec.scene_seed), spec.size)


def person_id(spec: ClipSpec) -> str:
    return f"world-{spec.identity_seed}"


# -- writing ----------------------------------------------------------------------------------
def write_clip(clip: WorldClip, folder: Path, name: str) -> Path:
    """Write NAME.mp4/.wav/.npz and finally NAME.json; returns the JSON path."""
    from ..media import write_video
    from ..media.audio import write_wav

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
    _check_world_arguments(n_clips, size, clips_per_identity)
    espeak_binary()  # fail before starting any worker
    VoiceSpec.from_seed(0)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for index in range(n_clips):
        name = f"clip_{index:06d}"
        if not (out / f"{name}.json").is_file():
            jobs.append((dataset_spec(index, seed=seed, seconds=seconds, size=size, clips_per_identity=clips_per_identity), str(out), name))
    _run_jobs(_write_one, jobs, n_clips, workers, "avatar world", progress)
    return [out / f"clip_{index:06d}.json" for index in range(n_clips)]


# -- training shards straight from the world ------------------------------------------------
# Shards are what the trainer reads (training/data.py). Writing them here skips the mp4 round trip
# (lossless, ~10x faster than write + preprocess) and splits a clip into its two halves: the
# speech half (espeak-ng + log-mel + the documented mouth function, small) and the frames half
# (numpy + OpenCV only). A machine without espeak-ng (a rented GPU box) renders shards from speech
# files made elsewhere: copy OUT/speech/ over and run the same command.
SPEECH_FOLDER = "speech"


def clip_speech_arrays(spec: ClipSpec) -> dict:
    """The speech half of a clip: features [T, 160] (float16), the mouth track and the voice."""
    from ..media.features import speech_features

    audio, voice = synthesize_speech(spec.voice_seed, spec.text_seed, spec.n_frames / spec.fps)
    mouth = audio_mouth_track(audio, spec.fps, spec.n_frames)
    features = speech_features(audio, SAMPLE_RATE, spec.fps, n_frames=spec.n_frames)
    return {"speech": features.astype(np.float16), "openness": mouth.openness, "width": mouth.width,
            "rounding": mouth.rounding, "loudness_db": mouth.loudness_db, "voice": np.array(json.dumps(voice))}


def _write_speech_file(spec: ClipSpec, path: Path) -> None:
    with atomic_output(path) as temporary, open(temporary, "wb") as handle:
        np.savez_compressed(handle, **clip_speech_arrays(spec))


def _read_speech_file(path: Path) -> tuple[np.ndarray, MouthTrack]:
    try:
        with np.load(path, allow_pickle=False) as data:
            mouth = MouthTrack(data["openness"], data["width"], data["rounding"], data["loudness_db"])
            return data["speech"].astype(np.float32), mouth
    except (OSError, KeyError, ValueError) as error:
        raise UserFacingError(f"cannot read the speech file {path} ({error}); delete it and run the command again to remake it") from error


def write_clip_shard(spec: ClipSpec, speech_path: Path, out_file: Path) -> Path:
    """The frames half: render the clip from its speech file and write one training shard."""

    features, mouth = _read_speech_file(speech_path)
    identity = WorldPerson.from_seed(spec.identity_seed)
    state, renderer = animate(spec, identity, mouth)
    frames = np.stack(list(renderer.render_clip(state)))
    scene = dataclasses.asdict(sample_scene_traits(spec.scene_seed))
    caption = caption_from_world_metadata({"identity": identity.to_dict(), "scene": scene})
    metadata = shard_metadata(person=person_id(spec), caption=caption, fps=spec.fps, frame_size=spec.size, crop="full",
                              source=json.dumps(dataclasses.asdict(spec)))
    return save_safetensors({"frames": np.ascontiguousarray(frames), "speech": np.ascontiguousarray(features)}, out_file, metadata)


def _shard_job(job: tuple) -> str:
    spec, out_dir, name, speech_only = job
    out_dir = Path(out_dir)
    speech_path = out_dir / SPEECH_FOLDER / f"{name}.npz"
    if not speech_path.is_file():
        _write_speech_file(spec, speech_path)
    if not speech_only:
        write_clip_shard(spec, speech_path, out_dir / "clips" / f"{name}.safetensors")
    return name


def generate_world_shards(n_clips: int, seconds: float, size: int, out_dir, *, seed: int = 0, clips_per_identity: int = 2,
                          workers: int | None = None, speech_only: bool = False, progress: bool = True) -> Path:
    """Write ``n_clips`` training shards (OUT/clips/*.safetensors + OUT/index.json) in parallel,
    resumably; ``speech_only`` stops after the speech files (OUT/speech/*.npz). Returns the index
    path (``None`` with ``speech_only``)."""

    _check_world_arguments(n_clips, size, clips_per_identity)
    out = Path(out_dir).expanduser()
    (out / SPEECH_FOLDER).mkdir(parents=True, exist_ok=True)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    jobs = []
    for index in range(n_clips):
        name = f"clip_{index:06d}"
        done = (out / SPEECH_FOLDER / f"{name}.npz").is_file() if speech_only else (out / "clips" / f"{name}.safetensors").is_file()
        if not done:
            spec = dataset_spec(index, seed=seed, seconds=seconds, size=size, clips_per_identity=clips_per_identity)
            jobs.append((spec, str(out), name, speech_only))
    if any(not (out / SPEECH_FOLDER / f"{job[2]}.npz").is_file() for job in jobs):
        espeak_binary()  # fail before starting any worker
    _run_jobs(_shard_job, jobs, n_clips, workers, "avatar world shards", progress)
    return None if speech_only else write_index(out)


def _check_world_arguments(n_clips: int, size: int, clips_per_identity: int) -> None:
    if n_clips < 1:
        raise UserFacingError(f"--n must be at least 1, got {n_clips}")
    if not 64 <= size <= 256:
        raise UserFacingError(f"--size must be between 64 and 256 pixels, got {size}")
    if clips_per_identity < 1:
        raise UserFacingError("--clips-per-identity must be at least 1")


def _run_jobs(function, jobs: list, total: int, workers: int | None, description: str, progress: bool) -> None:
    from tqdm import tqdm

    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = tqdm(total=total, initial=total - len(jobs), desc=description, unit="clip", disable=not progress)
    try:
        if workers == 1:
            for job in jobs:
                function(job)
                bar.update()
        else:
            # spawn: workers must not inherit a forked torch/OpenMP state from the parent.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(function, jobs):
                    bar.update()
    finally:
        bar.close()


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
