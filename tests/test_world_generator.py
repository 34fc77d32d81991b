"""Avatar World generator: seeded determinism, static/dynamic independence, the audio -> mouth
function, the writer and the CLI."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from sparse_avatar.errors import UserFacingError
from sparse_avatar.avatar_world import (ClipSpec, FaceState, HeadRenderer, WorldPerson, audio_mouth_track, make_clip,
                                          sample_scene_traits)
from sparse_avatar.avatar_world import speech as world_speech
from sparse_avatar.avatar_world.generate import generate_world, load_clip_truth
from sparse_avatar.avatar_world.traits import sample_dynamic_traits, sample_static_traits


def _neutral_frame(identity: WorldPerson, scene_seed: int = 3, size: int = 96) -> np.ndarray:
    return HeadRenderer(identity.static, sample_scene_traits(scene_seed), size).render(FaceState.neutral().frame(0))


def test_traits_are_deterministic_per_seed_and_differ_between_seeds():
    assert WorldPerson.from_seed(7) == WorldPerson.from_seed(7)
    assert WorldPerson.from_seed(7).static != WorldPerson.from_seed(8).static
    assert WorldPerson.from_seed(7).dynamic != WorldPerson.from_seed(8).dynamic
    assert sample_scene_traits(1) == sample_scene_traits(1) != sample_scene_traits(2)


def test_clip_is_bit_identical_for_the_same_spec(espeak):
    spec = ClipSpec(identity_seed=11, voice_seed=12, text_seed=13, scene_seed=14, clip_seed=15, seconds=1.5, size=64)
    first, second = make_clip(spec), make_clip(spec)
    np.testing.assert_array_equal(first.audio, second.audio)
    np.testing.assert_array_equal(first.frame_array(), second.frame_array())
    other = make_clip(dataclasses.replace(spec, clip_seed=16))
    assert not np.array_equal(other.state.blink + other.state.shift_x, first.state.blink + first.state.shift_x)


def test_changing_dynamic_traits_keeps_the_neutral_frame_identical():
    person = WorldPerson.from_seed(21)
    other_habits = person.with_dynamic_from(WorldPerson.from_seed(22))
    assert other_habits.dynamic != person.dynamic
    np.testing.assert_array_equal(_neutral_frame(person), _neutral_frame(other_habits))
    # ...and a different static seed does change it (the check above can fail).
    assert np.abs(_neutral_frame(person).astype(int) - _neutral_frame(WorldPerson.from_seed(22)).astype(int)).mean() > 5


def test_changing_static_traits_keeps_the_motion_identical():
    rng = np.random.default_rng(0)
    wave = (rng.normal(0, 0.2, 16000 * 3) * np.repeat(rng.random(30) > 0.4, 1600)).astype(np.float32)
    spec = ClipSpec(identity_seed=31, voice_seed=0, text_seed=0, scene_seed=0, clip_seed=5, seconds=3, size=64)
    person = WorldPerson.from_seed(31)
    restyled = dataclasses.replace(person, static=sample_static_traits(32))
    a, b = make_clip(spec, identity=person, audio=wave), make_clip(spec, identity=restyled, audio=wave)
    for name, values in a.state.as_arrays().items():
        np.testing.assert_array_equal(values, b.state.as_arrays()[name], err_msg=name)
    assert not np.array_equal(a.frame_array(), b.frame_array())
    changed_habits = dataclasses.replace(person, dynamic=sample_dynamic_traits(33))
    c = make_clip(spec, identity=changed_habits, audio=wave)
    assert not np.array_equal(a.state.shift_x, c.state.shift_x)


def test_mouth_function_follows_loudness_and_spectrum():
    t = np.arange(16000) / 16000
    silence = np.zeros(8000, np.float32)
    low = (0.5 * np.sin(2 * np.pi * 300 * t[:8000])).astype(np.float32)   # dark vowel: rounded, narrow
    high = (0.5 * np.sin(2 * np.pi * 2600 * t[:8000])).astype(np.float32)  # bright: spread, wide
    track = audio_mouth_track(np.concatenate([silence, low, high]), fps=25)
    assert len(track.openness) == 38
    assert track.openness[2:8].max() == 0 and track.openness[16:22].min() > 0.8 and track.openness[28:36].min() > 0.8
    assert track.rounding[16:22].mean() > 0.9 and track.rounding[28:36].mean() < 0.1
    assert track.width[28:36].mean() > 0.9 > 0.1 > track.width[16:22].mean()
    # Exactly one value per output frame at any frame rate.
    assert len(audio_mouth_track(np.zeros(16000, np.float32), fps=29.97).openness) == 30


def test_missing_espeak_is_a_clear_user_error(monkeypatch):
    monkeypatch.setattr(world_speech.shutil, "which", lambda name: None)
    with pytest.raises(UserFacingError, match="apt-get install -y espeak-ng"):
        world_speech.synthesize_speech(1, 1, 1.0)


def test_world_writes_clips_and_resumes(espeak, tmp_path):
    paths = generate_world(2, 1.0, 64, tmp_path, workers=1, progress=False)
    metadata, truth = load_clip_truth(paths[1])
    assert metadata["n_frames"] == 25 and len(truth["openness"]) == 25 and len(truth["blink"]) == 25
    assert {"static", "dynamic"} <= set(metadata["identity"]) and metadata["voice"]["voice"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"clip_00000{i}.{ext}" for i in range(2) for ext in ("json", "mp4", "npz", "wav"))
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    (tmp_path / "clip_000001.json").unlink()  # an unfinished clip: only it is redone
    generate_world(2, 1.0, 64, tmp_path, workers=1, progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert after["clip_000000.mp4"] == before["clip_000000.mp4"] and after["clip_000001.mp4"] != before["clip_000001.mp4"]
    assert json.loads((tmp_path / "clip_000001.json").read_text()) == metadata


def test_world_cli_rejects_bad_size(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparse_avatar", "world", "--n", "1", "--size", "20", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--size must be between 64 and 256" in result.stderr


def test_world_shards_from_speech_made_elsewhere_equal_the_one_pass_shards(espeak, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from sparse_avatar.training.data import ShardedClipDataset
    from sparse_avatar.avatar_world import generate as world_generate

    one_pass = world_generate.generate_world_shards(2, 1.0, 64, tmp_path / "one", workers=1, progress=False)
    assert world_generate.generate_world_shards(2, 1.0, 64, tmp_path / "two", workers=1, speech_only=True, progress=False) is None
    assert sorted(p.name for p in (tmp_path / "two" / "speech").iterdir()) == ["clip_000000.npz", "clip_000001.npz"]
    assert not list((tmp_path / "two" / "clips").iterdir())
    # The frames half needs no espeak-ng: the speech files made above are all it reads.
    monkeypatch.setattr(world_generate, "synthesize_speech", lambda *args, **kwargs: pytest.fail("speech was synthesised again"))
    monkeypatch.setattr(world_generate, "espeak_binary", lambda: pytest.fail("espeak-ng was looked for"))
    two_pass = world_generate.generate_world_shards(2, 1.0, 64, tmp_path / "two", workers=1, progress=False)
    for name in ("clip_000000.safetensors", "clip_000001.safetensors"):
        a, b = load_file(tmp_path / "one" / "clips" / name), load_file(tmp_path / "two" / "clips" / name)
        assert a.keys() == b.keys() == {"frames", "speech"}
        assert all(np.array_equal(a[key], b[key]) for key in a)
    index = json.loads(two_pass.read_text())
    assert index == json.loads(one_pass.read_text())
    assert [clip["person"] for clip in index["clips"]] == ["world-0", "world-0"] and index["clips"][0]["n_frames"] == 25
    frames = load_file(tmp_path / "one" / "clips" / "clip_000000.safetensors")["frames"]
    assert frames.shape == (25, 64, 64, 3) and frames.std() > 5  # a rendered head, not an empty frame
    dataset = ShardedClipDataset(tmp_path / "one", global_batch_size=2, target_frames=(4, 4), reference_frames=(4, 4))
    batch = dataset.batch(0, 0, 1)
    assert tuple(batch["target_frames"].shape) == (2, 4, 64, 64, 3)
