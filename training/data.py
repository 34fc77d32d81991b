"""Training shards and the streaming dataset that samples (target clip, reference) pairs.

Shard layout (written by ``preprocess.py``; one shard per source clip so preprocessing resumes
clip by clip):

    SHARDS/index.json                      list of clips: file, person, n_frames, fps, caption
    SHARDS/clips/<name>.safetensors        frames uint8 [T, S, S, 3] (face crops at the model's
                                           frame size), speech float32 [T, D] (one speech-feature
                                           vector per frame: the clip's own audio, which is the
                                           driving audio when the clip is a target and the
                                           "reference audio features" when it is a reference)
                                           metadata: person, fps, caption, source, frame_size, ...

The dataset streams: it opens one clip file at a time (``files.open_safetensors``: header checked) and reads only the frame
windows a sample needs (``get_slice``), so neither the shards nor a whole clip are ever in RAM.

Sampling: ``batch(step, rank, world_size)`` is a pure function (the trainer's exact-resume rule).
Each step draws one target length and one reference length for the whole global batch (lengths
vary from step to step), then for every global sample index a clip (a per-epoch permutation over
clips), a target window, and a reference window from ANOTHER time of the same person: a disjoint
window of the same clip, or a window of another clip of the same person. Each reference is
additionally cut to a random valid length (``reference_lengths``; padding is zeros), so the model
sees varied reference lengths inside one batch.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserFacingError
from ..files import open_safetensors

SHARD_FORMAT = "sparse-avatar-shard"
SHARD_VERSION = 1
INDEX_NAME = "index.json"


@dataclass(frozen=True)
class ClipEntry:
    file: str  # relative to the shard folder
    person: str
    n_frames: int
    fps: float
    caption: str


def _open_shard(path: Path):
    """A shard through the one .safetensors door (header validated and bounded before mapping)."""
    return open_safetensors(path, what="training shard", if_missing="Re-run preprocess (or world --shards) to rebuild the index.",
                            if_damaged="Delete it and re-run preprocess (or world --shards) to rebuild it.")


def shard_metadata(*, person: str, caption: str, fps: float, frame_size: int, crop: str, source: str) -> dict:
    """The string metadata every shard carries (``preprocess`` and Avatar World write the same)."""
    from ..model.configs import SPEECH_FEATURE_ID  # the media stack's, mirrored (GPU boxes lack PyAV)

    return {"format": SHARD_FORMAT, "version": str(SHARD_VERSION), "person": person, "caption": caption,
            "fps": repr(float(fps)), "frame_size": str(frame_size), "crop": crop, "source": source,
            "speech_features": SPEECH_FEATURE_ID}


def read_index(shards_dir: str | Path) -> list[ClipEntry]:
    shards_dir = Path(shards_dir)
    path = shards_dir / INDEX_NAME
    if not path.is_file():
        raise UserFacingError(
            f"{shards_dir} has no {INDEX_NAME}: it is not a shard folder. Create one with "
            f"`python -m sparse_avatar preprocess --in VIDEOS --out {shards_dir}`."
        )
    data = json.loads(path.read_text())
    if data.get("format") != SHARD_FORMAT:
        raise UserFacingError(f"{path} has format {data.get('format')!r}, expected {SHARD_FORMAT!r}; re-run preprocess.")
    clips = [ClipEntry(**clip) for clip in data["clips"]]
    if not clips:
        raise UserFacingError(f"{shards_dir} holds no clips; preprocess found no usable videos (see its warnings).")
    return clips


def _mix(*values: int) -> int:
    # Stable across processes and Python versions (unlike hash()).
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state


class ShardedClipDataset:
    """Batch source over a shard folder (see module docstring).

    ``target_frames``/``reference_frames``: (min, max) lengths in frames, drawn per step.
    ``same_clip_reference_prob``: chance a reference comes from a disjoint time of the target's own
    clip when the person also has other clips (with a single clip it always does).
    ``cut_references_to_multiple``: 0 (per-sample objectives) pads every reference to the batch's
    longest; N > 0 (a batched objective, which uses only the batch's shortest reference) keeps
    each sample's whole reference window (the step's drawn length where the clip has it) and cuts
    them on the host to the shortest, rounded down to a multiple of N frames: less to copy to the
    GPU, and a few batch shapes instead of dozens, each one torch.compile shape and one CUDA graph.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        *,
        global_batch_size: int,
        target_frames: tuple[int, int] = (8, 16),
        reference_frames: tuple[int, int] = (16, 48),
        same_clip_reference_prob: float = 0.5,
        seed: int = 0,
        cut_references_to_multiple: int = 0,
    ):
        self.shards_dir = Path(shards_dir)
        self.cut_references_to_multiple = cut_references_to_multiple
        self.clips = read_index(self.shards_dir)
        self.global_batch_size = global_batch_size
        self.target_frames = target_frames
        self.reference_frames = reference_frames
        self.same_clip_reference_prob = same_clip_reference_prob
        self.seed = seed
        self._by_person: dict[str, list[int]] = {}
        for index, clip in enumerate(self.clips):
            self._by_person.setdefault(clip.person, []).append(index)
        shortest_needed = target_frames[0] + reference_frames[0]
        usable = [c for c in self.clips if c.n_frames >= shortest_needed or len(self._by_person[c.person]) > 1]
        if not usable:
            raise UserFacingError(
                f"every clip in {self.shards_dir} is shorter than {shortest_needed} frames (target + reference) and no "
                f"person has a second clip; use longer clips or smaller --target-frames/--reference-frames."
            )
        self._usable = [i for i, c in enumerate(self.clips) if c in usable]
        with _open_shard(self.shards_dir / self.clips[0].file) as reader:
            frames_shape, speech_shape = reader.shape("frames"), reader.shape("speech")
        self.frame_size = int(frames_shape[1])
        self.speech_dim = int(speech_shape[1])

    def __len__(self) -> int:
        return len(self._usable)

    # -------------------------------------------------------------- sampling (pure functions)
    def step_lengths(self, step: int) -> tuple[int, int]:
        rng = random.Random(_mix(self.seed, step, 1))
        return rng.randint(*self.target_frames), rng.randint(*self.reference_frames)

    def clip_for_sample(self, sample_index: int) -> int:
        epoch, position = divmod(sample_index, len(self._usable))
        order = list(self._usable)
        random.Random(_mix(self.seed, epoch, 2)).shuffle(order)
        return order[position]

    def plan_sample(self, sample_index: int, target_length: int, reference_length: int) -> dict:
        """Which clip windows sample ``sample_index`` reads (no I/O)."""
        rng = random.Random(_mix(self.seed, sample_index, 3))
        clip_index = self.clip_for_sample(sample_index)
        clip = self.clips[clip_index]
        target_length = min(target_length, clip.n_frames)
        others = [i for i in self._by_person[clip.person] if i != clip_index]
        fits_in_same_clip = clip.n_frames >= target_length + reference_length
        use_same_clip = fits_in_same_clip and (not others or rng.random() < self.same_clip_reference_prob)
        if use_same_clip:
            # Split the clip at a random cut into a target part and a reference part, in random
            # order, so the two windows never overlap in time.
            target_first = rng.random() < 0.5
            cut = rng.randint(target_length, clip.n_frames - reference_length) if target_first else rng.randint(reference_length, clip.n_frames - target_length)
            if target_first:
                target_start = rng.randint(0, cut - target_length)
                reference_start = rng.randint(cut, clip.n_frames - reference_length)
            else:
                reference_start = rng.randint(0, cut - reference_length)
                target_start = rng.randint(cut, clip.n_frames - target_length)
            reference_clip, reference_take = clip_index, reference_length
        else:
            if not others:
                # Too short for two disjoint windows and no other clip: the reference is the part
                # of the clip outside the target, as long as there is.
                target_start = 0
                reference_clip, reference_start = clip_index, target_length
                reference_take = max(1, clip.n_frames - target_length)
            else:
                target_start = rng.randint(0, clip.n_frames - target_length)
                reference_clip = rng.choice(others)
                reference_take = min(reference_length, self.clips[reference_clip].n_frames)
                reference_start = rng.randint(0, self.clips[reference_clip].n_frames - reference_take)
        # Varied reference lengths inside a batch: keep between half and all of the window. Not
        # for a batched objective: it cuts the batch to its shortest reference, which of B such
        # draws is nearly always the lower end (24 of 48 frames at batch 16), so a step would
        # train on half the reference the step drew; its lengths vary from step to step instead.
        valid_length = reference_take if self.cut_references_to_multiple else rng.randint(max(1, reference_take // 2), reference_take)
        return {
            "clip": clip_index,
            "target_start": target_start,
            "target_length": target_length,
            "reference_clip": reference_clip,
            "reference_start": reference_start,
            "reference_length": valid_length,
        }

    # -------------------------------------------------------------- reading
    def _read(self, clip_index: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        with _open_shard(self.shards_dir / self.clips[clip_index].file) as reader:
            return reader.rows("frames", start, start + length), reader.rows("speech", start, start + length)

    def sample(self, sample_index: int, target_length: int, reference_length: int) -> dict:
        plan = self.plan_sample(sample_index, target_length, reference_length)
        target_frames, target_speech = self._read(plan["clip"], plan["target_start"], plan["target_length"])
        reference_frames, reference_speech = self._read(plan["reference_clip"], plan["reference_start"], plan["reference_length"])
        return {
            "target_frames": target_frames,
            "target_speech": target_speech,
            "reference_frames": reference_frames,
            "reference_speech": reference_speech,
            "caption": self.clips[plan["clip"]].caption,
            "person": self.clips[plan["clip"]].person,
            "sample_seed": _mix(self.seed, sample_index, 4) & 0x7FFFFFFFFFFFFFFF,
        }

    def require_model(self, config) -> None:
        """Refuse shards made for another model size, before any training step runs."""
        if self.frame_size != config.frame_size or self.speech_dim != config.speech_feature_dim:
            raise UserFacingError(
                f"shards in {self.shards_dir} hold {self.frame_size}px crops with {self.speech_dim}-dim speech features; the "
                f"{config.name} model needs {config.frame_size}px and {config.speech_feature_dim}. "
                f"Re-run preprocess with --size {config.frame_size}."
            )

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        local = self.global_batch_size // world_size
        target_length, reference_length = self.step_lengths(step)
        first = step * self.global_batch_size + rank * local
        samples = [self.sample(first + j, target_length, reference_length) for j in range(local)]
        return collate(samples, cut_references_to_multiple=self.cut_references_to_multiple)


class TensorOnlyBatches:
    """A batch source for a CUDA-graphed stage: another source's batches without their caption and
    person lists, which the audio stage never reads and which differ every step (a captured step
    is replayed only for batches equal in everything but tensor values)."""

    def __init__(self, source):
        self.source = source
        self.global_batch_size = source.global_batch_size

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        return {key: value for key, value in self.source.batch(step, rank, world_size).items() if not isinstance(value, list)}


def collate(samples: list[dict], *, cut_references_to_multiple: int = 0) -> dict:
    """Stack samples; targets are cut to the shortest, references zero-padded to the longest, or
    with ``cut_references_to_multiple`` N cut to the shortest rounded down to a multiple of N
    (never below the shortest when it is under N). ``shortest_reference`` (a host int): the
    shortest valid reference, what a batched objective uses without reading the lengths back."""
    target_length = min(s["target_frames"].shape[0] for s in samples)
    lengths = [s["reference_frames"].shape[0] for s in samples]
    shortest = min(lengths)
    if cut_references_to_multiple > 0:
        multiple = cut_references_to_multiple
        shortest = max(min(shortest, multiple), shortest // multiple * multiple)
        lengths = [shortest] * len(samples)
        samples = [s | {"reference_frames": s["reference_frames"][:shortest], "reference_speech": s["reference_speech"][:shortest]} for s in samples]
    reference_length = max(lengths)

    def pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
        if tensor.shape[0] == length:
            return tensor
        padding = torch.zeros((length - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
        return torch.cat([tensor, padding])

    return {
        # uint8 frames travel to the device as bytes (4x less traffic) and become float there.
        "target_frames": torch.stack([s["target_frames"][:target_length] for s in samples]),
        "target_speech": torch.stack([s["target_speech"][:target_length] for s in samples]).float(),
        "reference_frames": torch.stack([pad(s["reference_frames"], reference_length) for s in samples]),
        "reference_speech": torch.stack([pad(s["reference_speech"], reference_length) for s in samples]).float(),
        "reference_lengths": torch.tensor(lengths, dtype=torch.long),
        "shortest_reference": shortest,
        "sample_seeds": torch.tensor([s["sample_seed"] for s in samples], dtype=torch.long),
        "captions": [s["caption"] for s in samples],
        "persons": [s["person"] for s in samples],
    }
