"""The personal path: ``personalize --out FOLDER`` writes an avatar folder that survives a kill,
continues after a cancel, and ``render --avatar FOLDER`` renders from it."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparse_avatar.errors import UserFacingError
from sparse_avatar.files import open_safetensors
from sparse_avatar.model import load_checkpoint, load_identity
from sparse_avatar.model.avatar_folder import FINISHED, STOPPED, read_avatar_folder
from sparse_avatar.training import state_io

REPO = Path(__file__).resolve().parents[1]
# Tiny model, one target window per step: each step is ~2 s on two CPU cores.
TINY = ["--config", "tiny", "--minutes", "0", "--batch-size", "1", "--device", "cpu", "--allow-cpu"]


def _cli(*args: str, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return [sys.executable, "-m", f"{REPO.name}", *args], env


def _every_file_is_whole(folder: Path) -> None:
    """Integrity, not only presence: every .safetensors opens with its header checked and every
    tensor readable, every JSON parses, and no temporary file of an interrupted write is left."""
    for path in folder.rglob("*"):
        assert ".tmp" not in path.name, f"left-over temporary file {path}"
        if path.suffix == ".safetensors":
            with open_safetensors(path, what="file", if_missing="", if_damaged="") as reader:
                for name, tensor in reader.get_all().items():
                    assert tensor.float().isfinite().all(), f"{path}:{name} holds non-finite values"
        elif path.suffix == ".json":
            json.loads(path.read_text())


@pytest.fixture
def real_clip(shared_media_dir, tmp_path) -> Path:
    """2 s of a real talking head at 160 px with its sound, written at test time (never committed)."""
    from sparse_avatar.media import load_reference_video, write_video

    video = load_reference_video(str(shared_media_dir / "v07_infinitetalk_ref_man_15s.mp4"), end_s=2.0, max_side=160)
    return Path(write_video(tmp_path / "me.mp4", video.frames, video.fps, audio=video.audio, sample_rate=16000))


def test_personalize_killed_at_a_random_moment_resumes_and_renders(real_clip, tmp_path):
    folder = tmp_path / "me"
    command, env = _cli("personalize", "--video", str(real_clip), "--out", str(folder), "--steps", "6", "--checkpoint-every-s", "0.2", *TINY)
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not state_io.list_checkpoints(folder / "training") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"personalize ended before its first checkpoint:\n{process.stdout.read()}"
    moment = random.Random(os.getpid()).uniform(0.0, 1.5)  # anywhere: mid-step, mid-save
    time.sleep(moment)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()

    # Killed: nothing claims to be finished, and what is on disk is whole.
    assert not (folder / "avatar.json").exists()
    checkpoints = state_io.list_checkpoints(folder / "training")
    assert checkpoints, "the checkpoint seen before the kill is gone"
    killed_at = state_io.read_trainer_state(checkpoints[-1])["step"]
    assert 1 <= killed_at < 6
    for checkpoint in checkpoints:  # (a save cut short leaves a .tmp- folder: never read, removed by the next save)
        _every_file_is_whole(checkpoint)

    # The same command resumes from that checkpoint and finishes the job.
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming the interrupted training" in resumed.stdout
    avatar = read_avatar_folder(folder)
    assert avatar.finished and avatar.training["steps"] == 6
    assert not (folder / "training").exists()
    _every_file_is_whole(folder)
    model = load_checkpoint(avatar.model_path)
    assert load_identity(avatar.identity_path).metadata["model_fingerprint"] == model.fingerprint()
    assert model.training_stage == "personality"

    # render --avatar: the folder's model, identity and video; as long as the audio.
    out = tmp_path / "dub.mp4"
    command, env = _cli("render", "--avatar", str(folder), "--audio", str(real_clip), "--mode", "dub", "--steps", "1",
                        "--device", "cpu", "--out", str(out))
    rendered = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    from sparse_avatar.media import probe_media

    info = probe_media(out)
    assert info.has_audio and abs(info.duration_s - 2.0) < 0.15 and (info.width, info.height) == (160, 160)


@pytest.fixture
def synthetic_clip(tmp_path, monkeypatch) -> Path:
    from conftest import CentreFaceDetector

    from sparse_avatar.media import SPEECH_SAMPLE_RATE, face_track, write_video

    monkeypatch.setattr(face_track, "default_face_detector", CentreFaceDetector)  # synthetic frames have no real face
    rng = np.random.default_rng(0)
    frames = np.repeat(np.repeat(rng.integers(0, 255, (30, 16, 16, 3), dtype=np.uint8), 4, axis=1), 4, axis=2)
    t = np.arange(int(30 / 25 * SPEECH_SAMPLE_RATE)) / SPEECH_SAMPLE_RATE
    return Path(write_video(tmp_path / "me.mp4", frames, 25.0, audio=(0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)))


def test_a_cancelled_avatar_is_usable_and_the_same_call_continues_it(synthetic_clip, tmp_path):
    from sparse_avatar.training.personality import personalize_video, starting_model

    folder, lines = tmp_path / "me", []
    steps_seen = []

    def cancel_after_two() -> bool:
        return len(steps_seen) >= 2

    def progress(step, total, loss):
        steps_seen.append(step)

    kwargs = {"minutes": 0, "steps": 4, "batch_size": 1, "log": lines.append}
    personalize_video(starting_model(None, "tiny", device="cpu"), synthetic_clip, folder, progress=progress, should_cancel=cancel_after_two, **kwargs)
    stopped = read_avatar_folder(folder)
    assert stopped.training["status"] == STOPPED and stopped.training["steps"] == 2
    assert (folder / "training").is_dir()  # kept, so the next call continues
    load_checkpoint(stopped.model_path)  # usable as it is

    # Another job in the same folder is refused, naming what differs (nothing is overwritten).
    with pytest.raises(UserFacingError, match="lr 0.001 -> 0.0005"):
        personalize_video(starting_model(None, "tiny", device="cpu"), synthetic_clip, folder, lr=5e-4, **kwargs)

    steps_seen.clear()
    personalize_video(starting_model(None, "tiny", device="cpu"), synthetic_clip, folder, progress=progress, **kwargs)
    assert any("resuming" in line for line in lines) and steps_seen == [3, 4]
    finished = read_avatar_folder(folder)
    assert finished.training["status"] == FINISHED and finished.training["steps"] == 4
    assert not (folder / "training").exists()

    # Finished: the same call does nothing; a lost identity file is written again without training.
    lines.clear()
    personalize_video(starting_model(None, "tiny", device="cpu"), synthetic_clip, folder, **kwargs)
    assert "nothing to do" in lines[-1]
    (folder / "identity.safetensors").unlink()
    steps_seen.clear()
    personalize_video(starting_model(None, "tiny", device="cpu"), synthetic_clip, folder, progress=progress, **kwargs)
    assert steps_seen == [] and load_identity(folder / "identity.safetensors").metadata["model_fingerprint"] == load_checkpoint(
        folder / "model.safetensors").fingerprint()


def test_avatar_folder_mistakes_are_one_clear_line(synthetic_clip, tmp_path, capsys):
    from sparse_avatar.cli import main
    from sparse_avatar.training.personality import personalize_video, starting_model

    with pytest.raises(UserFacingError, match="for a LoRA file pass --out NAME.safetensors"):
        personalize_video(starting_model(None, "tiny", device="cpu"), synthetic_clip, tmp_path / "me", lora_rank=4, minutes=0, steps=1)
    (tmp_path / "not_a_folder").write_text("x")
    with pytest.raises(UserFacingError, match="is a file"):
        personalize_video(starting_model(None, "tiny", device="cpu"), synthetic_clip, tmp_path / "not_a_folder", minutes=0, steps=1)

    render = ["render", "--audio", str(synthetic_clip), "--out", str(tmp_path / "o.mp4"), "--device", "cpu"]
    for extra, message in [
        (["--avatar", str(tmp_path / "nobody")], "does not exist; make one with python -m sparse_avatar personalize"),
        (["--avatar", str(tmp_path)], "holds no finished avatar"),
        (["--avatar", str(tmp_path), "--model", "x.safetensors"], "not both"),
        ([], "render needs --reference VIDEO"),
    ]:
        assert main([*render, *extra]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "avatar.json").write_text("{ damaged")
    assert main([*render, "--avatar", str(tmp_path)]) == 2
    assert "avatar.json is damaged" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("sparse_avatar.media", fromlist=["whisper_available"]).whisper_available(),
                    reason='needs the whisper extra: pip install "sparse-avatar[whisper]"')
def test_a_whisper_avatar_trains_hears_and_renders_in_its_own_features(synthetic_clip, tmp_path, capsys):
    """personalize (Whisper is a new model's default): the model, its identity and its renders all
    use the Whisper definition (the clip's log-mel is computed again from its audio, not fed to it)."""
    import av

    from sparse_avatar.cli import main
    from sparse_avatar.media import WHISPER_FEATURE_DIM, WHISPER_FEATURE_ID
    from sparse_avatar.training.personality import starting_model

    folder = tmp_path / "me"
    assert main(["personalize", "--video", str(synthetic_clip), "--out", str(folder), "--steps", "1", *TINY]) == 0
    model = load_checkpoint(folder / "model.safetensors")
    assert (model.config.speech_feature_id, model.config.speech_feature_dim) == (WHISPER_FEATURE_ID, WHISPER_FEATURE_DIM)
    identity = load_identity(folder / "identity.safetensors")
    assert identity.metadata["model_fingerprint"] == model.fingerprint()
    out = tmp_path / "o.mp4"
    assert main(["render", "--avatar", str(folder), "--audio", str(synthetic_clip), "--out", str(out), "--steps", "1", "--device", "cpu"]) == 0
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames == 30 and container.streams.audio
    # A trained model keeps what it was trained to hear.
    with pytest.raises(UserFacingError, match="cannot switch to logmel"):
        starting_model(str(folder / "model.safetensors"), "tiny", device="cpu", speech_features="logmel")
    with pytest.raises(SystemExit):  # argparse names the two choices
        main(["personalize", "--video", str(synthetic_clip), "--out", str(tmp_path / "x"), "--speech-features", "mfcc", *TINY])
    assert "choose from 'logmel', 'whisper'" in capsys.readouterr().err


def test_a_new_personal_model_hears_whisper_unless_told_and_a_missing_whisper_is_refused_before_work(monkeypatch):
    from sparse_avatar.media import whisper_features
    from sparse_avatar.model.configs import SPEECH_FEATURE_ID
    from sparse_avatar.training.personality import starting_model

    assert starting_model(None, "tiny", device="cpu", speech_features="logmel").config.speech_feature_id == SPEECH_FEATURE_ID
    monkeypatch.setattr(whisper_features, "whisper_available", lambda: False)
    with pytest.raises(UserFacingError, match=r"the default for a new personal model.*pip install ctranslate2 .*--speech-features logmel"):
        starting_model(None, "tiny", device="cpu")
    with pytest.raises(UserFacingError, match="needs ctranslate2") as refused:
        starting_model(None, "tiny", device="cpu", speech_features="whisper")
    assert "the default" not in str(refused.value)
