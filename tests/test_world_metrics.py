"""Avatar World metrics: near-perfect on ground-truth renders, clearly worse under controlled
corruptions (audio shifted 5 frames, another identity, frozen mouth, frozen head, flicker, colour
drift, another scene), and the eval CLI's ceiling and floor."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from sparse_avatar.avatar_world import ClipSpec, HeadRenderer, make_clip, sample_scene_traits
from sparse_avatar.avatar_world.metrics import (background_error, drift, flicker, habit_error, lip_sync,
                                                  measure_frames, score_clip, static_identity_error,
                                                  truth_openness_from_audio)

FPS = 25.0
SIZE = 96
SECONDS = 16.0


def _spec(identity_seed: int, text_seed: int, clip_seed: int, scene_seed: int = 40) -> ClipSpec:
    return ClipSpec(identity_seed=identity_seed, voice_seed=identity_seed + 7, text_seed=text_seed, scene_seed=scene_seed,
                    clip_seed=clip_seed, seconds=SECONDS, size=SIZE)


@pytest.fixture(scope="module")
def world(request):
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    reference_clip = make_clip(_spec(3, text_seed=100, clip_seed=1))
    truth_clip = make_clip(_spec(3, text_seed=200, clip_seed=2))
    truth_frames = truth_clip.frame_array()
    return {
        "reference": measure_frames(reference_clip.frame_array(), FPS),
        "reference_frames": reference_clip.frame_array(),
        "truth_clip": truth_clip,
        "truth_frames": truth_frames,
        "truth": measure_frames(truth_frames, FPS),
        "audio_openness": truth_openness_from_audio(truth_clip.audio, FPS, truth_clip.spec.n_frames),
    }


def _render_state(clip, state) -> np.ndarray:
    renderer = HeadRenderer(clip.identity.static, sample_scene_traits(clip.spec.scene_seed), clip.spec.size)
    return np.stack(list(renderer.render_clip(state)))


def test_ground_truth_scores_near_perfect(world):
    metrics, details = score_clip(world["truth_frames"], world["reference"], world["truth_clip"].audio, FPS)
    assert metrics["sync_correlation"] >= 0.9 and metrics["sync_best_offset"] == 0
    assert metrics["identity_skin_delta_e"] < 2 and metrics["identity_hair_delta_e"] < 2
    assert metrics["identity_eye_delta_e"] < 8 and metrics["identity_accessory_mismatch"] == 0
    assert metrics["habit_blink_rate_error"] < 0.25
    assert metrics["habit_sway_frequency_error"] < 0.1 and metrics["habit_sway_amplitude_error"] < 0.1
    assert metrics["background_error"] < 0.005 and metrics["flicker"] < 1e-3 and metrics["drift_delta_e"] < 1.5
    assert metrics["face_found_fraction"] == 1.0
    assert len(details["sync_curve"]) == 21


def test_sync_detects_audio_shifted_by_five_frames(world):
    clip = world["truth_clip"]
    lag = 5 * 16000 // 25
    shifted_audio = np.concatenate([np.zeros(lag, np.float32), clip.audio[:-lag]])
    late = make_clip(clip.spec, audio=shifted_audio).frame_array()
    sync = lip_sync(measure_frames(late, FPS), world["audio_openness"])
    perfect = lip_sync(world["truth"], world["audio_openness"])
    assert sync["sync_correlation"] < perfect["sync_correlation"] - 0.3
    assert sync["sync_best_offset"] == 5 and sync["sync_best_correlation"] > 0.85


def test_sync_is_low_for_a_frozen_mouth_and_for_replayed_reference(world):
    frozen = _render_state(world["truth_clip"], world["truth_clip"].state.frozen("mouth"))
    assert lip_sync(measure_frames(frozen, FPS), world["audio_openness"])["sync_correlation"] < 0.3
    replay = world["reference_frames"][: len(world["truth_frames"])]
    assert lip_sync(measure_frames(replay, FPS), world["audio_openness"])["sync_correlation"] < 0.3


def test_frozen_head_fails_the_sway_habit(world):
    frozen = measure_frames(_render_state(world["truth_clip"], world["truth_clip"].state.frozen("head")), FPS)
    errors = habit_error(frozen, world["reference"])
    assert errors["habit_sway_amplitude_error"] > 0.8 and errors["habit_sway_frequency_error"] > 0.8
    assert habit_error(world["truth"], world["reference"])["habit_sway_amplitude_error"] < 0.1


@pytest.mark.parametrize("other_seed", [4, 9])
def test_another_identity_is_clearly_worse(world, other_seed):
    clip = world["truth_clip"]
    other = make_clip(dataclasses.replace(clip.spec, identity_seed=other_seed), audio=clip.audio)
    measured = measure_frames(other.frame_array(), FPS)
    static = static_identity_error(measured, world["reference"])
    same = static_identity_error(world["truth"], world["reference"])
    assert static["identity_skin_delta_e"] + static["identity_hair_delta_e"] > 10 + same["identity_skin_delta_e"] + same["identity_hair_delta_e"]
    habits = habit_error(measured, world["reference"])
    assert max(habits.values()) > 0.3 > max(habit_error(world["truth"], world["reference"]).values())


def test_flicker_drift_and_background_react_to_their_corruptions(world):
    frames = world["truth_frames"].astype(np.int16)
    rng = np.random.default_rng(0)
    shimmer = np.clip(frames + rng.integers(-12, 13, (len(frames), 1, 1, 1)), 0, 255).astype(np.uint8)
    assert flicker(measure_frames(shimmer, FPS)) > 0.01 > 1e-3 > flicker(world["truth"])
    tint = np.linspace(0, 40, len(frames))[:, None, None, None] * np.array([1.0, -0.5, -0.5])
    drifting = np.clip(frames + tint, 0, 255).astype(np.uint8)
    assert drift(measure_frames(drifting, FPS)) > 8 > 1.5 > drift(world["truth"])
    clip = world["truth_clip"]
    elsewhere = make_clip(dataclasses.replace(clip.spec, scene_seed=41), audio=clip.audio).frame_array()
    assert background_error(measure_frames(elsewhere, FPS), world["reference"]) > 0.05


def test_eval_cli_ceiling_and_floor(espeak, tmp_path):
    from sparse_avatar.cli import main

    assert main(["eval", "--suite", "avatar-world-v1", "--model", "ground-truth", "--limit", "1", "--out", str(tmp_path / "gt")]) == 0
    assert main(["eval", "--suite", "avatar-world-v1", "--model", "copy-reference", "--limit", "1", "--out", str(tmp_path / "copy")]) == 0
    truth = json.loads((tmp_path / "gt" / "summary.json").read_text())
    floor = json.loads((tmp_path / "copy" / "summary.json").read_text())
    sync_keys = [key for key in truth if "sync" in key]
    assert "sync_correlation" in sync_keys
    assert truth["sync_correlation"] >= 0.9 and floor["sync_correlation"] <= 0.3
    assert truth["n_cases"] == 1 and truth["model"] == "ground-truth"
    report = (tmp_path / "gt" / "report.md").read_text()
    assert "| sync_correlation |" in report and "plots/sync_case_00.png" in report
    assert (tmp_path / "gt" / "plots" / "sync_case_00.png").stat().st_size > 1000
    assert (tmp_path / "gt" / "plots" / "metrics.png").is_file()


def test_eval_rejects_unknown_suite_and_missing_checkpoint(tmp_path, capsys):
    from sparse_avatar.cli import main

    assert main(["eval", "--suite", "nope", "--model", "ground-truth", "--out", str(tmp_path)]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)]) == 2
    assert "neither 'ground-truth'" in capsys.readouterr().err


def test_eval_runs_a_checkpoint_through_the_pipeline(espeak, tmp_path, monkeypatch):
    """Wiring of --model CHECKPOINT: an untrained tiny model on a 1-case, 1-second suite. Its noise
    frames show no face, so the unmeasurable colours score the documented penalty, not NaN."""
    from sparse_avatar.model.checkpoint import new_model, save_checkpoint
    from sparse_avatar.avatar_world import suite
    from sparse_avatar.avatar_world.metrics import UNMEASURED_DELTA_E

    checkpoint = save_checkpoint(new_model("tiny", seed=0), tmp_path / "tiny.safetensors")
    tiny = dataclasses.replace(suite.SUITES["avatar-world-v1"], name="tiny-test", n_cases=1, reference_seconds=1.0,
                               driving_seconds=1.0, long_driving_seconds=1.0)
    monkeypatch.setitem(suite.SUITES, "tiny-test", tiny)
    summary = suite.evaluate("tiny-test", str(checkpoint), tmp_path / "run", steps=1, progress=False)
    assert summary["model"] == "tiny.safetensors" and summary["n_cases"] == 1
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == summary and "sync_correlation" in on_disk
    if on_disk["face_found_fraction"] == 0.0:
        assert on_disk["identity_skin_delta_e"] == UNMEASURED_DELTA_E and on_disk["sync_correlation"] == 0.0
