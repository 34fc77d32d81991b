"""Issue 15: errors before work, a readable error title, real advice, and one audio check.

- Load Reference Video's VALIDATE_INPUTS returns a message (ComfyUI turns it into HTTP 400 with a
  node error) for what ComfyUI's own checks skip once an input is named there, and True otherwise.
- Every pack error is titled ``sparse-avatar.UserFacingError`` in ComfyUI, still is a
  UserFacingError / ValueError, and still pickles.
- ``probe``, ``render`` and Encode Speech agree on silent, header-only and NaN audio.
- A good video with a damaged audio track is a silent reference with a warning.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import os
import pickle
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from test_media_face import ScriptedDetector, _indexed_frames
from test_media_io import level_frames, make_clip, tone
from test_nodes_media import fake_comfy  # noqa: F401 - the fixture

from sparse_avatar import cli
from sparse_avatar import errors as errors_module
from sparse_avatar.errors import UserFacingError
from sparse_avatar.media import load_reference_video, track_face
from sparse_avatar.nodes.comfy_types import audio_to_comfy
from sparse_avatar.media.audio import write_wav
from sparse_avatar.nodes import _comfy
from sparse_avatar.nodes.reference_video import LoadReferenceVideo
from sparse_avatar.nodes.speech import EncodeSpeech

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------- ComfyUI's validation rule


def _named_inputs(node) -> tuple[list[str], bool]:
    """What ComfyUI's execution.validate_inputs reads from VALIDATE_INPUTS' signature."""
    spec = inspect.getfullargspec(node.VALIDATE_INPUTS)
    return spec.args, spec.varkw is not None


def _builtin_range_errors(node, values: dict) -> list[str]:
    """ComfyUI's min/max check, which it runs only for inputs VALIDATE_INPUTS does not name."""
    named, has_kwargs = _named_inputs(node) if hasattr(node, "VALIDATE_INPUTS") else ([], False)
    errors = []
    for name, spec in node.INPUT_TYPES()["required"].items():
        if name not in values or name in named or has_kwargs or not isinstance(spec[0], str):
            continue
        value, options = values[name], spec[1]
        if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
            errors.append(name)
    return errors


@pytest.mark.parametrize("node", [LoadReferenceVideo, EncodeSpeech])
def test_every_numeric_input_declares_its_range(node):
    for section in ("required", "optional"):
        for name, spec in node.INPUT_TYPES().get(section, {}).items():
            if spec[0] in ("INT", "FLOAT"):
                assert "min" in spec[1] and "max" in spec[1], f"{node.__name__}.{name} has no min/max"


def test_validate_inputs_names_only_what_it_checks():
    named, has_kwargs = _named_inputs(LoadReferenceVideo)
    assert not has_kwargs  # **kwargs would switch off every built-in check of the node
    assert named == ["cls", "video", "start_seconds", "end_seconds"]
    # fps and max_side keep ComfyUI's own min/max: -5 fps and max side -8 are refused before anything runs.
    assert _builtin_range_errors(LoadReferenceVideo, {"fps": -5.0, "max_side": -8}) == ["fps", "max_side"]
    assert _builtin_range_errors(LoadReferenceVideo, {"fps": 25.0, "max_side": 512}) == []
    assert _builtin_range_errors(EncodeSpeech, {"fps": 0.0, "frames": -1}) == ["fps", "frames"]


def _validate(video="person.mp4", start=0.0, end=0.0):
    return LoadReferenceVideo.VALIDATE_INPUTS(video, start_seconds=start, end_seconds=end)


@pytest.fixture
def input_clip(fake_comfy):  # noqa: F811 - the imported fixture
    make_clip(fake_comfy.folders["input"] / "person.mp4", level_frames(10, 32, 32), fps=25)
    return fake_comfy


def test_good_inputs_pass(input_clip):
    assert _validate() is True
    assert _validate(start=0.2, end=0.3) is True
    assert _validate(start=1.5, end=0.0) is True  # end 0 = the end of the clip
    assert _validate(video="") is True  # a connected VIDEO / IMAGE replaces the file
    make_clip(input_clip.folders["output"] / "render.mp4", level_frames(4, 32, 32), fps=25)
    assert _validate(video="render.mp4 [output]") is True
    (input_clip.folders["input"] / "sub").mkdir()
    os.symlink(input_clip.folders["input"] / "person.mp4", input_clip.folders["input"] / "sub" / "link.mp4")
    assert _validate(video="sub/link.mp4") is True  # a symlink that stays inside input/


@pytest.mark.parametrize("start,end,fragment", [
    (0.5, 0.2, "end (0.2 s) must be after start (0.5 s)"),
    (0.5, 0.5, "must be after start"),
    (-1.0, 0.0, "start must be between 0 and 36000"),
    (0.0, -2.0, "end must be between 0 and 36000"),
    (0.0, 36001.0, "end must be between"),
    (math.nan, 0.0, "start must be between"),
])
def test_bad_time_range_is_a_message(input_clip, start, end, fragment):
    message = _validate(start=start, end=end)
    assert isinstance(message, str) and fragment in message, message


def test_missing_file_is_one_message(input_clip):
    message = _validate(video="gone.mp4")
    assert isinstance(message, str) and "'gone.mp4' not found in ComfyUI's input folder" in message
    assert message.count("gone.mp4") == 1 and "\n" not in message
    both = _validate(video="gone.mp4", start=2.0, end=1.0)
    assert "not found" in both and "must be after start" in both


def test_paths_leading_out_of_input_are_refused(input_clip, tmp_path):
    outside = make_clip(tmp_path / "elsewhere.mp4", level_frames(3, 32, 32))
    os.symlink(outside, input_clip.folders["input"] / "link.mp4")
    for value in ("../elsewhere.mp4", str(outside), "link.mp4"):
        message = _validate(video=value)
        assert isinstance(message, str) and "outside ComfyUI's input folder" in message, (value, message)
    # Run time applies the same rule (the file's own folder only).
    with pytest.raises(UserFacingError, match="outside the allowed folders"):
        LoadReferenceVideo().load("link.mp4")


def test_unusable_files_are_refused(input_clip, monkeypatch):
    folder = input_clip.folders["input"]
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "dir.mp4").mkdir()
    assert "empty (0 bytes)" in _validate(video="empty.mp4")
    assert "is a folder" in _validate(video="dir.mp4")
    (folder / "locked.mp4").write_bytes(b"data")

    real_open = open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith("locked.mp4"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(_comfy, "open", refusing_open, raising=False)  # root can read anything
    assert "cannot be read (Permission denied)" in _validate(video="locked.mp4")


def test_annotated_output_file_loads(input_clip):
    make_clip(input_clip.folders["output"] / "render.mp4", level_frames(4, 32, 32), fps=25)
    reference, _, _, _ = LoadReferenceVideo().load("render.mp4 [output]")
    assert reference.n_frames == 4


# ---------------------------------------------------------------------------------- error title


def _full_type_name(klass) -> str:
    """ComfyUI's execution.full_type_name: the exception_type the UI shows as the error's title."""
    return klass.__qualname__ if klass.__module__ == "builtins" else klass.__module__ + "." + klass.__qualname__


def test_error_title_is_readable(monkeypatch):
    assert _full_type_name(UserFacingError) == "sparse-avatar.UserFacingError"
    # ComfyUI imports the pack under its folder's full path; the title does not show it.
    name = "/srv/ComfyUI/custom_nodes/sparse-avatar"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    spec = importlib.util.spec_from_file_location(f"{name}.errors", ROOT / "errors.py")
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, loaded)
    spec.loader.exec_module(loaded)
    assert _full_type_name(loaded.UserFacingError) == "sparse-avatar.UserFacingError"
    assert pickle.loads(pickle.dumps(loaded.UserFacingError("x"))).args == ("x",)


def test_error_still_is_a_value_error_and_pickles():
    error = UserFacingError("bad file; do this")
    assert isinstance(error, ValueError) and str(error) == "bad file; do this"
    error.detail = 3
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is UserFacingError and back.args == error.args and back.detail == 3
    assert pickle.loads(pickle.dumps(UserFacingError)) is UserFacingError
    assert errors_module.UserFacingError is UserFacingError
    with pytest.raises(UserFacingError):
        raise back


def test_error_unpickles_in_a_fresh_process():
    data = pickle.dumps(UserFacingError("from a worker"))
    code = ("import pickle, sys; error = pickle.loads(sys.stdin.buffer.read()); "
            "from sparse_avatar.errors import UserFacingError; assert isinstance(error, UserFacingError); print(error)")
    result = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "from a worker"


# ------------------------------------------------------------------------------- no-face advice


def test_no_face_advice_names_only_real_options():
    with pytest.raises(UserFacingError) as error:
        track_face(_indexed_frames(10), detector=ScriptedDetector(lambda i: []))
    message = str(error.value)
    assert "crop the video around the face" in message and "visible and frontal" in message
    assert "face box" not in message and "x0" not in message


# ---------------------------------------------------------------------- one audio check for all

SILENT, HEADER_ONLY, NAN = "silent", "header-only", "nan"


def _float_wav(path: Path, wave: np.ndarray, rate: int = 16000) -> Path:
    """IEEE-float mono WAV (16-bit PCM, what media.audio.write_wav writes, cannot hold NaN)."""
    data = np.asarray(wave, "<f4").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32)
    path.write_bytes(header + b"data" + struct.pack("<I", len(data)) + data)
    return path


def _nan_wave() -> np.ndarray:
    wave = tone(1.0, 16000)
    wave[100:110] = np.nan
    return wave


@pytest.fixture
def wavs(tmp_path) -> dict[str, Path]:
    return {
        SILENT: write_wav(tmp_path / "silent.wav", np.zeros(16000, np.float32)),
        HEADER_ONLY: write_wav(tmp_path / "header_only.wav", np.zeros(0, np.float32)),
        NAN: _float_wav(tmp_path / "nan.wav", _nan_wave()),
    }


# What every entry point must say: accepted with a warning, or refused with this phrase.
EXPECTED = {SILENT: (True, "silent"), HEADER_ONLY: (False, "zero length"), NAN: (False, "NaN/infinite")}


def _probe(path, capsys) -> tuple[bool, str]:
    code = cli.main(["probe", str(path), "--no-faces"])
    captured = capsys.readouterr()
    return code == 0, captured.out + captured.err


class _RenderReached(Exception):
    """The stubbed sampler was called: render accepted the audio."""


@pytest.fixture
def stub_render(monkeypatch):
    """`render` with the model, the reference and the sampler stubbed: everything up to sampling runs
    the real code, so its audio check is the one under test (model/pipeline.py's render_files)."""
    from sparse_avatar import media
    from sparse_avatar.model import checkpoint, pipeline

    prepared = types.SimpleNamespace(fps=25.0, n_frames=25, render_inputs=lambda *args, **kwargs: {})
    from sparse_avatar.model.configs import get_config

    model = types.SimpleNamespace(config=get_config("tiny"))  # what render_files reads of it: which speech features it hears
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *args, **kwargs: model)
    monkeypatch.setattr(media, "load_reference_video", lambda *args, **kwargs: types.SimpleNamespace(n_frames=25))
    monkeypatch.setattr(pipeline, "prepare_reference_video", lambda *args, **kwargs: prepared)
    monkeypatch.setattr(pipeline, "extract_reference_identity", lambda *args, **kwargs: object())

    def sampler(*args, **kwargs):
        raise _RenderReached()

    monkeypatch.setattr(pipeline, "render", sampler)


def _render(path, tmp_path, capsys) -> tuple[bool, str]:
    args = ["render", "--model", str(tmp_path / "model.safetensors"), "--reference", str(tmp_path / "ref.mp4"),
            "--audio", str(path), "--out", str(tmp_path / "out.mp4"), "--device", "cpu"]
    try:
        code = cli.main(args)
    except _RenderReached:
        code = 0
    captured = capsys.readouterr()
    assert not (tmp_path / "out.mp4").exists()
    return code == 0, captured.out + captured.err


def _encode_speech(kind, caplog) -> tuple[bool, str]:
    # The same samples as the files, as a ComfyUI AUDIO (what core Load Audio gives for them).
    wave = {SILENT: np.zeros(16000, np.float32), HEADER_ONLY: np.zeros(0, np.float32), NAN: _nan_wave()}[kind]
    caplog.clear()
    try:
        with caplog.at_level("WARNING", logger="sparse-avatar"):
            EncodeSpeech().encode(audio_to_comfy(wave, 16000), fps=25.0)
    except UserFacingError as error:
        return False, str(error)
    return True, " ".join(record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("kind", [SILENT, HEADER_ONLY, NAN])
def test_probe_render_and_encode_speech_agree(kind, wavs, tmp_path, capsys, caplog, stub_render):
    accepted, phrase = EXPECTED[kind]
    results = {
        "probe": _probe(wavs[kind], capsys),
        "render": _render(wavs[kind], tmp_path, capsys),
        "Encode Speech": _encode_speech(kind, caplog),
    }
    for where, (ok, text) in results.items():
        assert ok is accepted, (where, text)
        assert phrase in text, (where, text)
        assert "Traceback" not in text
    if accepted:  # a one-line warning, printed as such by the CLI
        assert "warning: " in results["probe"][1] and "warning: " in results["render"][1]


def test_probe_of_a_normal_wav_has_no_warning(tmp_path, capsys):
    ok, text = _probe(write_wav(tmp_path / "speech.wav", tone(1.0, 16000)), capsys)
    assert ok and "warning" not in text


# ------------------------------------------------------------- damaged audio on a good video


def _video_with_damaged_audio(path: Path) -> Path:
    """A good H.264 clip whose AAC packets are overwritten with noise (the video packets stay intact)."""
    import av

    clip = make_clip(path.with_name("intact.mp4"), level_frames(25, 64, 64), fps=25, audio=tone(1.0, 16000))
    data = bytearray(clip.read_bytes())
    with av.open(str(clip)) as container:
        spans = [(packet.pos, packet.size) for packet in container.demux(container.streams.audio[0])
                 if packet.pos is not None and packet.size]
    noise = np.random.default_rng(0)
    for position, size in spans:
        data[position:position + size] = noise.integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def test_damaged_audio_track_gives_a_silent_reference(tmp_path, caplog, capsys):
    clip = _video_with_damaged_audio(tmp_path / "damaged.mp4")
    with caplog.at_level("WARNING", logger="sparse-avatar"):
        reference = load_reference_video(clip)
    assert reference.n_frames == 25 and reference.audio is None and not reference.has_audio
    assert len(reference.warnings) == 1 and "silent reference" in reference.warnings[0]
    assert "\n" not in reference.warnings[0]
    assert [record.getMessage() for record in caplog.records] == reference.warnings
    # probe says the same and does not fail; as driving audio the track is refused, as render would.
    ok, text = _probe(clip, capsys)
    assert ok and "warning:" in text and "used without its audio" in text


def test_node_uses_a_damaged_audio_video_as_silent(fake_comfy):  # noqa: F811 - the imported fixture
    _video_with_damaged_audio(fake_comfy.folders["input"] / "damaged.mp4")
    reference, _, audio, _ = LoadReferenceVideo().load("damaged.mp4")
    assert reference.n_frames == 25 and float(audio["waveform"].abs().max()) == 0


# ------------------------------------------- the rest of item 2, found by scripts/reliability.py


def test_a_file_that_is_not_a_video_is_refused_at_validation(input_clip):
    folder = input_clip.folders["input"]
    (folder / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes())
    message = _validate(video="random.mp4")
    assert isinstance(message, str) and "'random.mp4' is not a readable video" in message and "\n" not in message
    write_wav(folder / "voice.wav", tone(0.5, 16000))
    os.replace(folder / "voice.wav", folder / "voice.mp4")  # a sound file under a video's name
    assert "has no video stream" in _validate(video="voice.mp4")
    assert _validate(video="person.mp4") is True


def test_checkpoint_is_checked_before_anything_runs(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    from sparse_avatar.model.checkpoint import new_model, save_checkpoint
    from sparse_avatar.nodes.avatar_model import LoadAvatarModel

    monkeypatch.chdir(tmp_path)  # outside ComfyUI: ./models/avatar
    folder = tmp_path / "models" / "avatar"
    folder.mkdir(parents=True)
    save_checkpoint(new_model("tiny", seed=0), folder / "tiny.safetensors")
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(folder / "other.safetensors"), metadata={"format": "pt"})
    (folder / "random.safetensors").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    assert _named_inputs(LoadAvatarModel) == (["cls", "checkpoint", "hub_repo"], False)
    assert LoadAvatarModel.VALIDATE_INPUTS("tiny.safetensors") is True
    for name, fragment in (("other.safetensors", "is not a sparse-avatar model checkpoint"),
                           ("random.safetensors", "not a readable .safetensors file"),
                           ("gone.safetensors", "'gone.safetensors' not found"),
                           ("../tiny.safetensors", "not found")):
        message = LoadAvatarModel.VALIDATE_INPUTS(name)
        assert isinstance(message, str) and fragment in message, (name, message)
    assert LoadAvatarModel.VALIDATE_INPUTS("gone.safetensors", hub_repo="owner/repo") is True  # the hub file is checked when fetched


def test_filename_prefix_is_checked_at_validation():
    from sparse_avatar.nodes.identity import SaveIdentity
    from sparse_avatar.nodes.training import TrainAvatar

    for node, default in ((TrainAvatar, "avatar_lora"), (SaveIdentity, "avatar")):
        assert _named_inputs(node) == (["cls", "filename_prefix"], False)  # the other inputs keep ComfyUI's min/max
        assert node.VALIDATE_INPUTS(default) is True
        for bad in ("../escape", "sub/name", ".hidden", ""):
            message = node.VALIDATE_INPUTS(bad)
            assert isinstance(message, str) and "is not allowed" in message, (bad, message)
    assert _builtin_range_errors(TrainAvatar, {"steps": 0, "learning_rate": 0.0}) == ["steps", "learning_rate"]
