"""Built-in procedural batches for smoke runs (``--config tiny-smoke``) and CPU tests.

No files needed: each sample is a "person" (a coloured face disc on a coloured background, drawn
from the sample's seed) whose dark mouth opens with a random loudness envelope; the speech
features are that envelope through a fixed random projection, so audio really predicts the mouth.
The reference is the same person at another time (another envelope). Real training uses shards
(``data.py``); this only proves the machinery end to end in seconds.
"""
from __future__ import annotations

import numpy as np
import torch

from .data import _mix


class SyntheticTalkingHeads:
    def __init__(self, *, global_batch_size: int, frame_size: int, speech_dim: int, target_frames: int = 4, reference_frames: int = 4, seed: int = 0, n_people: int = 8):
        self.global_batch_size = global_batch_size
        self.frame_size = frame_size
        self.speech_dim = speech_dim
        self.target_frames = target_frames
        self.reference_frames = reference_frames
        self.seed = seed
        self.n_people = n_people
        self.projection = np.random.default_rng(seed).standard_normal(speech_dim).astype(np.float32)

    def _clip(self, person: int, clip_seed: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
        look = np.random.default_rng(_mix(self.seed, person, 5))
        background, skin = look.integers(0, 256, 3), look.integers(60, 256, 3)
        radius = look.uniform(0.3, 0.42) * self.frame_size
        rng = np.random.default_rng(clip_seed)
        envelope = np.clip(np.cumsum(rng.normal(0, 0.35, frames)) % 1.0, 0, 1).astype(np.float32)
        size = self.frame_size
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        centre = size / 2
        face = (x - centre) ** 2 + (y - centre) ** 2 < radius**2
        video = np.empty((frames, size, size, 3), np.uint8)
        for t in range(frames):
            opening = 0.04 * size + 0.16 * size * envelope[t]
            mouth = ((x - centre) / (0.22 * size)) ** 2 + ((y - centre - 0.18 * size) / opening) ** 2 < 1
            image = np.where(face[..., None], skin, background)
            image[mouth & face] = (20, 10, 10)
            video[t] = image
        speech = envelope[:, None] * self.projection[None, :]
        return video, speech

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        local = self.global_batch_size // world_size
        targets, target_speech, references, reference_speech, seeds = [], [], [], [], []
        for j in range(local):
            sample_index = step * self.global_batch_size + rank * local + j
            person = _mix(self.seed, sample_index, 6) % self.n_people
            video, speech = self._clip(person, _mix(self.seed, sample_index, 7), self.target_frames)
            reference, reference_features = self._clip(person, _mix(self.seed, sample_index, 8), self.reference_frames)
            targets.append(video)
            target_speech.append(speech)
            references.append(reference)
            reference_speech.append(reference_features)
            seeds.append(_mix(self.seed, sample_index, 4) & 0x7FFFFFFFFFFFFFFF)
        return {
            "target_frames": torch.from_numpy(np.stack(targets)),
            "target_speech": torch.from_numpy(np.stack(target_speech)),
            "reference_frames": torch.from_numpy(np.stack(references)),
            "reference_speech": torch.from_numpy(np.stack(reference_speech)),
            "reference_lengths": torch.full((local,), self.reference_frames, dtype=torch.long),
            "sample_seeds": torch.tensor(seeds, dtype=torch.long),
            "captions": [f"person {_mix(self.seed, s, 6) % self.n_people} talking" for s in range(step * self.global_batch_size + rank * local, step * self.global_batch_size + (rank + 1) * local)],
        }
