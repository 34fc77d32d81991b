"""Avatar World drawn straight into training batches, for smoke runs (``--config tiny-smoke``,
``--data synthetic``) and CPU tests: no files, no speech synthesis.

Each sample is an Avatar World person (the one procedural face generator of the pack) in their
scene, animated by their own habits over a random loudness envelope that drives the mouth; the
speech features are that envelope through a fixed random projection, so the audio really predicts
the mouth. The reference is the same person at another time (another envelope, another clip
seed). ``batch(step, rank, world_size)`` is a pure function of its arguments (the trainer's
exact-resume rule). Real training reads shards (``training/data.py``; ``world --shards`` writes
Avatar World ones with espeak-ng speech).
"""
from __future__ import annotations

import numpy as np
import torch

from ..training.data import _mix
from .render import HeadRenderer, motion_track
from .speech import MouthTrack
from .traits import WorldPerson, sample_scene_traits

FPS = 25.0
SMALLEST_FRAME = 32  # HeadRenderer's smallest size; smaller frames are drawn at 32 and downsampled


class WorldBatches:
    def __init__(self, *, global_batch_size: int, frame_size: int, speech_dim: int, target_frames: int = 4,
                 reference_frames: int = 4, seed: int = 0, n_people: int = 8):
        self.global_batch_size = global_batch_size
        self.frame_size = frame_size
        self.speech_dim = speech_dim
        self.target_frames = target_frames
        self.reference_frames = reference_frames
        self.seed = seed
        self.n_people = n_people
        self.projection = np.random.default_rng(seed).standard_normal(speech_dim).astype(np.float32)
        self._renderers: dict[int, HeadRenderer] = {}  # person -> renderer (the static layers are drawn once)

    def _person(self, person: int) -> tuple[WorldPerson, HeadRenderer]:
        identity = WorldPerson.from_seed(_mix(self.seed, person, 5) & 0x7FFFFFFF)
        if person not in self._renderers:
            scene = sample_scene_traits(_mix(self.seed, person, 9) & 0x7FFFFFFF)
            self._renderers[person] = HeadRenderer(identity.static, scene, max(SMALLEST_FRAME, self.frame_size))
        return identity, self._renderers[person]

    def _clip(self, person: int, clip_seed: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
        identity, renderer = self._person(person)
        rng = np.random.default_rng(clip_seed)
        envelope = np.clip(np.cumsum(rng.normal(0, 0.35, frames)) % 1.0, 0, 1).astype(np.float32)
        mouth = MouthTrack(openness=envelope, width=np.full(frames, 0.5, np.float32), rounding=np.zeros(frames, np.float32),
                           loudness_db=(-60 + 50 * envelope).astype(np.float32))
        state = motion_track(identity.dynamic, mouth, FPS, clip_seed & 0x7FFFFFFF)
        video = np.stack(list(renderer.render_clip(state)))
        if video.shape[1] != self.frame_size:
            import cv2  # only for frames below the renderer's smallest size

            video = np.stack([cv2.resize(frame, (self.frame_size, self.frame_size), interpolation=cv2.INTER_AREA) for frame in video])
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
        first = step * self.global_batch_size + rank * local
        return {
            "target_frames": torch.from_numpy(np.stack(targets)),
            "target_speech": torch.from_numpy(np.stack(target_speech)),
            "reference_frames": torch.from_numpy(np.stack(references)),
            "reference_speech": torch.from_numpy(np.stack(reference_speech)),
            "reference_lengths": torch.full((local,), self.reference_frames, dtype=torch.long),
            "shortest_reference": self.reference_frames,
            "sample_seeds": torch.tensor(seeds, dtype=torch.long),
            "captions": [f"person {_mix(self.seed, s, 6) % self.n_people} talking" for s in range(first, first + local)],
        }
