"""Media I/O on clips the tests generate with PyAV: codecs, rotation, VFR -> CFR, ranges, the
reference's own audio alignment, audio loading, ComfyUI conversions and atomic mp4 writing.

The clip helpers here are reused by test_media_bad_input.py and test_nodes_media.py.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from sparse_avatar.errors import UserFacingError
from sparse_avatar.media import (
    iter_video_frames,
    load_audio,
    load_reference_video,
    probe_media,
    reference_from_frames,
    resolve_input_path,
    write_video,
)
from sparse_avatar.nodes.comfy_types import audio_to_comfy, comfy_audio_to_wave, comfy_image_to_frames, frames_to_comfy_image

# --------------------------------------------------------------------------------- clip helpers

# Each source frame is painted one flat grey level, so a decoded frame tells which source frame
# it came from even after lossy compression.
LEVEL_STEP = 12


def frame_level(index: int) -> int:
    return 16 + (index * LEVEL_STEP) % 224


def level_to_index(frame: np.ndarray, n_source: int) -> int:
    mean = float(frame[frame.shape[0] // 4: 3 * frame.shape[0] // 4, frame.shape[1] // 4: 3 * frame.shape[1] // 4].mean())
    return int(np.argmin([abs(mean - frame_level(i)) for i in range(n_source)]))


def level_frames(n_frames: int, width: int, height: int) -> np.ndarray:
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    for index in range(n_frames):
        frames[index] = frame_level(index)
    return frames


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - PyAV raises different types across versions
        return False


def make_clip(
    path: Path,
    frames: np.ndarray,
    *,
    fps: float = 25,
    codec: str = "libx264",
    times_s: list[float] | None = None,
    display_rotation: int | None = None,
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    audio_layout: str = "mono",
    audio_start_s: float = 0.0,
    video_start_s: float = 0.0,
    audio_codec: str = "aac",
) -> Path:
    """Encode frames (uint8 [T,H,W,3]) to ``path``; ``times_s`` gives per-frame timestamps (VFR).

    ``audio`` is float32 [S] (mono) or [C,S]; ``*_start_s`` offset each stream's first timestamp.
    """
    rate = Fraction(fps).limit_denominator(1001)
    time_base = Fraction(1, 1000) if times_s is not None else 1 / rate
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error"}
        if display_rotation is not None:
            stream.set_display_rotation(display_rotation)
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream(audio_codec, rate=audio_rate, layout=audio_layout)
        video_offset = int(round(video_start_s / time_base))
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = video_offset + (int(round(times_s[index] / time_base)) if times_s is not None else index)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
        if audio_stream is not None:
            samples = audio if audio.ndim == 2 else audio[None]
            fmt = "fltp" if audio_codec != "pcm_s16le" else "s16"
            data = samples if fmt == "fltp" else (np.clip(samples, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
            audio_frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data.astype(np.float32) if fmt == "fltp" else data),
                                                     format=fmt, layout=audio_layout)
            audio_frame.sample_rate = audio_rate
            audio_frame.pts = int(round(audio_start_s * audio_rate))
            audio_frame.time_base = Fraction(1, audio_rate)
            container.mux(audio_stream.encode(audio_frame))
            container.mux(audio_stream.encode(None))
    return path


def write_audio_file(path: Path, wave: np.ndarray, rate: int, *, codec: str, layout: str = "mono") -> Path:
    """Write float32 audio [S] or [C,S] with PyAV (wav, flac, mp3, m4a, ogg/opus ...)."""
    samples = wave if wave.ndim == 2 else wave[None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        fmt = {"pcm_s16le": "s16", "pcm_f32le": "flt", "flac": "s16", "libmp3lame": "fltp", "libopus": "flt"}.get(codec, "fltp")
        if fmt == "s16":
            data = (np.clip(samples, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
        elif fmt == "flt":
            data = samples.astype(np.float32).T.reshape(1, -1)
        else:
            data = samples.astype(np.float32)
        if data.size:  # an empty file is a header only
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
            frame.sample_rate = rate
            frame.pts = 0
            frame.time_base = Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def tone(duration_s: float, rate: int, freq: float = 220.0, amplitude: float = 0.4) -> np.ndarray:
    t = np.arange(int(round(duration_s * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ---------------------------------------------------------------------------------------- decode

CODECS = [
    ("libx264", "mp4"),
    ("libx265", "mkv"),
    ("libvpx-vp9", "webm"),
    ("mpeg4", "mov"),
]


@pytest.mark.parametrize("codec,extension", CODECS)
def test_decodes_each_codec_frame_exact(tmp_path, codec, extension):
    if not has_encoder(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder to make the test clip")
    frames = level_frames(12, 64, 48)
    path = make_clip(tmp_path / f"clip.{extension}", frames, fps=25, codec=codec)
    info = probe_media(path)
    assert (info.width, info.height, info.n_frames, info.rotation) == (64, 48, 12, 0)
    assert info.fps == pytest.approx(25.0) and not info.is_vfr and not info.has_audio
    decoded = list(iter_video_frames(path))
    assert [index for index, _, _ in decoded] == list(range(12))
    assert [level_to_index(image, 12) for _, _, image in decoded] == list(range(12))
    assert decoded[0][2].shape == (48, 64, 3) and decoded[0][2].dtype == np.uint8


def _portrait_pattern(width: int = 48, height: int = 80) -> np.ndarray:
    image = np.full((height, width, 3), 40, np.uint8)
    image[: height // 4, : width // 2] = (250, 30, 30)  # red block top-left when shown upright
    return image


@pytest.mark.parametrize("clockwise", [90, 180, 270])
def test_rotation_metadata_is_applied(tmp_path, clockwise):
    upright = _portrait_pattern()
    # What a phone stores: the upright picture rotated the other way, plus "rotate by N clockwise".
    stored = np.ascontiguousarray(np.rot90(upright, k=clockwise // 90))
    path = make_clip(tmp_path / "phone.mp4", np.stack([stored] * 3), display_rotation=-clockwise)
    info = probe_media(path)
    assert info.rotation == clockwise
    assert (info.width, info.height) == (48, 80)
    _, _, image = next(iter(iter_video_frames(path)))
    assert image.shape == upright.shape
    assert np.abs(image.astype(int) - upright.astype(int)).mean() < 6


@pytest.mark.parametrize("clockwise", [90, 180, 270])
def test_display_matrix_fallback_for_older_pyav(tmp_path, clockwise):
    """PyAV < 13 has no frame.rotation; the side-data parser must give the same angle."""
    from sparse_avatar.media.video_io import _display_matrix_rotation

    path = make_clip(tmp_path / "phone.mp4", level_frames(2, 32, 16), display_rotation=-clockwise)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    assert (-_display_matrix_rotation(frame)) % 360 == pytest.approx(clockwise)
    if hasattr(frame, "rotation"):
        assert _display_matrix_rotation(frame) % 360 == pytest.approx(frame.rotation % 360)


def test_vfr_is_resampled_to_cfr_by_nearest_timestamp(tmp_path):
    times = [0.0, 0.1, 0.15, 0.4, 0.45, 0.5, 0.9]
    frames = level_frames(len(times), 32, 32)
    path = make_clip(tmp_path / "vfr.mkv", frames, times_s=times)
    info = probe_media(path)
    assert info.is_vfr and info.n_frames == len(times)
    decoded = list(iter_video_frames(path, fps=10))
    grid = [t for _, t, _ in decoded]
    assert grid == pytest.approx([i / 10 for i in range(len(grid))])
    picked = [level_to_index(image, len(times)) for _, _, image in decoded]
    for position, t in enumerate(grid):
        distances = [abs(t - s) for s in times]
        assert distances[picked[position]] == pytest.approx(min(distances), abs=1e-6), (t, picked)
    assert picked[:7] == [0, 1, 2, 3, 3, 5, 5]  # 0.4 s -> frame at 0.4, frame at 0.45 skipped
    # The last frame lasts one nominal interval, so the stream ends shortly after 0.9 s.
    assert 9 <= len(decoded) <= 10


@pytest.mark.parametrize("fps,expected", [(10, 20), (25, 50), (50, 100), (29.97, 60)])
def test_constant_rate_resampling_counts(tmp_path, fps, expected):
    path = make_clip(tmp_path / "clip.mp4", level_frames(50, 32, 32), fps=25)
    decoded = list(iter_video_frames(path, fps=fps))
    assert len(decoded) == expected
    sources = [level_to_index(image, 50) for _, _, image in decoded]
    assert sources == sorted(sources)  # time never runs backwards
    assert sources[0] == 0 and sources[-1] >= 48


def test_start_end_range_and_seek(tmp_path):
    path = make_clip(tmp_path / "clip.mp4", level_frames(60, 32, 32), fps=20)
    decoded = list(iter_video_frames(path, start_s=1.0, end_s=2.0))
    assert [level_to_index(image, 60) for _, _, image in decoded] == list(range(20, 40))
    assert decoded[0][1] == pytest.approx(1.0)


def test_transform_and_max_side_stream_frames(tmp_path):
    path = make_clip(tmp_path / "clip.mp4", level_frames(5, 320, 240), fps=25)
    calls = []

    def crop(image):
        calls.append(image.shape)
        return image[:16, :16].copy()

    decoded = list(iter_video_frames(path, transform=crop, max_side=160))
    assert calls == [(120, 160, 3)] * 5
    assert all(image.shape == (16, 16, 3) for _, _, image in decoded)
    # Upsampling repeats frames: the transform still runs once per distinct source frame.
    calls.clear()
    assert len(list(iter_video_frames(path, fps=50, transform=crop))) == 10
    assert len(calls) == 5


def test_reference_audio_is_aligned_to_first_video_frame(tmp_path):
    # Video starts 0.32 s into the file (8 frames at 25 fps), audio at 0.1 s. Clicks sit exactly
    # 1.0 s (loud) and 2.6 s (softer) after the first video frame.
    rate, video_start, audio_start = 48000, 0.32, 0.1
    audio = np.zeros(int(4.5 * rate), np.float32)
    for video_time, level in ((1.0, 0.9), (2.6, 0.6)):
        click = int(round((video_start + video_time - audio_start) * rate))
        audio[click: click + 48] = level
    path = make_clip(tmp_path / "offset.mkv", level_frames(100, 32, 32), fps=25, video_start_s=video_start,
                     audio=audio, audio_rate=rate, audio_start_s=audio_start, audio_codec="pcm_s16le")
    reference = load_reference_video(path)
    assert reference.has_audio and reference.n_frames == 100 and reference.fps == pytest.approx(25)
    assert reference.audio.shape == (4 * 16000,) and reference.audio.dtype == np.float32
    assert abs(int(np.argmax(np.abs(reference.audio))) - 16000) <= 8
    # A range starting later shifts the audio with the frames ...
    later = load_reference_video(path, start_s=0.5)
    assert later.n_frames == 88
    assert abs(int(np.argmax(np.abs(later.audio))) - 8000) <= 8
    # ... also when the audio decoder has to seek first (start > 1 s).
    seeked = load_reference_video(path, start_s=2.0, end_s=3.0)
    assert seeked.n_frames == 25 and seeked.audio.shape == (16000,) and seeked.start_s == 2.0
    assert abs(int(np.argmax(np.abs(seeked.audio))) - 9600) <= 8
    assert np.max(np.abs(seeked.audio[:9000])) < 0.05 and np.max(np.abs(seeked.audio)) > 0.5


def test_reference_video_from_a_file_and_from_frames_in_memory(tmp_path):
    frames = level_frames(20, 96, 64)
    path = make_clip(tmp_path / "clip.mp4", frames, fps=25)
    reference = load_reference_video(path, max_side=48)
    assert reference.frames.shape == (20, 32, 48, 3) and not reference.has_audio and reference.audio is None
    assert len(reference.source_hash) == 64 and reference.source_path == path.resolve()

    from_frames = reference_from_frames(frames, 25.0, start_s=0.2, end_s=0.6)
    assert from_frames.n_frames == 10 and from_frames.fps == 25
    assert [level_to_index(f, 20) for f in from_frames.frames] == list(range(5, 15))
    doubled = reference_from_frames(frames, 25.0, fps=50, audio=(tone(0.8, 22050), 22050))
    assert doubled.n_frames == 40 and doubled.has_audio and doubled.audio.shape == (int(0.8 * 16000),)
    for bad, message in [(frames.astype(np.float32), "uint8 RGB"), (frames[:0], "T >= 1")]:
        with pytest.raises(UserFacingError, match=message):
            reference_from_frames(bad, 25.0)
    with pytest.raises(UserFacingError, match="positive number"):
        reference_from_frames(frames, 0.0)
    with pytest.raises(UserFacingError, match="reference_from_frames"):
        load_reference_video(frames)  # the media library takes files and arrays; ComfyUI types are the nodes' business


# ----------------------------------------------------------------------------------------- audio


@pytest.mark.parametrize(
    "extension,codec,rate,layout",
    [
        ("wav", "pcm_s16le", 44100, "stereo"),
        ("flac", "flac", 22050, "mono"),
        ("mp3", "libmp3lame", 44100, "stereo"),
        ("m4a", "aac", 48000, "stereo"),
        ("ogg", "libopus", 48000, "mono"),
    ],
)
def test_load_audio_formats_to_16k_mono(tmp_path, extension, codec, rate, layout):
    if not has_encoder(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder to make the test file")
    channels = 2 if layout == "stereo" else 1
    wave = np.stack([tone(1.0, rate)] * channels) if channels == 2 else tone(1.0, rate)
    path = write_audio_file(tmp_path / f"speech.{extension}", wave, rate, codec=codec, layout=layout)
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    # Lossy codecs add priming/padding: duration within 60 ms.
    assert abs(loaded.shape[0] - 16000) <= 0.06 * 16000
    spectrum = np.abs(np.fft.rfft(loaded[2000:14000]))
    assert np.argmax(spectrum) * 16000 / 12000 == pytest.approx(220, abs=3)
    assert np.max(np.abs(loaded)) == pytest.approx(0.4, abs=0.08)


def test_load_audio_trim_pad_and_comfy_dict():
    import torch

    wave = tone(1.0, 24000)
    audio = comfy_audio_to_wave({"waveform": torch.from_numpy(np.stack([wave, wave]))[None], "sample_rate": 24000})
    loaded = load_audio(audio)
    assert loaded.shape == (16000,)
    assert load_audio(audio, duration_s=0.5).shape == (8000,)
    padded = load_audio(audio, duration_s=1.5)
    assert padded.shape == (24000,) and np.all(padded[16000:] == 0)
    back = audio_to_comfy(loaded, 16000)
    assert back["sample_rate"] == 16000 and tuple(back["waveform"].shape) == (1, 1, 16000)
    assert np.allclose(load_audio(comfy_audio_to_wave(back)), loaded, atol=1e-6)


def test_comfy_image_round_trip_and_channels():
    import torch

    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    image = frames_to_comfy_image(frames)
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, 5, 7, 3)
    assert np.array_equal(comfy_image_to_frames(image), frames)
    rgba = torch.cat([image, torch.ones_like(image[..., :1])], dim=-1)
    assert np.array_equal(comfy_image_to_frames(rgba), frames)
    assert comfy_image_to_frames(image[..., :1]).shape == (3, 5, 7, 3)


# ----------------------------------------------------------------------------------------- write


@pytest.mark.parametrize("fps,size", [(25, (64, 48)), (29.97, (65, 37)), (np.float32(60), (32, 32)), (Fraction(30000, 1001), (16, 16))])
def test_write_video_exact_duration_even_size_and_audio(tmp_path, fps, size):
    width, height = size
    n_frames = 30
    frames = level_frames(n_frames, width, height)
    audio = tone(n_frames / fps + 0.7, 16000)  # longer than the video: must be trimmed
    out = write_video(tmp_path / "out.mp4", (frame for frame in frames), fps, audio=audio)
    info = probe_media(out)
    assert info.video_codec == "h264" and info.audio_codec == "aac" and info.sample_rate == 16000
    assert (info.width, info.height) == (width + width % 2, height + height % 2)
    assert info.n_frames == n_frames
    assert info.duration_s == pytest.approx(n_frames / fps, abs=1e-3)
    reference = load_reference_video(out)
    assert reference.n_frames == n_frames
    assert [level_to_index(image, n_frames) for image in reference.frames] == list(range(n_frames))
    decoded_audio = load_audio(out)
    assert abs(decoded_audio.shape[0] / 16000 - n_frames / fps) < 1 / fps
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_write_video_pads_short_audio_with_silence(tmp_path):
    out = write_video(tmp_path / "out.mp4", level_frames(50, 32, 32), 25, audio=tone(0.5, 16000))
    decoded = load_audio(out)
    assert abs(decoded.shape[0] - 32000) < 640
    assert np.max(np.abs(decoded[12000:])) < 0.02 and np.max(np.abs(decoded[:7000])) > 0.3


def test_write_video_is_atomic_on_failure(tmp_path):
    previous = write_video(tmp_path / "out.mp4", level_frames(5, 32, 32), 25)
    before = previous.read_bytes()

    def broken_frames():
        yield from level_frames(3, 32, 32)
        raise RuntimeError("generator failed mid-way")

    with pytest.raises(RuntimeError):
        write_video(tmp_path / "out.mp4", broken_frames(), 25)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    assert previous.read_bytes() == before
    with pytest.raises(UserFacingError, match="no frames"):
        write_video(tmp_path / "empty.mp4", [], 25)
    with pytest.raises(UserFacingError, match="uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 8, 8, 3), np.float32), 25)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


# ----------------------------------------------------------------------------------------- paths


def test_resolve_input_path_refuses_escapes(tmp_path):
    root = tmp_path / "input"
    root.mkdir()
    inside = root / "clip.mp4"
    inside.write_bytes(b"x")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    assert resolve_input_path(inside, [root]) == inside.resolve()
    assert resolve_input_path(str(root / "sub" / ".." / "clip.mp4").replace("/sub/..", "/./"), [root]) == inside.resolve()
    with pytest.raises(UserFacingError, match="outside the allowed folders"):
        resolve_input_path(root / ".." / "secret.mp4", [root])
    link = root / "link.mp4"
    os.symlink(outside, link)
    with pytest.raises(UserFacingError, match="outside the allowed folders"):
        resolve_input_path(link, [root])
    with pytest.raises(UserFacingError, match="folder"):
        resolve_input_path(root, [tmp_path])


# ------------------------------------------------------------------------------------------- CLI


def test_cli_probe_features_and_formats(tmp_path, capsys):
    import json

    from safetensors.numpy import load_file

    from sparse_avatar.cli import main

    clip = make_clip(tmp_path / "clip.mp4", level_frames(10, 64, 48), fps=25, audio=tone(0.4, 16000))
    assert main(["probe", str(clip), "--no-faces", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n_frames"] == 10 and record["video_codec"] == "h264" and record["has_audio"] and record["faces"] is None

    speech = write_audio_file(tmp_path / "speech.wav", tone(2.0, 44100), 44100, codec="pcm_s16le")
    assert main(["features", str(speech), "--fps", "30", "--out", str(tmp_path / "f.npy")]) == 0
    assert np.load(tmp_path / "f.npy", allow_pickle=False).shape[0] == 60
    assert main(["features", str(speech), "--fps", "25", "--frames", "40", "--out", str(tmp_path / "f.safetensors")]) == 0
    assert load_file(str(tmp_path / "f.safetensors"))["features"].shape[0] == 40
    assert main(["features", str(speech), "--out", str(tmp_path / "f.txt")]) == 2
    assert "must end in .npy or .safetensors" in capsys.readouterr().err
    assert not (tmp_path / "f.txt").exists()


def test_cli_demo_renders_with_the_shipped_model(espeak, tmp_path, capsys):
    """The main job end to end on the shipped model (a short clip: CI time): an Avatar World
    person, new espeak-ng speech, three mp4s with sound whose length is the speech's."""
    from sparse_avatar.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seconds", "0.6", "--reference-seconds", "1"]) == 0
    printed = capsys.readouterr().out
    assert "sparse-avatar-world.safetensors (compact" in printed and "held out from training" in printed
    assert "does not yet render a person it has not trained on" in printed  # the honest note, every time
    assert sorted(p.name for p in out.iterdir()) == ["demo.mp4", "reference.mp4", "side_by_side.mp4"]
    for name, width in (("demo.mp4", 128), ("side_by_side.mp4", 256)):
        info = probe_media(out / name)
        assert info.n_frames == 15 and info.width == width and info.has_audio
        assert info.audio_duration_s == pytest.approx(0.6, abs=0.04)
    frames = np.stack([image for _, _, image in iter_video_frames(out / "demo.mp4")])
    assert frames.std(axis=0).mean() > 1.0  # the frames change: a render, not a still
    assert probe_media(out / "reference.mp4").n_frames == 25
