"""Held-out evaluation suites and the evaluation run (``python -m sparse_avatar eval``).

``avatar-world-v1``: 12 cases. Identities, voices, texts and scenes all come from seeds at or above
``HELD_OUT_SEED_BASE`` (training data never uses them). Each case has

* a **reference** clip (20 s): the person speaking one text in one scene, with its own audio;
* a **driving** speech (20 s; the last case 60 s, for drift): a different text, in a different
  voice, never seen with this person;
* the **truth** clip: the renderer driving the same person in the reference's scene with that
  speech (what a perfect model would produce; also the ``ground-truth`` model).

A model gets the reference frames + reference audio and the driving audio, and must return one
frame per driving frame. Metrics (``metrics.score_clip``) read only those frames and the driving
audio. Models: ``ground-truth`` (ceiling), ``copy-reference`` (reference frames replayed: no lip
sync, the floor), or a checkpoint path (``model.pipeline.render``).
"""
from __future__ import annotations
# The model stack is imported inside the checkpoint path: the ground-truth and copy-reference
# baselines score without loading torch models or PyAV.

import json
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import UserFacingError
from ..files import write_text
from .generate import HELD_OUT_SEED_BASE, ClipSpec, WorldClip, make_clip
from .metrics import measure_frames, score_clip
from .speech import espeak_version


@dataclass(frozen=True)
class SuiteDefinition:
    name: str
    n_cases: int
    reference_seconds: float
    driving_seconds: float
    long_driving_seconds: float   # the last case, for drift over a long video
    size: int
    fps: float
    seed_offset: int


SUITES = {
    "avatar-world-v1": SuiteDefinition("avatar-world-v1", n_cases=12, reference_seconds=20.0, driving_seconds=20.0,
                                       long_driving_seconds=60.0, size=128, fps=25.0, seed_offset=HELD_OUT_SEED_BASE),
}


@dataclass
class SuiteCase:
    index: int
    reference: WorldClip
    truth: WorldClip            # the same person, reference scene, driven by the driving speech

    @property
    def driving_audio(self) -> np.ndarray:
        return self.truth.audio


def suite_definition(name: str) -> SuiteDefinition:
    if name not in SUITES:
        raise UserFacingError(f"unknown suite {name!r}; available: {', '.join(SUITES)}")
    return SUITES[name]


def build_case(suite: SuiteDefinition, index: int) -> SuiteCase:
    if not 0 <= index < suite.n_cases:
        raise UserFacingError(f"suite {suite.name} has cases 0..{suite.n_cases - 1}, not {index}")
    base = suite.seed_offset + 1000 * index
    seconds = suite.long_driving_seconds if index == suite.n_cases - 1 else suite.driving_seconds
    reference = make_clip(ClipSpec(identity_seed=base, voice_seed=base + 1, text_seed=base + 2, scene_seed=base + 3,
                                   clip_seed=base + 4, seconds=suite.reference_seconds, size=suite.size, fps=suite.fps))
    truth = make_clip(ClipSpec(identity_seed=base, voice_seed=base + 11, text_seed=base + 12, scene_seed=base + 3,
                               clip_seed=base + 14, seconds=seconds, size=suite.size, fps=suite.fps))
    return SuiteCase(index, reference, truth)


# -- models ------------------------------------------------------------------------------------
class GroundTruthModel:
    """The renderer itself: the ceiling every metric is validated against."""
    name = "ground-truth"

    def generate(self, case: SuiteCase, reference_frames: np.ndarray) -> np.ndarray:
        return case.truth.frame_array()


class CopyReferenceModel:
    """Replays the reference frames (looped): right person, right habits, no lip sync."""
    name = "copy-reference"

    def generate(self, case: SuiteCase, reference_frames: np.ndarray) -> np.ndarray:
        n = case.truth.spec.n_frames
        return reference_frames[np.arange(n) % len(reference_frames)]


class CheckpointModel:
    """A trained checkpoint through ``model.pipeline.render`` (frames resized to and from the
    model's frame size; Avatar World frames are already head crops)."""

    def __init__(self, path: str, *, steps: int = 20, device: str = "cpu", seed: int = 0):
        from ..model.checkpoint import load_checkpoint

        if not Path(path).is_file():
            raise UserFacingError(f"--model {path!r} is neither 'ground-truth', 'copy-reference' nor an existing checkpoint file")
        self.name = Path(path).name
        self.model = load_checkpoint(path, device=device)
        self.steps, self.seed = steps, seed

    def generate(self, case: SuiteCase, reference_frames: np.ndarray) -> np.ndarray:
        from .. import media
        from ..model.identity import extract_identity
        from ..model.pipeline import render

        size = self.model.config.frame_size
        fps = case.reference.spec.fps

        def resize(frames, side):
            return np.stack([cv2.resize(frame, (side, side), interpolation=cv2.INTER_AREA) for frame in frames])

        reference_crops = resize(reference_frames, size)
        reference_features = media.speech_features(case.reference.audio, 16000, fps, n_frames=len(reference_crops))
        identity = extract_identity(self.model, reference_crops, reference_features, fps=fps)
        driving = media.speech_features(case.driving_audio, 16000, fps, n_frames=case.truth.spec.n_frames)
        frames = render(self.model, identity, driving, steps=self.steps, seed=self.seed, fps=fps)
        return resize(frames, case.truth.spec.size)


def load_model(name: str, **options):
    if name == "ground-truth":
        return GroundTruthModel()
    if name == "copy-reference":
        return CopyReferenceModel()
    return CheckpointModel(name, **options)


# -- the run -----------------------------------------------------------------------------------
def _mean_or_none(values) -> float | None:
    """Mean over the cases that could be measured (strict JSON has no NaN: None if none could)."""
    finite = [float(value) for value in values if value is not None and np.isfinite(value)]
    return float(np.mean(finite)) if finite else None

def evaluate(suite_name: str, model_name: str, out_dir, *, limit: int | None = None, progress: bool = True, **model_options) -> dict:
    """Run a model over the suite; write summary.json, cases.json, report.md and plots. Returns
    the summary (one number per metric: the mean over cases)."""
    from tqdm import tqdm

    from .report import write_report

    suite = suite_definition(suite_name)
    if limit is not None and limit < 1:
        raise UserFacingError(f"--limit must be at least 1, got {limit}")
    n_cases = suite.n_cases if limit is None else min(limit, suite.n_cases)
    model = load_model(model_name, **model_options)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    cases, details = [], []
    for index in tqdm(range(n_cases), desc=f"eval {suite.name}", unit="case", disable=not progress):
        case = build_case(suite, index)
        reference_frames = case.reference.frame_array()
        reference = measure_frames(reference_frames, case.reference.spec.fps)
        started = time.perf_counter()
        frames = np.asarray(model.generate(case, reference_frames))
        seconds = time.perf_counter() - started
        expected = (case.truth.spec.n_frames, suite.size, suite.size, 3)
        if frames.shape != expected or frames.dtype != np.uint8:
            raise UserFacingError(f"model {model.name} returned frames {frames.dtype} {frames.shape}; expected uint8 {expected}")
        metrics, detail = score_clip(frames, reference, case.driving_audio, case.truth.spec.fps)
        metrics["generation_seconds"] = seconds
        cases.append({"case": index, "identity_seed": case.truth.spec.identity_seed, "driving_seconds": case.truth.spec.seconds,
                      "voice": case.truth.voice.get("voice"), **metrics})
        details.append(detail)
    keys = [key for key in cases[0] if key not in ("case", "identity_seed", "driving_seconds", "voice")]
    summary = {key: _mean_or_none([case[key] for case in cases]) for key in keys}
    summary.update({"suite": suite.name, "model": model.name, "n_cases": n_cases, "espeak_ng_version": espeak_version()})
    cases = [{key: (None if isinstance(value, float) and not np.isfinite(value) else value) for key, value in case.items()}
             for case in cases]
    write_text(out / "cases.json", json.dumps(cases, indent=1, allow_nan=False))
    write_report(out, summary, cases, details)
    write_text(out / "summary.json", json.dumps(summary, indent=1, allow_nan=False))
    return summary
