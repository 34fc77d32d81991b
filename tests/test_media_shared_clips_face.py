"""Face tracking, crop/paste-back and speech features over every licensed clip in ../shared/media.

The first 3 s of each clip keep this fast. The clips are read in place, never copied.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED_MEDIA_DIR, shared_media_rows
from sparse_avatar.errors import UserFacingError
from sparse_avatar.media import (
    SPEECH_FEATURE_DIM,
    crop_faces,
    crop_transforms,
    iter_video_frames,
    load_reference_video,
    paste_back,
    speech_features,
    track_face,
)

pytestmark = pytest.mark.media

VIDEO_ROWS = shared_media_rows("video")
VIDEO_FILES = [row["file"] for row in VIDEO_ROWS] or ["(no shared clips)"]
SECONDS = 3.0

_cache: dict[str, object] = {}


def _reference(shared_media_dir, name):
    if name not in _cache:
        _cache[name] = load_reference_video(shared_media_dir / name, end_s=SECONDS)
    return _cache[name]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


@pytest.mark.parametrize("name", VIDEO_FILES)
def test_speech_feature_count_equals_frame_count(shared_media_dir, name):
    reference = _reference(shared_media_dir, name)
    assert reference.has_audio, f"{name} is listed with audio"
    features = speech_features(reference.audio, 16000, reference.fps)
    assert features.shape == (len(reference.frames), SPEECH_FEATURE_DIM)
    assert features.std() > 0.05  # real speech, not silence


@pytest.mark.parametrize("name", VIDEO_FILES)
def test_face_track_crop_and_seamless_paste_back(shared_media_dir, name):
    reference = _reference(shared_media_dir, name)
    frames = reference.frames
    track = track_face(frames, fps=reference.fps)
    assert track.coverage >= 0.95, f"{name}: face found on {track.coverage:.0%} of examined frames"
    assert track.n_faces_seen == 1 and track.warnings == [], track.warnings
    centres, sides = track.centres_and_sizes()
    height, width = frames.shape[1:3]
    assert np.all((centres[:, 0] > 0) & (centres[:, 0] < width) & (centres[:, 1] > 0) & (centres[:, 1] < height))
    assert np.all((sides > 0.1 * min(height, width)) & (sides < min(height, width)))
    # No jitter: the smoothed centre's frame-to-frame acceleration is a tiny share of the face.
    assert np.abs(np.diff(centres, 2, axis=0)).max() < 0.01 * sides.mean()

    every_fifth = frames[::5]
    crops, transforms = crop_faces(every_fifth, _subsampled(track, 5), size=512)
    assert crops.shape == (len(every_fifth), 512, 512, 3)
    pasted = paste_back(every_fifth, crops, transforms, color_match=True)
    worst = min(psnr(a, b) for a, b in zip(pasted, every_fifth))
    assert worst >= 40.0, f"{name}: untouched crop pasted back at {worst:.1f} dB"


def _subsampled(track, step):
    return track.select(slice(None, None, step))


def test_streaming_track_and_crop_match_the_in_memory_path(shared_media_dir):
    name = VIDEO_FILES[0]
    path = shared_media_dir / name
    reference = _reference(shared_media_dir, name)
    streamed = track_face(iter_video_frames(path, end_s=SECONDS))
    in_memory = track_face(reference.frames, fps=reference.fps)
    assert streamed.fps == pytest.approx(reference.fps)
    np.testing.assert_allclose(streamed.boxes, in_memory.boxes, atol=1e-3)
    transforms = crop_transforms(streamed, 256)
    crops = [transforms[index].apply(frame) for index, _, frame in iter_video_frames(path, end_s=1.0)]
    np.testing.assert_array_equal(np.stack(crops), crop_faces(reference.frames[: len(crops)], _first(in_memory, len(crops)), 256)[0])


def _first(track, count):
    return track.select(slice(count))


def _two_clip_frames(shared_media_dir, count):
    """Two real people side by side: the left one at full size, the right one at 70%."""
    import cv2

    names = [row["file"] for row in VIDEO_ROWS if row["resolution"] == "512x512"][:2]
    if len(names) < 2:
        pytest.skip("needs two 512x512 shared clips")
    left = _reference(shared_media_dir, names[0]).frames[:count]
    right = _reference(shared_media_dir, names[1]).frames[:count]
    smaller = np.stack([cv2.resize(frame, (358, 358), interpolation=cv2.INTER_AREA) for frame in right])
    canvas = np.zeros((count, 512, 512 + 358, 3), np.uint8)
    canvas[:, :, :512] = left
    canvas[:, 77 : 77 + 358, 512:] = smaller
    return canvas


def test_two_real_faces_follow_the_largest_and_warn(shared_media_dir):
    frames = _two_clip_frames(shared_media_dir, 40)
    track = track_face(frames, fps=25)
    assert track.n_faces_seen == 2
    # The warning says which face is followed and how to choose the other.
    assert any("2 faces" in warning and "largest one (on the left)" in warning and "left or right" in warning
               for warning in track.warnings), track.warnings
    centres, _ = track.centres_and_sizes()
    assert np.all(centres[:, 0] < 512), "must follow the larger face on the left"
    chosen = track_face(frames, fps=25, face="right")
    assert np.all(chosen.centres_and_sizes()[0][:, 0] > 512), "face='right' follows the smaller face on the right"
    assert any("right-most one (on the right)" in warning for warning in chosen.warnings), chosen.warnings


def test_the_face_choice_reaches_every_stage_from_load_reference_video(shared_media_dir):
    """Load Reference Video's 'face' is carried with the clip: the prepared reference (identity,
    dub, Train Avatar all read it) follows the chosen person and is keyed apart from the default."""
    from sparse_avatar.nodes.comfy_types import frames_to_comfy_image
    from sparse_avatar.nodes.reference_video import LoadReferenceVideo, prepared_reference

    images = frames_to_comfy_image(_two_clip_frames(shared_media_dir, 24))
    (largest, *_), (right, *_) = (LoadReferenceVideo().load("", fps=25.0, images=images, face=face) for face in ("largest", "right"))
    assert right.face == "right"
    default, chosen = prepared_reference(32, largest), prepared_reference(32, right)
    assert np.all(default.track.centres_and_sizes()[0][:, 0] < 512) and np.all(chosen.track.centres_and_sizes()[0][:, 0] > 512)
    assert default.key != chosen.key
    with pytest.raises(UserFacingError, match="face must be one of largest, left, right"):
        LoadReferenceVideo().load("", fps=25.0, images=images, face="middle")


def test_real_video_with_the_face_painted_out_is_a_clear_error(shared_media_dir):
    name = VIDEO_FILES[0]
    reference = _reference(shared_media_dir, name)
    frames = reference.frames[:40].copy()
    track = track_face(frames, fps=reference.fps)
    for frame, (x0, y0, x1, y1) in zip(frames, track.boxes):
        side = x1 - x0
        top, bottom = int(max(0, y0 - 0.4 * side)), int(min(frame.shape[0], y1 + 0.4 * side))
        left, right = int(max(0, x0 - 0.4 * side)), int(min(frame.shape[1], x1 + 0.4 * side))
        frame[top:bottom, left:right] = frame.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    with pytest.raises(UserFacingError, match=r"reference video has no face in \d+% of frames; crop the video around the face, or use a clip where the face is visible and frontal"):
        track_face(frames, fps=reference.fps)


def test_shared_media_folder_is_outside_the_project():
    # The licence allows tests only: the clips must never end up inside the checkout.
    from conftest import REPO_ROOT

    assert REPO_ROOT not in SHARED_MEDIA_DIR.resolve().parents


@pytest.mark.parametrize("target", ["4K", "64x64"])
def test_face_track_and_crop_at_extreme_resolutions(shared_media_dir, target):
    import cv2

    reference = _reference(shared_media_dir, VIDEO_FILES[0])
    if target == "4K":
        frames = np.stack(
            [cv2.copyMakeBorder(cv2.resize(f, (2160, 2160)), 0, 0, 840, 840, cv2.BORDER_REFLECT) for f in reference.frames[:4]]
        )
    else:
        frames = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in reference.frames[:4]])
    track = track_face(frames, fps=reference.fps)
    assert track.coverage == 1.0
    crops, transforms = crop_faces(frames, track, size=256)
    assert crops.shape == (4, 256, 256, 3)
    # The crop is centred on the same face whatever the resolution: compare with the 512² track.
    original = track_face(reference.frames[:4], fps=reference.fps)
    scale = frames.shape[1] / reference.frames.shape[1]
    offset = 840 if target == "4K" else 0
    centres, sides = track.centres_and_sizes()
    expected_centres, expected_sides = original.centres_and_sizes()
    np.testing.assert_allclose(centres[:, 0], expected_centres[:, 0] * scale + offset, atol=0.1 * sides.mean())
    np.testing.assert_allclose(sides, expected_sides * scale, rtol=0.2)
