"""Bad input (issue 2, item 7): every case ends in one actionable UserFacingError (or is handled
correctly when the input is merely unusual), and nothing partial is left on disk.

No face / two faces belong to the face tracker's tests.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from test_media_io import level_frames, level_to_index, make_clip, tone, write_audio_file

from sparse_avatar.errors import UserFacingError
from sparse_avatar.nodes.comfy_types import comfy_audio_to_wave
from sparse_avatar.media import (
    iter_video_frames,
    load_audio,
    load_reference_video,
    probe_media,
    resolve_input_path,
    write_video,
)


def assert_actionable(error: pytest.ExceptionInfo, *fragments: str) -> None:
    """One line, names the problem, and is not a raw library message."""
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message


@pytest.fixture
def good_clip(tmp_path):
    return make_clip(tmp_path / "good.mp4", level_frames(25, 64, 64), fps=25, audio=tone(1.0, 16000))


def test_missing_file(tmp_path):
    for call in (probe_media, load_reference_video, load_audio, lambda p: list(iter_video_frames(p))):
        with pytest.raises(UserFacingError) as error:
            call(tmp_path / "nope.mp4")
        assert_actionable(error, "not found", "nope.mp4")


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for call in (probe_media, load_reference_video, load_audio):
        with pytest.raises(UserFacingError) as error:
            call(empty)
        assert_actionable(error, "empty")


def test_truncated_file(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (25, 64, 64, 3), dtype=np.uint8)  # incompressible
    whole = write_video(tmp_path / "whole.mp4", frames, 25, audio=tone(1.0, 16000))
    data = whole.read_bytes()
    # write_video puts the index first (faststart): cutting the media data leaves an index that
    # promises frames the file no longer has ...
    cut_data = tmp_path / "cut_data.mp4"
    cut_data.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(UserFacingError) as error:
        load_reference_video(cut_data)
    assert_actionable(error, "cut_data.mp4", "truncated", "set end to")
    # ... and the intact part stays usable, as the message says.
    usable_end = float(str(error.value).rsplit("set end to ", 1)[1].split(" s")[0])
    assert 0 < load_reference_video(cut_data, end_s=usable_end).n_frames < 25
    # A file cut inside its index cannot be opened at all; neither can a moov-at-end file cut short.
    cut_index = tmp_path / "cut_index.mp4"
    cut_index.write_bytes(data[:200])
    no_index = make_clip(tmp_path / "no_index.mp4", level_frames(25, 64, 64))
    no_index.write_bytes(no_index.read_bytes()[:-400])
    for broken in (cut_index, no_index):
        with pytest.raises(UserFacingError) as error:
            probe_media(broken)
        assert_actionable(error, broken.name, "truncated")


def test_random_bytes_file(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    for call in (probe_media, load_reference_video, load_audio):
        with pytest.raises(UserFacingError) as error:
            call(junk)
        assert_actionable(error, "junk.mp4")


def test_audio_only_file_given_as_video(tmp_path):
    speech = write_audio_file(tmp_path / "speech.wav", tone(1.0, 16000), 16000, codec="pcm_s16le")
    info = probe_media(speech)
    assert not info.has_video and info.has_audio and info.duration_s == pytest.approx(1.0, abs=0.01)
    with pytest.raises(UserFacingError) as error:
        load_reference_video(speech)
    assert_actionable(error, "audio-only", "driving audio")


def test_video_without_audio(tmp_path):
    silent_clip = make_clip(tmp_path / "mute.mp4", level_frames(10, 32, 32))
    reference = load_reference_video(silent_clip)
    assert not reference.has_audio and reference.audio is None and reference.n_frames == 10
    with pytest.raises(UserFacingError) as error:
        load_audio(silent_clip)
    assert_actionable(error, "no audio track")


def test_zero_length_audio(tmp_path):
    import torch

    with pytest.raises(UserFacingError) as error:
        load_audio(comfy_audio_to_wave({"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}))
    assert_actionable(error, "zero length")
    header_only = write_audio_file(tmp_path / "nothing.wav", np.zeros(0, np.float32), 16000, codec="pcm_s16le")
    with pytest.raises(UserFacingError) as error:
        load_audio(header_only)
    assert_actionable(error)


def test_silence_is_loaded_but_refused_as_speech(tmp_path):
    quiet = write_audio_file(tmp_path / "quiet.wav", np.zeros(16000, np.float32), 16000, codec="pcm_s16le")
    assert np.all(load_audio(quiet) == 0)  # silence is valid audio ...
    with pytest.raises(UserFacingError) as error:  # ... but not valid driving speech
        load_audio(quiet, allow_silence=False)
    assert_actionable(error, "silent")


def test_nan_and_inf_samples(tmp_path):
    import torch

    for bad in (float("nan"), float("inf")):
        wave = torch.from_numpy(tone(0.5, 16000)).reshape(1, 1, -1).clone()
        wave[0, 0, 100] = bad
        with pytest.raises(UserFacingError) as error:
            load_audio(comfy_audio_to_wave({"waveform": wave, "sample_rate": 16000}))
        assert_actionable(error, "nan/infinite")
    float_wav = tone(0.5, 16000)
    float_wav[10] = np.nan
    path = write_audio_file(tmp_path / "nan.wav", float_wav, 16000, codec="pcm_f32le")
    with pytest.raises(UserFacingError) as error:
        load_audio(path)
    assert_actionable(error, "nan/infinite")
    with pytest.raises(UserFacingError):
        write_video(tmp_path / "out.mp4", level_frames(2, 16, 16), 25, audio=float_wav)
    assert not (tmp_path / "out.mp4").exists()


def test_8khz_mono_and_48khz_5_1(tmp_path):
    low = write_audio_file(tmp_path / "phone.wav", tone(1.0, 8000), 8000, codec="pcm_s16le")
    loaded = load_audio(low)
    assert loaded.shape == (16000,)
    assert np.argmax(np.abs(np.fft.rfft(loaded))) == pytest.approx(220, abs=2)
    # 5.1 with the voice in the centre channel only (the usual film mix).
    centre = tone(1.0, 48000)
    planes = np.zeros((6, 48000), np.float32)
    planes[2] = centre
    surround = write_audio_file(tmp_path / "film.m4a", planes, 48000, codec="aac", layout="5.1")
    info = probe_media(surround)
    assert info.channels == 6 and info.sample_rate == 48000
    loaded = load_audio(surround)
    assert abs(loaded.shape[0] - 16000) < 160
    assert np.max(np.abs(loaded)) > 0.2  # centre speech survives the down-mix
    assert np.argmax(np.abs(np.fft.rfft(loaded[:15000]))) * 16000 / 15000 == pytest.approx(220, abs=3)


@pytest.mark.parametrize("fps,n_frames", [(1, 4), (120, 60)])
def test_extreme_frame_rates(tmp_path, fps, n_frames):
    path = make_clip(tmp_path / "clip.mp4", level_frames(n_frames, 32, 32), fps=fps)
    info = probe_media(path)
    assert info.fps == pytest.approx(fps) and info.n_frames == n_frames
    reference = load_reference_video(path)
    assert reference.n_frames == n_frames
    resampled = load_reference_video(path, fps=25)
    # One output frame per grid time inside the clip: ceil(duration * fps).
    assert resampled.n_frames == int(np.ceil(n_frames / fps * 25))
    out = write_video(tmp_path / "out.mp4", reference.frames, fps)
    assert probe_media(out).n_frames == n_frames
    with pytest.raises(UserFacingError) as error:
        load_reference_video(path, fps=0)
    assert_actionable(error, "fps")


def test_4k_and_tiny_frames(tmp_path):
    big = make_clip(tmp_path / "uhd.mp4", level_frames(2, 3840, 2160), fps=25)
    info = probe_media(big)
    assert (info.width, info.height) == (3840, 2160)
    # max_side downscales inside the decoder, so 4K never reaches numpy at full size.
    shapes = [image.shape for _, _, image in iter_video_frames(big, max_side=512)]
    assert shapes == [(288, 512, 3)] * 2
    tiny = make_clip(tmp_path / "tiny.mp4", level_frames(5, 64, 64), fps=25)
    reference = load_reference_video(tiny, max_side=512)
    assert reference.frames.shape == (5, 64, 64, 3)
    assert [level_to_index(f, 5) for f in reference.frames] == list(range(5))


def test_rotated_portrait_phone_clip(tmp_path):
    upright = np.full((96, 54, 3), 50, np.uint8)
    upright[:20] = (220, 40, 40)  # the top of the picture when held upright
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # sensor data is landscape
    path = make_clip(tmp_path / "phone.mov", np.stack([stored] * 4), fps=30, display_rotation=-90)
    reference = load_reference_video(path)
    assert reference.frames.shape == (4, 96, 54, 3)
    assert reference.frames[0, :20, :, 0].mean() > 180 and reference.frames[0, -20:, :, 0].mean() < 90


def test_path_outside_allowed_folders(tmp_path, good_clip):
    allowed = tmp_path / "input"
    allowed.mkdir()
    with pytest.raises(UserFacingError) as error:
        load_reference_video(good_clip, allowed_roots=[allowed])
    assert_actionable(error, "outside the allowed folders")
    with pytest.raises(UserFacingError):
        resolve_input_path(allowed / ".." / good_clip.name, [allowed])


def test_nothing_partial_left_behind(tmp_path):
    out_dir = tmp_path / "out"

    def frames_then_bad_frame():
        yield from level_frames(3, 32, 32)
        yield np.zeros((16, 16, 3), np.uint8)  # size change mid-stream

    with pytest.raises(UserFacingError) as error:
        write_video(out_dir / "video.mp4", frames_then_bad_frame(), 25, audio=tone(1.0, 16000))
    assert_actionable(error, "one size")
    assert list(out_dir.iterdir()) == []
    with pytest.raises(UserFacingError):
        write_video(out_dir / "video.mp4", level_frames(2, 16, 16), float("nan"))
    with pytest.raises(UserFacingError):
        write_video(out_dir / "video.avi", level_frames(2, 16, 16), 25)
    with pytest.raises(UserFacingError, match="mono"):
        write_video(out_dir / "video.mp4", level_frames(2, 16, 16), 25, audio=np.zeros((2, 800), np.float32))
    assert list(out_dir.iterdir()) == []


def test_bad_range_and_settings(tmp_path, good_clip):
    with pytest.raises(UserFacingError) as error:
        load_reference_video(good_clip, start_s=5.0)
    assert_actionable(error, "after the end")
    with pytest.raises(UserFacingError) as error:
        load_reference_video(good_clip, start_s=0.5, end_s=0.2)
    assert_actionable(error, "must be after start")
    with pytest.raises(UserFacingError) as error:
        load_reference_video(object())
    assert_actionable(error, "pass a video file path")
    for bad_rate in (0, -16000):
        with pytest.raises(UserFacingError) as error:
            load_audio((np.zeros(10, np.float32), bad_rate))
        assert_actionable(error, "sample_rate")
    with pytest.raises(UserFacingError) as error:
        load_audio(comfy_audio_to_wave({"waveform": np.zeros((1, 1, 10), np.float32), "sample_rate": 0}))
    assert_actionable(error, "sample_rate")


def test_cli_probe_prints_one_line_on_unusable_input(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 1000)
    result = subprocess.run([sys.executable, "-m", "sparse_avatar", "probe", str(junk)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "junk.mp4" in result.stderr and "Traceback" not in result.stderr
