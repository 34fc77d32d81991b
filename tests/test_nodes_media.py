"""Load Reference Video and Encode Speech nodes, called as ComfyUI would, without ComfyUI.

ComfyUI's ``folder_paths`` / ``comfy`` modules are replaced by small fakes in ``sys.modules`` so
the nodes' real lazy-import paths (input folder, allowed roots, progress, cancel) are exercised.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from test_media_io import level_frames, make_clip, tone

from sparse_avatar import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from sparse_avatar.errors import UserFacingError
from sparse_avatar.nodes.comfy_types import audio_to_comfy
from sparse_avatar.media.features import SPEECH_FEATURE_DIM
from sparse_avatar.nodes import _comfy
from sparse_avatar.nodes.reference_video import LoadReferenceVideo
from sparse_avatar.nodes.speech import EncodeSpeech


class Interrupted(Exception):
    pass


@pytest.fixture
def fake_comfy(tmp_path, monkeypatch):
    """Install fake folder_paths + comfy.utils + comfy.model_management; returns a state namespace."""
    folders = {name: tmp_path / name for name in ("input", "output", "temp")}
    for folder in folders.values():
        folder.mkdir()
    state = types.SimpleNamespace(folders=folders, progress=[], interrupt_after=None, checks=0)

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_input_directory = lambda: str(folders["input"])
    folder_paths.get_output_directory = lambda: str(folders["output"])
    folder_paths.get_temp_directory = lambda: str(folders["temp"])

    def annotated(name, default_dir=None):
        for tag in ("output", "temp", "input"):
            if name.endswith(f" [{tag}]"):
                return str(folders[tag] / name[: -len(tag) - 3])
        return str(folders["input"] / name)

    folder_paths.get_annotated_filepath = annotated
    folder_paths.exists_annotated_filepath = lambda name: __import__("os").path.exists(annotated(name))

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update(self, value):
            state.progress.append(("update", value, self.total))

        def update_absolute(self, value, total=None):
            state.progress.append(("absolute", value, total))

    def throw_if_interrupted():
        state.checks += 1
        if state.interrupt_after is not None and state.checks > state.interrupt_after:
            raise Interrupted()

    comfy = types.ModuleType("comfy")
    comfy.utils = types.ModuleType("comfy.utils")
    comfy.utils.ProgressBar = ProgressBar
    comfy.model_management = types.ModuleType("comfy.model_management")
    comfy.model_management.throw_exception_if_processing_interrupted = throw_if_interrupted
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
    return state


def test_nodes_registered_with_tooltips_and_category():
    for key, node in (("SparseAvatarLoadReferenceVideo", LoadReferenceVideo), ("SparseAvatarEncodeSpeech", EncodeSpeech)):
        assert NODE_CLASS_MAPPINGS[key] is node and NODE_DISPLAY_NAME_MAPPINGS[key]
        assert node.CATEGORY == "sparse-avatar"
        assert len(node.RETURN_TYPES) == len(node.RETURN_NAMES) == len(node.OUTPUT_TOOLTIPS)
        inputs = node.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node.__name__}.{name} has no tooltip"


def test_helpers_are_no_ops_outside_comfyui(monkeypatch):
    for name in ("comfy", "comfy.utils", "comfy.model_management", "folder_paths"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    _comfy.check_interrupted()
    _comfy.progress_bar(3).update(1)
    assert _comfy.input_files((".mp4",)) == [] and _comfy.media_roots() is None
    assert LoadReferenceVideo.INPUT_TYPES()["required"]["video"][0] == []


def test_load_reference_video_from_input_folder(fake_comfy):
    make_clip(fake_comfy.folders["input"] / "person.mp4", level_frames(20, 64, 48), fps=25, audio=tone(0.8, 16000))
    (fake_comfy.folders["input"] / "notes.txt").write_text("not a video")
    listed = LoadReferenceVideo.INPUT_TYPES()["required"]["video"]
    assert listed[0] == ["person.mp4"] and listed[1]["video_upload"] is True
    assert LoadReferenceVideo.VALIDATE_INPUTS("person.mp4") is True
    assert "not found" in LoadReferenceVideo.VALIDATE_INPUTS("gone.mp4")
    assert LoadReferenceVideo.IS_CHANGED("person.mp4") == LoadReferenceVideo.IS_CHANGED("person.mp4") != ""

    reference, image, audio, fps = LoadReferenceVideo().load("person.mp4", fps=0.0, start_seconds=0.0,
                                                             end_seconds=0.0, max_side=32)
    assert reference.n_frames == 20 and fps == pytest.approx(25.0) and reference.has_audio
    assert tuple(image.shape) == (20, 24, 32, 3) and image.dtype == torch.float32
    assert audio["sample_rate"] == 16000 and tuple(audio["waveform"].shape) == (1, 1, 12800)
    assert fake_comfy.progress[-1] == ("absolute", 20, 20)


def test_load_reference_video_refuses_paths_outside_comfy_folders(fake_comfy, tmp_path):
    outside = make_clip(tmp_path / "elsewhere.mp4", level_frames(3, 32, 32))
    with pytest.raises(UserFacingError, match="outside the allowed folders"):
        LoadReferenceVideo().load(f"../{outside.name}")


def test_load_reference_video_cancel(fake_comfy):
    make_clip(fake_comfy.folders["input"] / "long.mp4", level_frames(30, 32, 32))
    fake_comfy.interrupt_after = 5
    with pytest.raises(Interrupted):
        LoadReferenceVideo().load("long.mp4")


def test_load_reference_video_from_image_input_and_silent_audio(fake_comfy):
    images = torch.rand(12, 40, 30, 3)
    reference, image, audio, fps = LoadReferenceVideo().load("", fps=0.0, images=images, max_side=0)
    assert fps == 25.0 and reference.n_frames == 12 and not reference.has_audio
    assert torch.allclose(image, images, atol=1 / 255)
    assert tuple(audio["waveform"].shape) == (1, 1, int(12 / 25 * 16000)) and float(audio["waveform"].abs().max()) == 0


def test_encode_speech_log_mel_and_frame_count(fake_comfy):
    audio = audio_to_comfy(np.stack([tone(2.0, 44100)])[0], 44100)
    speech, used_audio, n_frames = EncodeSpeech().encode(audio, fps=29.97, frames=0)
    assert n_frames == round(2.0 * 29.97) == speech["n_frames"]
    assert speech["features"].shape == (n_frames, SPEECH_FEATURE_DIM) and speech["features"].dtype == np.float32
    assert speech["audio"].shape[0] == round(n_frames / 29.97 * 16000) == used_audio["waveform"].shape[-1]
    assert [entry[0] for entry in fake_comfy.progress] == ["update", "update"]
    longer, _, forced = EncodeSpeech().encode(audio, fps=25.0, frames=75)
    assert forced == 75 and longer["features"].shape[0] == 75 and longer["audio"].shape[0] == 48000


def test_encode_speech_from_audio_encoder_output(fake_comfy):
    audio = audio_to_comfy(tone(1.0, 16000), 16000)
    encoder_output = {"encoded_audio": torch.randn(1, 50, 24)}
    speech, _, n_frames = EncodeSpeech().encode(audio, fps=25.0, frames=0, audio_encoder_output=encoder_output)
    assert n_frames == 25 and speech["features"].shape == (25, 24) and speech["feature_id"] == "audio_encoder:24"


def test_encode_speech_warns_on_silence_and_refuses_nan(fake_comfy, caplog):
    # Silence is a closed-mouth take, as in the CLI's probe and render (tests/test_node_validation.py).
    with caplog.at_level("WARNING", logger="sparse-avatar"):
        _, _, n_frames = EncodeSpeech().encode(audio_to_comfy(np.zeros(16000, np.float32), 16000), fps=25.0)
    assert n_frames == 25 and any("silent" in record.getMessage() for record in caplog.records)
    bad = tone(1.0, 16000)
    bad[5] = np.inf
    with pytest.raises(UserFacingError, match="NaN/infinite"):
        EncodeSpeech().encode(audio_to_comfy(bad, 16000), fps=25.0)
