"""Preference pairs for stage 5 (Diffusion-DPO): the JSONL format and the batch source.

One JSON object per line; paths are relative to the JSONL file's folder:

    {"reference": "ref.mp4",        # the person's reference video (face crops at model size)
     "audio": "drive.wav",          # driving speech (any format media.load_audio reads)
     "video_a": "a.mp4", "video_b": "b.mp4",   # two renderings of the same inputs
     "winner": "a",                 # "a" or "b"
     "fps": 25}                     # optional; default: video_a's fps

``append_pair`` adds one line (the Preference Pair node, once per human choice). The two videos
must be face crops at the model's frame size with the same frame count (which is what
``model.pipeline.render`` writes before paste-back). A training sample takes the same window of
both videos, the matching window of speech features, and the whole reference.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import UserFacingError
from .data import _mix


@dataclass(frozen=True)
class PreferencePair:
    reference: Path
    audio: Path
    video_a: Path
    video_b: Path
    winner: str
    fps: float | None = None


def read_pairs(path: str | os.PathLike) -> list[PreferencePair]:
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"preference file {path} does not exist; write one (see training/preferences.py) or make automatic pairs.")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            winner = str(row["winner"]).lower()
            if winner not in ("a", "b"):
                raise ValueError(f"winner must be 'a' or 'b', got {row['winner']!r}")
            pair = PreferencePair(
                *(path.parent / row[key] for key in ("reference", "audio", "video_a", "video_b")),
                winner=winner, fps=float(row["fps"]) if row.get("fps") else None,
            )
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as error:
            raise UserFacingError(f"{path} line {number} is not a valid preference pair ({error}); each line needs reference, audio, video_a, video_b, winner.") from None
        for file in (pair.reference, pair.audio, pair.video_a, pair.video_b):
            if not file.is_file():
                raise UserFacingError(f"{path} line {number}: {file} does not exist.")
        pairs.append(pair)
    if not pairs:
        raise UserFacingError(f"{path} holds no preference pairs.")
    return pairs


def append_pair(path: str | os.PathLike, *, reference, audio, video_a, video_b, winner: str, fps: float | None = None) -> Path:
    """Append one pair to a JSONL file (created when missing), never rewriting earlier lines.

    File arguments are paths (absolute, or relative to the working folder); they are stored
    relative to ``path``'s folder, as ``read_pairs`` expects. The line goes out in one O_APPEND
    write followed by fsync, so an interrupted append cannot damage the lines before it; a last
    line left without its newline (an editor, an earlier crash) is closed first."""
    path = Path(path)
    winner = str(winner).lower()
    if winner not in ("a", "b"):
        raise UserFacingError(f"winner must be 'a' or 'b', got {winner!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {}
    for key, file in (("reference", reference), ("audio", audio), ("video_a", video_a), ("video_b", video_b)):
        file = Path(file)
        if not file.is_file():
            raise UserFacingError(f"preference pair {key} {file} does not exist; write the file before recording the pair.")
        row[key] = os.path.relpath(file.resolve(), path.parent.resolve())
    row["winner"] = winner
    if fps:
        row["fps"] = float(fps)
    line = (json.dumps(row) + "\n").encode()
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(descriptor).st_size
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            line = b"\n" + line
        while line:
            line = line[os.write(descriptor, line):]
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return path


def _resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    if frames.shape[1:3] == (size, size):
        return frames
    import cv2

    return np.stack([cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA) for frame in frames])


class PreferencePairs:
    """Batch source: winner/loser windows + speech + reference for each pair (pure in step)."""

    def __init__(self, pairs_path, *, global_batch_size: int, frame_size: int, target_frames: int = 16, seed: int = 0):
        self.pairs = read_pairs(pairs_path)
        self.global_batch_size = global_batch_size
        self.frame_size = frame_size
        self.target_frames = target_frames
        self.seed = seed
        self._load = lru_cache(maxsize=8)(self._load_pair)

    def _load_pair(self, index: int) -> dict:
        # media needs PyAV, which a GPU box training from shards may lack: only DPO pairs read video.
        from ..media import load_audio, load_reference_video
        from ..media.features import speech_features

        pair = self.pairs[index]
        video_a = load_reference_video(str(pair.video_a), fps=pair.fps)
        fps = video_a.fps
        video_b = load_reference_video(str(pair.video_b), fps=fps)
        if len(video_a.frames) != len(video_b.frames):
            raise UserFacingError(f"{pair.video_a.name} has {len(video_a.frames)} frames but {pair.video_b.name} has {len(video_b.frames)}; a pair must render the same inputs.")
        reference = load_reference_video(str(pair.reference), fps=fps)
        wave = load_audio(str(pair.audio))
        n_frames = len(video_a.frames)
        speech = speech_features(wave, 16000, fps, n_frames=n_frames)
        reference_speech = (
            speech_features(reference.audio, 16000, fps, n_frames=len(reference.frames)) if reference.audio is not None else np.zeros((len(reference.frames), speech.shape[1]), np.float32)
        )
        winner, loser = (video_a, video_b) if pair.winner == "a" else (video_b, video_a)
        return {
            "winner": _resize_frames(winner.frames, self.frame_size),
            "loser": _resize_frames(loser.frames, self.frame_size),
            "speech": speech,
            "reference": _resize_frames(reference.frames, self.frame_size),
            "reference_speech": reference_speech,
        }

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        local = self.global_batch_size // world_size
        rows = []
        for j in range(local):
            sample_index = step * self.global_batch_size + rank * local + j
            epoch, position = divmod(sample_index, len(self.pairs))
            order = np.random.default_rng(_mix(self.seed, epoch, 2)).permutation(len(self.pairs))
            item = self._load(int(order[position]))
            length = min(self.target_frames, len(item["winner"]))
            start = int(np.random.default_rng(_mix(self.seed, sample_index, 3)).integers(0, len(item["winner"]) - length + 1))
            rows.append((item, start, length, _mix(self.seed, sample_index, 4) & 0x7FFFFFFFFFFFFFFF))
        length = min(r[2] for r in rows)
        reference_length = max(len(r[0]["reference"]) for r in rows)

        def padded(array, size):
            out = np.zeros((size, *array.shape[1:]), array.dtype)
            out[: len(array)] = array
            return out

        return {
            "winner_frames": torch.from_numpy(np.stack([r[0]["winner"][r[1] : r[1] + length] for r in rows])),
            "loser_frames": torch.from_numpy(np.stack([r[0]["loser"][r[1] : r[1] + length] for r in rows])),
            "target_speech": torch.from_numpy(np.stack([r[0]["speech"][r[1] : r[1] + length] for r in rows])).float(),
            "reference_frames": torch.from_numpy(np.stack([padded(r[0]["reference"], reference_length) for r in rows])),
            "reference_speech": torch.from_numpy(np.stack([padded(r[0]["reference_speech"], reference_length) for r in rows])).float(),
            "reference_lengths": torch.tensor([len(r[0]["reference"]) for r in rows], dtype=torch.long),
            "sample_seeds": torch.tensor([r[3] for r in rows], dtype=torch.long),
        }
