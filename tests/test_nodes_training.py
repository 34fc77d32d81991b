"""Train Avatar, Load Avatar LoRA and Preference Pair, run as plain classes (no ComfyUI).

Train Avatar runs under ``torch.inference_mode()`` as ComfyUI runs every node. The references are
synthetic (a textured moving picture + a modulated tone); Haar finds no face in them, so the face
detector is replaced by one that reports a fixed box (as tests/test_media_face.py does): the real
track -> crop path runs on top of it. ComfyUI's progress and cancel modules are faked in
``sys.modules`` for the cancel test.
"""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sparse_avatar import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from sparse_avatar.errors import UserFacingError
from sparse_avatar.media import SPEECH_SAMPLE_RATE, load_audio, load_reference_video, reference_from_frames, write_video
from sparse_avatar.media import face_track
from sparse_avatar.model.checkpoint import new_model, save_checkpoint
from sparse_avatar.model.identity import extract_identity
from sparse_avatar.nodes import _comfy
from sparse_avatar.nodes.comfy_types import audio_to_comfy, frames_to_comfy_image
from sparse_avatar.nodes.avatar_model import LoadAvatarModel
from sparse_avatar.nodes.generation import SparseReferenceSampler
from sparse_avatar.nodes.speech import EncodeSpeech
from sparse_avatar.nodes.training import LoadAvatarLoRA, RecordPreferencePair, TrainAvatar
from sparse_avatar.training.preferences import PreferencePairs, append_pair, read_pairs
from conftest import CentreFaceDetector

FPS = 25.0


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


def _as_if_pretrained(seed: int):
    """A tiny model whose zero-initialised gates and output layer are filled in, so every block
    (and so a LoRA on it) changes the output; a fresh model predicts zero velocity everywhere."""
    model = new_model("tiny", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.dit.parameters():
            if not parameter.any():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture
def models_cwd(tmp_path, monkeypatch):
    """Outside ComfyUI the nodes use ./models/<folder> and ./output; a fresh folder with two tiny checkpoints."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(face_track, "default_face_detector", CentreFaceDetector)  # synthetic frames have no real face
    (tmp_path / "models" / "avatar").mkdir(parents=True)
    save_checkpoint(_as_if_pretrained(3), tmp_path / "models" / "avatar" / "tiny.safetensors")
    save_checkpoint(_as_if_pretrained(4), tmp_path / "models" / "avatar" / "other.safetensors")
    return tmp_path


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(round(seconds * SPEECH_SAMPLE_RATE))) / SPEECH_SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _moving_frames(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 255, (size // 4, size // 4 + count, 3)).astype(np.uint8)
    texture = np.repeat(np.repeat(texture, 4, axis=0), 4, axis=1)
    return np.stack([texture[:, 4 * i: 4 * i + size] for i in range(count)])


def _reference(tmp_path, *, frames: int = 30, with_audio: bool = True):
    path = tmp_path / ("reference.mp4" if with_audio else "silent_reference.mp4")
    write_video(path, _moving_frames(frames), FPS, audio=_tone(frames / FPS) if with_audio else None)
    return load_reference_video(str(path))


def _load(name="tiny.safetensors"):
    (handle,) = LoadAvatarModel().load(name, dtype="fp32", attention="naive")
    return handle


def _render(handle, seed=1):
    """Latents of a short render with a fixed identity input, to compare models."""
    avatar = handle.ready()
    crops = _moving_frames(8, size=avatar.config.frame_size, seed=5)
    identity = extract_identity(avatar, crops, None, fps=FPS)
    (speech, _, _) = EncodeSpeech().encode(audio_to_comfy(_tone(0.32), SPEECH_SAMPLE_RATE), fps=FPS)
    (latent,) = SparseReferenceSampler().sample(handle, identity, speech, steps=1, seed=seed, chunk_frames=8, overlap_frames=0)
    return latent["samples"]


def _lora_steps(path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.metadata()["steps"])


def test_nodes_are_registered_with_tooltips():
    for key, node, category in (("SparseAvatarTrain", TrainAvatar, "sparse-avatar/training"),
                                ("SparseAvatarLoadLoRA", LoadAvatarLoRA, "sparse-avatar"),
                                ("SparseAvatarPreferencePair", RecordPreferencePair, "sparse-avatar/training")):
        assert NODE_CLASS_MAPPINGS[key] is node and NODE_DISPLAY_NAME_MAPPINGS[key]
        assert node.CATEGORY == category
        assert len(node.RETURN_TYPES) == len(node.RETURN_NAMES) == len(node.OUTPUT_TOOLTIPS)
        for name, spec in node.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), f"{node.__name__}.{name} has no tooltip"
    assert TrainAvatar.OUTPUT_NODE and RecordPreferencePair.OUTPUT_NODE
    defaults = TrainAvatar.INPUT_TYPES()["required"]
    assert defaults["lora_rank"][1]["default"] == 0  # full training: no trained base ships yet
    assert TrainAvatar.INPUT_TYPES()["optional"]["minutes"][1]["default"] == 10.0


def test_train_avatar_writes_a_lora_that_load_avatar_lora_applies(models_cwd):
    reference = _reference(models_cwd)
    with torch.inference_mode():  # as ComfyUI runs nodes
        base = _load()
        before = {name: tensor.clone() for name, tensor in base.model.state_dict().items()}
        result = TrainAvatar().train(base, reference, steps=2, allow_cpu=True, lora_rank=4, learning_rate=1e-2, seed=7,
                                     filename_prefix="person")
        trained, lora_path = result["result"]
        # the loaded model (in ComfyUI's cache) is untouched
        assert all(torch.equal(before[name], tensor) for name, tensor in base.model.state_dict().items())
        assert trained is not base and trained.model is not base.model
    lora_file = models_cwd / "models" / "avatar_loras" / "person_00001.safetensors"
    assert lora_path == str(lora_file) and lora_file.is_file() and _lora_steps(lora_file) == 2
    assert result["ui"]["text"] == ["person_00001.safetensors (2 steps)"]

    assert "person_00001.safetensors" in LoadAvatarLoRA.INPUT_TYPES()["required"]["lora"][0]
    (loaded,) = LoadAvatarLoRA().load(base, "person_00001.safetensors")
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, trained.model.state_dict()[name]), name
    base_latents, tuned_latents = _render(base), _render(loaded)
    assert (base_latents - tuned_latents).abs().max() > 1e-4, "the LoRA must change the model's output"
    assert torch.equal(_render(base), base_latents)

    # a second run never overwrites the first file
    again = TrainAvatar().train(base, reference, steps=1, allow_cpu=True, lora_rank=2, filename_prefix="person")
    assert again["result"][1].endswith("person_00002.safetensors") and _lora_steps(lora_file) == 2


def test_load_avatar_lora_refuses_another_base_and_missing_files(models_cwd):
    reference = _reference(models_cwd)
    base = _load()
    TrainAvatar().train(base, reference, steps=1, allow_cpu=True, lora_rank=2, filename_prefix="person")
    with pytest.raises(UserFacingError, match="trained on base model"):
        LoadAvatarLoRA().load(_load("other.safetensors"), "person_00001.safetensors")
    with pytest.raises(UserFacingError, match="not found in models/avatar_loras"):
        LoadAvatarLoRA().load(base, "missing.safetensors")
    with pytest.raises(UserFacingError, match="not found"):
        LoadAvatarLoRA().load(base, "../avatar/tiny.safetensors")  # no escaping the LoRA folder


@pytest.mark.parametrize("progress_hook_raises", [True, False], ids=["in-progress-hook", "between-steps"])
def test_train_avatar_cancel_after_one_step_still_writes_the_lora(models_cwd, monkeypatch, progress_hook_raises):
    """Cancel pressed during step 1. In ComfyUI the progress bar's hook raises the interrupt (and
    clears the flag) when it is next updated; otherwise the trainer sees the flag between steps."""
    state = types.SimpleNamespace(interrupted=False, progress=[], cancel_at=1)

    def throw_if_interrupted():
        if state.interrupted:
            state.interrupted = False
            raise Interrupted()

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state.progress.append(value)
            if value == state.cancel_at:
                state.interrupted = True  # the user pressed Cancel during this step
            if progress_hook_raises:
                throw_if_interrupted()  # what ComfyUI's progress hook does

    comfy = types.ModuleType("comfy")
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.utils.ProgressBar = ProgressBar
    comfy.model_management = types.ModuleType("comfy.model_management")
    comfy.model_management.InterruptProcessingException = Interrupted
    comfy.model_management.processing_interrupted = lambda: state.interrupted
    comfy.model_management.throw_exception_if_processing_interrupted = throw_if_interrupted
    comfy.model_management.get_torch_device = lambda: torch.device("cpu")
    for name, module in (("comfy", comfy), ("comfy.utils", comfy.utils), ("comfy.model_management", comfy.model_management),
                         ("comfy.model_patcher", None), ("folder_paths", None)):
        monkeypatch.setitem(sys.modules, name, module)

    reference = _reference(models_cwd)
    with torch.inference_mode():
        base = _load()
        with pytest.raises(Interrupted):  # ComfyUI's interrupt is re-raised once the LoRA is saved
            TrainAvatar().train(base, reference, steps=50, allow_cpu=True, lora_rank=2, filename_prefix="cancelled")
    lora_file = models_cwd / "models" / "avatar_loras" / "cancelled_00001.safetensors"
    assert state.progress == [1] and lora_file.is_file() and _lora_steps(lora_file) == 1
    assert not state.interrupted, "the interrupt was raised once, as ComfyUI expects"
    (loaded,) = LoadAvatarLoRA().load(base, lora_file.name)
    assert loaded.model is not base.model

    # The training state stayed (one checkpoint, whole): the same inputs queued again continue
    # from step 1 instead of starting over, and a finished job leaves no state behind.
    (job,) = (models_cwd / "output" / "sparse_avatar_training").glob("job-*")
    assert [p.name for p in job.glob("step-*")] == ["step-00000001"]
    if not progress_hook_raises:
        return  # (the rest is the same for both ways of cancelling)
    state.cancel_at, state.progress = 2, []
    with torch.inference_mode(), pytest.raises(Interrupted):
        TrainAvatar().train(base, reference, steps=50, allow_cpu=True, lora_rank=2, filename_prefix="cancelled")
    assert state.progress == [2] and _lora_steps(models_cwd / "models" / "avatar_loras" / "cancelled_00002.safetensors") == 2
    state.cancel_at = None
    with torch.inference_mode():
        TrainAvatar().train(base, reference, steps=1, allow_cpu=True, lora_rank=2, filename_prefix="done")
    assert _lora_steps(models_cwd / "models" / "avatar_loras" / "done_00001.safetensors") == 1
    assert [p.name for p in (models_cwd / "output" / "sparse_avatar_training").iterdir()] == [job.name]


def test_train_avatar_needs_the_references_own_audio(models_cwd):
    silent = _reference(models_cwd, with_audio=False)
    with pytest.raises(UserFacingError, match="needs its own audio track"):
        TrainAvatar().train(_load(), silent, steps=1, allow_cpu=True)
    from_images = reference_from_frames(_moving_frames(30), FPS)
    with pytest.raises(UserFacingError, match="needs its own audio track"):
        TrainAvatar().train(_load(), from_images, steps=1, allow_cpu=True)
    with pytest.raises(UserFacingError, match="not allowed"):
        TrainAvatar().train(_load(), _reference(models_cwd), steps=1, allow_cpu=True, filename_prefix="../escape")
    with pytest.raises(UserFacingError, match="Load Reference Video"):
        TrainAvatar().train(_load(), "reference.mp4", steps=1, allow_cpu=True)
    assert not (models_cwd / "models" / "avatar_loras").exists() or not any((models_cwd / "models" / "avatar_loras").iterdir())


def test_train_avatar_refuses_a_cpu_unless_allowed(models_cwd, monkeypatch):
    """As `personalize` and `train --video` do (the same message), before any work."""
    from sparse_avatar.nodes import _models
    from sparse_avatar.nodes import training as training_nodes

    monkeypatch.setattr(_models, "compute_device", lambda: torch.device("cpu"))  # what ComfyUI picks with --cpu
    monkeypatch.setattr(training_nodes, "check_own_audio", lambda *_, **__: pytest.fail("worked before refusing"))  # the first work
    kind, options = TrainAvatar.INPUT_TYPES()["optional"]["allow_cpu"]
    assert kind == "BOOLEAN" and options["default"] is False and options["tooltip"]
    with pytest.raises(UserFacingError, match="needs a CUDA GPU.*set Train Avatar's allow_cpu to true"):
        TrainAvatar().train(_load(), _reference(models_cwd), steps=1)
    with pytest.raises(pytest.fail.Exception, match="worked before refusing"):  # allowed: it goes on to the work
        TrainAvatar().train(_load(), _reference(models_cwd), steps=1, allow_cpu=True)
    monkeypatch.setattr(_models, "compute_device", lambda: torch.device("cuda"))
    with pytest.raises(pytest.fail.Exception, match="worked before refusing"):  # and so does a GPU
        TrainAvatar().train(_load(), _reference(models_cwd), steps=1)


def _video(seed: int, frames: int = 12, size: int = 32, audio_seconds: float | None = None):
    images = frames_to_comfy_image(_moving_frames(frames, size=size, seed=seed))
    wave = _tone(frames / FPS if audio_seconds is None else audio_seconds)
    return _comfy.make_video(images, FPS, audio_to_comfy(wave, SPEECH_SAMPLE_RATE))


def test_preference_pair_appends_lines_the_dpo_reader_loads(models_cwd):
    reference = _reference(models_cwd)
    node = RecordPreferencePair()
    first = node.record(_video(1), _video(2), reference, winner="A", pairs_name="session")
    pairs_file = models_cwd / "output" / "sparse-avatar" / "preferences" / "session.jsonl"
    assert first["result"] == (str(pairs_file),)
    first_line = pairs_file.read_text()
    second = node.record(_video(3), _video(4), reference, winner="B", pairs_name="session.jsonl")
    assert "2 pairs in session.jsonl" in second["ui"]["text"][0]
    assert pairs_file.read_text().startswith(first_line), "earlier lines are never rewritten"

    pairs = read_pairs(pairs_file)
    assert [pair.winner for pair in pairs] == ["a", "b"] and pairs[0].fps == FPS
    folder = pairs_file.parent / "session"
    assert pairs[0].video_a == pairs_file.parent / "session" / "pair_00001_a.mp4"
    assert pairs[1].video_b.resolve() == (folder / "pair_00002_b.mp4").resolve()
    assert pairs[0].reference == pairs[1].reference, "the reference crops are written once"
    assert json.loads(first_line)["reference"].startswith("session/reference_")
    assert len(load_audio(str(pairs[0].audio))) == round(12 / FPS * SPEECH_SAMPLE_RATE)

    batch = PreferencePairs(pairs_file, global_batch_size=2, frame_size=32, target_frames=8).batch(0, 0, 1)
    assert tuple(batch["winner_frames"].shape) == (2, 8, 32, 32, 3)
    assert tuple(batch["reference_frames"].shape[1:]) == (30, 32, 32, 3)
    assert float(batch["reference_speech"].abs().sum()) > 0, "the reference crops keep the reference's own audio"


def test_preference_pair_refuses_mismatched_inputs(models_cwd):
    reference = _reference(models_cwd)
    node = RecordPreferencePair()
    with pytest.raises(UserFacingError, match="same speech at the same size"):
        node.record(_video(1), _video(2, frames=10), reference, winner="A")
    wide = _comfy.make_video(frames_to_comfy_image(_moving_frames(12, 32)[:, :24]), FPS, None)
    with pytest.raises(UserFacingError, match="square face crops"):
        node.record(wide, wide, reference, winner="A")
    with pytest.raises(UserFacingError, match="different audio"):
        node.record(_video(1), _video(2, audio_seconds=0.2), reference, winner="A")
    with pytest.raises(UserFacingError, match="not allowed"):
        node.record(_video(1), _video(2), reference, winner="A", pairs_name="../outside")
    assert not (models_cwd / "output" / "sparse-avatar" / "preferences" / "pairs.jsonl").exists()


def test_append_pair_keeps_earlier_lines_and_closes_an_unterminated_one(tmp_path):
    files = {key: tmp_path / "clips" / f"{key}.bin" for key in ("reference", "audio", "video_a", "video_b")}
    for path in files.values():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    pairs_file = tmp_path / "pairs.jsonl"
    hand_written = json.dumps({key: f"clips/{key}.bin" for key in files} | {"winner": "b"})
    pairs_file.write_text(hand_written)  # an editor left it without a final newline
    append_pair(pairs_file, **files, winner="A", fps=30)
    lines = pairs_file.read_text().splitlines()
    assert lines[0] == hand_written and json.loads(lines[1])["video_a"] == "clips/video_a.bin"
    assert [pair.winner for pair in read_pairs(pairs_file)] == ["b", "a"]
    with pytest.raises(UserFacingError, match="winner"):
        append_pair(pairs_file, **files, winner="c")
    with pytest.raises(UserFacingError, match="does not exist"):
        append_pair(pairs_file, **{**files, "video_b": tmp_path / "gone.mp4"}, winner="a")
    assert len(pairs_file.read_text().splitlines()) == 2
