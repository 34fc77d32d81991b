"""Face tracking logic, smoothing, crop geometry and paste-back on media the tests generate.

Haar needs real faces, so the tracking logic is driven here by a scripted detector (the same
interface the Haar detector implements); the real-clip tests run the real detector.
"""
from __future__ import annotations

import numpy as np
import pytest

from sparse_avatar.errors import UserFacingError
from sparse_avatar.media.crop import crop_faces, crop_transforms, paste_back, paste_back_frame
from sparse_avatar.media.face_track import FaceTrack, HaarFaceDetector, smooth_box_track, track_face


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _box(cx, cy, side):
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)


class ScriptedDetector:
    """Returns the boxes scripted for each frame; the frame index is written in pixel (0, 0..1)."""

    name = "scripted"

    def __init__(self, boxes_per_frame):
        self.boxes_per_frame = boxes_per_frame
        self.calls = []

    def detect(self, frame):
        index = int(frame[0, 0, 0]) * 256 + int(frame[0, 1, 0])
        self.calls.append(index)
        boxes = np.asarray(self.boxes_per_frame(index), np.float32)
        return boxes.reshape(-1, boxes.shape[-1] if boxes.ndim == 2 else 4)


def _indexed_frames(n, height=120, width=160):
    """Frames with a picture in them (a gradient: blank frames do not count against coverage)."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    frames[..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, None, :]
    for index in range(n):
        frames[index, 0, 0, 0], frames[index, 0, 1, 0] = divmod(index, 256)
    return frames


def _textured_frame(height=240, width=320, seed=0):
    """Smooth colourful image (photographic spectrum) so resampling round trips are meaningful."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.uniform(0, 255, (height // 8, width // 8, 3)).astype(np.float32)
    image = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)
    image += 20 * rng.standard_normal((height, width, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(image, (0, 0), 1.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- smoothing and gaps


def test_smoothing_removes_jitter_and_follows_motion():
    rng = np.random.default_rng(0)
    fps, n = 25.0, 250
    t = np.arange(n) / fps
    true_cx = 200 + 30 * np.sin(2 * np.pi * 0.3 * t)
    true_cy = 150 + 10 * np.cos(2 * np.pi * 0.2 * t)
    true_side = 120 + 5 * np.sin(2 * np.pi * 0.1 * t)
    raw = np.stack([_box(x, y, s) for x, y, s in zip(true_cx, true_cy, true_side)])
    noisy = raw + rng.normal(0, 4, raw.shape).astype(np.float32)
    smoothed = smooth_box_track(noisy, fps)
    smoothed_cx = (smoothed[:, 0] + smoothed[:, 2]) / 2
    noisy_cx = (noisy[:, 0] + noisy[:, 2]) / 2
    assert np.sqrt(np.mean((smoothed_cx - true_cx) ** 2)) < 0.5 * np.sqrt(np.mean((noisy_cx - true_cx) ** 2))
    # Jitter = frame-to-frame acceleration: an order of magnitude less.
    assert np.std(np.diff(smoothed_cx, 2)) < 0.1 * np.std(np.diff(noisy_cx, 2))
    sides = smoothed[:, 2] - smoothed[:, 0]
    np.testing.assert_allclose(sides, smoothed[:, 3] - smoothed[:, 1], rtol=1e-5)  # square
    assert np.abs(sides - true_side).max() < 8


def test_gaps_are_interpolated_and_ends_held():
    n = 100
    raw = np.stack([_box(100 + 2 * i, 80, 60) for i in range(n)])
    raw[40:60] = np.nan  # a 0.8 s gap in the middle of a steady move
    raw[:10] = np.nan
    raw[90:] = np.nan
    smoothed = smooth_box_track(raw, 25.0)
    assert np.isfinite(smoothed).all()
    centre_x = (smoothed[:, 0] + smoothed[:, 2]) / 2
    np.testing.assert_allclose(centre_x[10:90], 100 + 2 * np.arange(10, 90), atol=1.0)
    # Outside the measured span: one frame coasting on the end velocity, then held.
    assert np.all(centre_x[:9] == centre_x[8]) and np.all(centre_x[91:] == centre_x[90])
    assert abs(centre_x[9] - (centre_x[10] - 2)) < 0.2 and abs(centre_x[90] - (centre_x[89] + 2)) < 0.2


def test_stride_does_not_change_the_track_of_a_steady_face():
    raw = np.stack([_box(100 + 0.5 * i, 80, 60) for i in range(60)])
    every_third = raw.copy()
    every_third[np.arange(60) % 3 != 0] = np.nan
    a = smooth_box_track(raw, 30.0)
    b = smooth_box_track(every_third, 30.0, measurement_interval=3)
    assert np.abs(a - b)[:58].max() < 0.5  # frames after the last measured one (57) are held


# ---------------------------------------------------------------- track_face logic


def test_track_face_follows_a_face_and_reports_coverage():
    n = 60
    detector = ScriptedDetector(lambda i: [_box(60 + i * 0.5, 60, 40)] if i % 9 else [])
    # (No turned search on frame 0, whose miss would otherwise be looked for at 90 degree steps.)
    track = track_face(_indexed_frames(n), fps=30, detector=detector, detect_every=2, search_rotations=False)
    assert isinstance(track, FaceTrack)
    assert track.n_frames == n and track.boxes.shape == (n, 4)
    assert detector.calls == list(range(0, n, 2))
    assert track.examined.sum() == 30
    # Frames 0 and 18, 36, 54 (multiples of 9 and 2) have no face: 4 of 30 examined.
    assert track.coverage == pytest.approx(26 / 30)
    assert track.n_faces_seen == 1
    assert track.source == "scripted"
    centre_x = (track.boxes[:, 0] + track.boxes[:, 2]) / 2
    np.testing.assert_allclose(centre_x[2:], 60 + 0.5 * np.arange(2, n), atol=1.0)


def test_two_faces_largest_is_followed_with_a_warning():
    big, small = _box(40, 60, 50), _box(120, 60, 40)
    detector = ScriptedDetector(lambda i: [small, big])
    track = track_face(_indexed_frames(30), fps=25, detector=detector)
    assert track.n_faces_seen == 2
    assert any("2 faces" in warning and "largest" in warning for warning in track.warnings)
    np.testing.assert_allclose(track.boxes[10], big, atol=0.5)


def test_followed_face_does_not_jump_to_a_momentarily_larger_one():
    first = _box(40, 60, 50)
    # The other face is larger on every odd frame (detector size noise): we keep following the
    # face that was largest when tracking started.
    detector = ScriptedDetector(lambda i: [first, _box(120, 60, 56 if i % 2 else 48)])
    track = track_face(_indexed_frames(30), fps=25, detector=detector, detect_every=1)
    assert np.abs((track.boxes[:, 0] + track.boxes[:, 2]) / 2 - 40).max() < 1.0


def test_small_background_detections_are_not_counted_as_people():
    face, speck = _box(60, 60, 60), _box(140, 20, 16)
    track = track_face(_indexed_frames(20), fps=25, detector=ScriptedDetector(lambda i: [face, speck]))
    assert track.n_faces_seen == 1 and not track.warnings


def test_false_positive_far_from_the_track_is_dropped():
    def boxes(i):
        return [_box(300, 200, 40)] if i == 30 else [_box(80, 60, 50)]

    # A lone detection far away on frame 30 (after a lost face would be re-acquired).
    detector = ScriptedDetector(lambda i: [] if 24 <= i < 30 else boxes(i))
    track = track_face(_indexed_frames(60, 240, 320), fps=25, detector=detector, detect_every=1, reacquire_s=0.2)
    assert not track.detected[30]
    assert np.abs((track.boxes[:, 0] + track.boxes[:, 2]) / 2 - 80).max() < 1.0


def test_no_face_is_a_clear_error():
    with pytest.raises(UserFacingError, match=r"no face in 100% of frames; crop the video around the face, or use a clip where the face is visible and frontal"):
        track_face(_indexed_frames(20), detector=ScriptedDetector(lambda i: []))
    with pytest.raises(UserFacingError, match=r"no face in 90% of frames"):
        track_face(
            _indexed_frames(20),
            detector=ScriptedDetector(lambda i: [_box(50, 50, 40)] if i == 0 else []),
            detect_every=2,
        )


def test_no_face_with_the_real_detector_on_a_faceless_video():
    ys, xs = np.mgrid[0:240, 0:320]
    gradient = np.stack([xs * 0.7, ys, 255 - xs * 0.5], axis=-1).astype(np.uint8)
    frames = np.stack([np.roll(gradient, 3 * i, axis=1) for i in range(12)])
    with pytest.raises(UserFacingError, match="no face in 100% of frames"):
        track_face(frames, fps=25, detector=HaarFaceDetector())


def test_iter_video_frames_tuples_and_fps_from_timestamps():
    frames = _indexed_frames(20)
    tuples = ((i, i / 50.0, frame) for i, frame in enumerate(frames))
    track = track_face(tuples, detector=ScriptedDetector(lambda i: [_box(60, 60, 40)]))
    assert track.fps == pytest.approx(50.0) and track.n_frames == 20


def test_explicit_face_box_skips_detection():
    track = track_face(iter(_indexed_frames(7)), face_box=(10, 20, 50, 80), fps=30)
    assert track.source == "user_box" and track.coverage == 1.0 and track.n_frames == 7
    # Not square: the larger side wins, centred on the box.
    np.testing.assert_allclose(track.boxes[3], [0, 20, 60, 80])


@pytest.mark.parametrize("box", [(10, 10, 12, 12), (500, 500, 600, 600), (1, 2, 3), ("a", 1, 2, 3)])
def test_bad_face_box(box):
    with pytest.raises(UserFacingError, match="face box"):
        track_face(_indexed_frames(3), face_box=box)


def test_bad_frames():
    with pytest.raises(UserFacingError, match="uint8 RGB"):
        track_face(np.zeros((3, 10, 10), np.float32), face_box=(0, 0, 9, 9))
    with pytest.raises(UserFacingError, match="no frames"):
        track_face([], face_box=(0, 0, 9, 9))
    with pytest.raises(UserFacingError, match="frame size changed"):
        track_face([np.zeros((20, 20, 3), np.uint8), np.zeros((20, 22, 3), np.uint8)], face_box=(0, 0, 9, 9))


def test_metadata_is_json_friendly():
    import json

    track = track_face(_indexed_frames(4), face_box=(10, 20, 50, 80))
    data = json.loads(json.dumps(track.to_metadata()))
    assert data["source"] == "user_box" and len(data["boxes"]) == 4


# ---------------------------------------------------------------- crop geometry


def _track_for(frame_shape, boxes):
    return FaceTrack(
        boxes=np.asarray(boxes, np.float32),
        raw_boxes=np.asarray(boxes, np.float32),
        examined=np.ones(len(boxes), bool),
        frame_size=frame_shape[:2],
        fps=25.0,
        coverage=1.0,
        n_faces_seen=1,
    )


def test_crop_maps_the_face_square_onto_the_crop():
    height, width = 240, 320
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    # Pixel values encode coordinates, so the crop tells exactly where it sampled from.
    frame = np.stack([xs % 256, ys % 256, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    box = _box(150, 100, 50)  # crop square: 80 px wide, x in [110, 190], y in [60, 140]
    crops, transforms = crop_faces(frame[None], _track_for(frame.shape, [box]), size=160, scale=1.6)
    assert crops.shape == (1, 160, 160, 3)
    np.testing.assert_allclose(transforms[0].box, [110, 60, 190, 140], atol=1e-6)
    # Crop pixel (u, v) samples source point 110 + (u + 0.5) / 2 - 0.5 in index coordinates.
    u = np.arange(160)
    expected_x = 110 + (u + 0.5) / 2 - 0.5
    np.testing.assert_allclose(crops[0, 80, 2:-2, 0], expected_x[2:-2], atol=1.0)
    expected_y = 60 + (u + 0.5) / 2 - 0.5
    np.testing.assert_allclose(crops[0, 2:-2, 80, 1], expected_y[2:-2], atol=1.0)
    inverse = transforms[0].inverse_matrix
    np.testing.assert_allclose(inverse @ [79.5, 79.5, 1], [149.5, 99.5], atol=1e-9)  # centre -> centre


def test_crop_at_the_border_is_padded_and_keeps_the_face_centred():
    frame = _textured_frame()
    box = _box(10, 10, 60)  # face square reaches 38 px past the top-left corner
    crops, transforms = crop_faces(frame[None], _track_for(frame.shape, [box]), size=96)
    np.testing.assert_allclose(transforms[0].box, [-38, -38, 58, 58], atol=1e-6)
    # Replicated border: the first rows are copies of the corner pixel's row/column.
    assert np.all(crops[0, :30, :30] == crops[0, 0, 0])
    back = paste_back(frame[None], crops, transforms)
    assert psnr(back[0], frame) > 40


def test_crop_entirely_outside_the_frame_does_not_fail():
    frame = _textured_frame()
    crops, transforms = crop_faces(frame[None], _track_for(frame.shape, [_box(-200, -200, 50)]), size=64)
    assert crops.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(paste_back(frame[None], crops, transforms)[0], frame)


def test_large_shrink_uses_the_pyramid_and_matches_area_resampling():
    import cv2

    import cv2 as _cv2

    coarse = np.random.default_rng(5).uniform(0, 255, (60, 80, 3)).astype(np.float32)
    frame = np.clip(_cv2.resize(coarse, (1600, 1200), interpolation=_cv2.INTER_CUBIC), 0, 255).astype(np.uint8)
    box = _box(800, 600, 700)  # 1120 px square to 128 px: 1/8.75
    crops, _ = crop_faces(frame[None], _track_for(frame.shape, [box]), size=128)
    region = frame[40:1160, 240:1360]
    expected = cv2.resize(region, (128, 128), interpolation=cv2.INTER_AREA)
    assert psnr(crops[0], expected) > 30


@pytest.mark.parametrize("size, scale, side", [(256, 1.6, 100), (512, 1.6, 180), (256, 1.3, 150), (96, 2.0, 37.3)])
def test_untouched_crop_pasted_back_is_seamless(size, scale, side):
    frame = _textured_frame(seed=1)
    box = _box(171.3, 118.6, side)
    crops, transforms = crop_faces(frame[None], _track_for(frame.shape, [box]), size=size, scale=scale)
    for color_match in (False, True):
        back = paste_back(frame[None], crops, transforms, color_match=color_match)
        assert psnr(back[0], frame) >= 40, (color_match, psnr(back[0], frame))


def test_colour_matching_removes_a_colour_cast_without_a_seam():
    frame = _textured_frame(seed=2)
    track = _track_for(frame.shape, [_box(160, 120, 90)])
    crops, transforms = crop_faces(frame[None], track, size=128)
    cast = np.clip(crops.astype(np.int16) + np.array([25, -10, 15]), 0, 255).astype(np.uint8)
    plain = paste_back(frame[None], cast, transforms, color_match=False)[0]
    matched = paste_back(frame[None], cast, transforms, color_match=True)[0]
    assert psnr(matched, frame) > psnr(plain, frame) + 5
    assert psnr(matched, frame) > 34


def test_feathering_leaves_no_step_at_the_edge():
    frame = np.full((200, 200, 3), 100, np.uint8)
    transforms = crop_transforms(_track_for(frame.shape, [_box(100, 100, 80)]), size=128)
    bright = np.full((1, 128, 128, 3), 200, np.uint8)
    feathered = paste_back_frame(frame, bright[0], transforms[0], color_match=False)
    hard = paste_back_frame(frame, bright[0], transforms[0], feather=0.0, color_match=False)
    row = 100
    assert np.abs(np.diff(hard[row, :, 0].astype(int))).max() >= 90
    assert np.abs(np.diff(feathered[row, :, 0].astype(int))).max() <= 12
    assert feathered[100, 100, 0] == 200 and feathered[100, 5, 0] == 100


def test_paste_back_does_not_modify_inputs_and_checks_shapes():
    frame = _textured_frame()
    frames = frame[None].copy()
    crops, transforms = crop_faces(frames, _track_for(frame.shape, [_box(160, 120, 80)]), size=64)
    paste_back(frames, np.zeros_like(crops), transforms)
    np.testing.assert_array_equal(frames[0], frame)
    with pytest.raises(UserFacingError, match="one crop and one transform per frame"):
        paste_back(frames, crops[:0], transforms)
    with pytest.raises(UserFacingError, match="crop must be uint8"):
        paste_back(frames, np.zeros((1, 32, 32, 3), np.uint8), transforms)


def test_crop_bad_arguments():
    frame = _textured_frame()
    track = _track_for(frame.shape, [_box(160, 120, 80)])
    with pytest.raises(UserFacingError, match="crop size"):
        crop_faces(frame[None], track, size=7)
    with pytest.raises(UserFacingError, match="crop scale"):
        crop_faces(frame[None], track, scale=0)
    with pytest.raises(UserFacingError, match="frames than the face track"):
        crop_faces(np.stack([frame, frame]), track)
    with pytest.raises(UserFacingError, match="got 0 frames but the face track has 1"):
        crop_faces([], track)


def test_colour_correction_follows_slow_casts_not_each_frames_mouth():
    # Dubbing: the source's mouth opens on every other frame (a dark patch inside the face
    # region) while the generated face stays the same. Matching each frame alone would pump the
    # whole pasted face darker and lighter with the source's mouth; the smoothed correction must not.
    frame = _textured_frame(seed=4)
    frames = np.stack([frame] * 9)
    frames[1::2, 140:160, 140:180] = 20
    crops, transforms = crop_faces(frames[:1], _track_for(frame.shape, [_box(160, 120, 90)]), size=96)
    generated = np.repeat(crops, 9, axis=0)
    cheek = (slice(90, 110), slice(120, 140))  # away from the mouth patch

    def swing(result):
        return np.ptp([f[cheek].astype(float).mean() for f in result])

    per_frame = paste_back(frames, generated, transforms * 9, color_window=1)
    smoothed = paste_back(frames, generated, transforms * 9, color_window=9)
    assert swing(per_frame) > 3 * swing(smoothed)
    assert swing(smoothed) < 4
    single = np.stack([paste_back_frame(f, c, t) for f, c, t in zip(frames, generated, transforms * 9)])
    np.testing.assert_array_equal(single, per_frame)


# ---------------------------------------------------------------- turned crops (roll, rotation)


def _rolled_track(frame_shape, box, roll=0.0, rotation=0):
    track = _track_for(frame_shape, [box])
    track.rolls = np.array([roll], np.float32)
    track.rotation = rotation
    return track


def test_applied_roll_keeps_small_rolls_and_follows_large_ones():
    from sparse_avatar.media.crop import ROLL_FULL, ROLL_KEEP, applied_roll

    rolls = np.linspace(-40, 40, 801)
    applied = applied_roll(rolls)
    assert np.all(applied[np.abs(rolls) <= ROLL_KEEP] == 0)
    np.testing.assert_allclose(applied[np.abs(rolls) >= ROLL_FULL], rolls[np.abs(rolls) >= ROLL_FULL])
    assert np.all(np.diff(applied) >= 0) and np.abs(np.diff(applied)).max() < 0.5  # monotone, no jump (0.1 degree steps)


@pytest.mark.parametrize("roll, rotation", [(25.0, 0), (-30.0, 0), (0.0, 90), (0.0, 180), (20.0, 270)])
def test_turned_crop_samples_the_turned_square(roll, rotation):
    from sparse_avatar.media.crop import applied_roll

    height, width = 240, 320
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    frame = np.stack([xs % 256, ys % 256, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    track = _rolled_track(frame.shape, _box(150, 110, 50), roll, rotation)
    crops, transforms = crop_faces(frame[None], track, size=80, scale=1.6)
    angle = float(applied_roll(roll)) - rotation
    assert transforms[0].angle == pytest.approx((angle + 180) % 360 - 180, abs=1e-6)
    # The crop's centre is the box centre; its "down" (increasing row) points along the face's down axis.
    inverse = transforms[0].inverse_matrix
    np.testing.assert_allclose(inverse @ [39.5, 39.5, 1], [149.5, 109.5], atol=1e-9)
    down = inverse @ [39.5, 79.5, 1] - inverse @ [39.5, 39.5, 1]
    theta = np.radians(angle)
    np.testing.assert_allclose(down / np.linalg.norm(down), [-np.sin(theta), np.cos(theta)], atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(down), 40 / 80 * 80, atol=1e-9)  # 80 px of crop = the 80 px square
    # And the pixels say the same: crop pixel (u, v) holds the source coordinates it maps to.
    for u, v in [(20, 20), (60, 25), (40, 70)]:
        x, y = inverse @ [u, v, 1]
        assert abs(int(crops[0, v, u, 0]) - x) < 1.5 and abs(int(crops[0, v, u, 1]) - y) < 1.5
    corners = transforms[0].corners
    sides = np.linalg.norm(np.roll(corners, -1, axis=0) - corners, axis=1)
    np.testing.assert_allclose(sides, 80, atol=1e-6)  # still a square


@pytest.mark.parametrize("roll, rotation, size", [(25.0, 0, 256), (-28.0, 0, 128), (0.0, 90, 256), (24.0, 270, 96), (0.0, 180, 160)])
def test_untouched_turned_crop_pasted_back_is_seamless(roll, rotation, size):
    frame = _textured_frame(seed=1)
    transforms = crop_transforms(_rolled_track(frame.shape, _box(171.3, 118.6, 100), roll, rotation), size=size)
    crops = np.stack([transforms[0].apply(frame)])
    for color_match in (False, True):
        back = paste_back(frame[None], crops, transforms, color_match=color_match)
        assert psnr(back[0], frame) >= 40, (color_match, psnr(back[0], frame))
    # Outside the turned square nothing changes; a changed crop changes only inside it.
    grey = paste_back_frame(frame, np.full_like(crops[0], 128), transforms[0], color_match=False, feather=0.0)
    changed = np.any(grey != frame, axis=2)
    ys, xs = np.nonzero(changed)
    crop_xy = transforms[0].matrix @ np.stack([xs, ys, np.ones_like(xs)]).astype(np.float64)
    assert crop_xy.min() > -1.0 and crop_xy.max() < size  # every changed pixel lies inside the crop's square
    assert changed.sum() > 0.8 * (1.6 * 100) ** 2  # and the square is (almost) all changed


def test_turned_crop_feathering_leaves_no_step():
    frame = np.full((240, 240, 3), 100, np.uint8)
    transforms = crop_transforms(_rolled_track(frame.shape, _box(120, 120, 90), 30.0), size=128)
    feathered = paste_back_frame(frame, np.full((128, 128, 3), 200, np.uint8), transforms[0], color_match=False)
    steps = max(np.abs(np.diff(feathered[..., 0].astype(int), axis=axis)).max() for axis in (0, 1))
    assert steps <= 12 and feathered[120, 120, 0] == 200


# ---------------------------------------------------------------- orientation, roll, choice, blank frames


class MarkerDetector:
    """Finds a 'face' only where its marker stands upright: a wide red bar with a green block
    under its left end (turned 90 degrees the bar is tall, turned 180 the block is above the right end)."""

    name = "marker"

    def detect(self, frame):
        red = (frame[..., 0] > 200) & (frame[..., 1] < 60)
        green = (frame[..., 1] > 200) & (frame[..., 0] < 60)
        if not red.any() or not green.any():
            return np.empty((0, 4), np.float32)
        ys, xs = np.nonzero(red)
        green_y, green_x = (coordinate.mean() for coordinate in np.nonzero(green))
        upright = np.ptp(xs) > 2 * np.ptp(ys) and green_y > ys.mean() and green_x < xs.mean()
        if not upright:
            return np.empty((0, 4), np.float32)
        return np.array([[xs.min(), ys.min(), xs.min() + 40, ys.min() + 40]], np.float32)


def _marker_frames(n=10):
    frames = np.zeros((n, 120, 160, 3), np.uint8)
    frames[..., 2] = np.linspace(0, 200, 160, dtype=np.uint8)[None, None, :]
    frames[:, 30:36, 50:68] = (255, 0, 0)  # the wide red bar; the 'face' box is (50, 30, 90, 70)
    frames[:, 36:42, 50:56] = (0, 255, 0)  # the green block under its left end
    return frames


@pytest.mark.parametrize("k, rotation", [(1, 90), (-1, 270), (2, 180)])
def test_sideways_video_is_found_turned_and_tracked_in_the_given_pixels(k, rotation):
    upright = _marker_frames()
    stored = np.ascontiguousarray(np.rot90(upright, k=k, axes=(1, 2)))  # np.rot90 turns counter-clockwise
    track = track_face(stored, fps=25, detector=MarkerDetector(), detect_every=1)
    assert track.rotation == rotation and track.coverage == 1.0
    assert any("turned" in warning and str(rotation) in warning for warning in track.warnings), track.warnings
    np.testing.assert_array_equal(track.upright(stored), upright)
    # The box lies on the marker's square in the stored frames: the upright crop equals the crop of the upright video.
    reference = track_face(upright, fps=25, detector=MarkerDetector(), detect_every=1)
    assert reference.rotation == 0 and not reference.warnings
    turned_crops, _ = crop_faces(stored, track, size=64)
    upright_crops, _ = crop_faces(upright, reference, size=64)
    assert psnr(turned_crops[0], upright_crops[0]) > 40
    back = paste_back(stored, turned_crops, crop_transforms(track, 64), color_match=False)
    assert psnr(back[0], stored[0]) > 40


def test_no_turned_search_when_asked_not_to():
    stored = np.ascontiguousarray(np.rot90(_marker_frames(), k=1, axes=(1, 2)))
    with pytest.raises(UserFacingError, match="no face in 100% of frames"):
        track_face(stored, fps=25, detector=MarkerDetector(), search_rotations=False)


def test_a_detector_with_rolls_gives_a_smoothed_roll_track():
    rng = np.random.default_rng(3)

    def boxes(i):
        return [[*_box(80, 60, 50), 25.0 + rng.normal(0, 2)]]

    track = track_face(_indexed_frames(50), fps=25, detector=ScriptedDetector(boxes), detect_every=1)
    assert track.rolls.shape == (50,) and np.isfinite(track.raw_rolls).all()
    assert abs(track.rolls.mean() - 25) < 1.0 and track.rolls.std() < 0.5 * track.raw_rolls.std()
    assert abs(crop_transforms(track, 64)[25].angle - track.rolls[25]) < 1e-4  # a 25 degree face: upright crop
    assert track_face(_indexed_frames(5), detector=ScriptedDetector(lambda i: [_box(80, 60, 50)])).rolls is None
    assert json_friendly(track.to_metadata())["rolls"][0] == pytest.approx(float(track.rolls[0]), abs=0.01)


def json_friendly(data):
    import json

    return json.loads(json.dumps(data))


@pytest.mark.parametrize("face, expected_x, where", [("largest", 40, "on the left"), ("right", 120, "on the right"), ("left", 40, "on the left")])
def test_two_faces_the_choice_is_followed_and_named(face, expected_x, where):
    big, small = _box(40, 60, 50), _box(120, 60, 40)
    track = track_face(_indexed_frames(30), fps=25, detector=ScriptedDetector(lambda i: [small, big]), face=face)
    assert track.n_faces_seen == 2
    assert any("2 faces" in warning and where in warning for warning in track.warnings), track.warnings
    assert abs((track.boxes[10, 0] + track.boxes[10, 2]) / 2 - expected_x) < 1.0
    with pytest.raises(UserFacingError, match="face must be one of largest, left, right"):
        track_face(_indexed_frames(3), detector=ScriptedDetector(lambda i: [big]), face="biggest")


def test_blank_frames_do_not_count_against_coverage():
    frames = _indexed_frames(50)
    frames[:30] = 0  # a fade from black: 30 blank frames, then the face
    frames[:30, 0, 1, 0] = np.arange(30)  # (the scripted detector's frame index; one pixel keeps it blank)
    detector = ScriptedDetector(lambda i: [_box(80, 60, 50)] if i >= 30 else [])
    track = track_face(frames, fps=25, detector=detector, detect_every=1)
    assert track.coverage == 1.0
    assert any("blank" in warning for warning in track.warnings), track.warnings
    np.testing.assert_allclose(track.boxes[:30], track.boxes[30:31].repeat(30, 0), atol=1.0)  # the first box held
    # A miss on a frame with a picture still counts.
    detector = ScriptedDetector(lambda i: [_box(80, 60, 50)] if i >= 30 else [])
    assert track_face(_indexed_frames(50), fps=25, detector=detector, detect_every=1, min_coverage=0).coverage == pytest.approx(0.4)


def test_default_detector_is_mediapipe_with_haar_as_the_fallback(monkeypatch):
    from sparse_avatar.media import face_track, mediapipe_face

    if mediapipe_face.mediapipe_available():
        assert isinstance(face_track.default_face_detector(), mediapipe_face.MediapipeFaceDetector)
    monkeypatch.setattr(mediapipe_face, "mediapipe_available", lambda: False)  # as without the package
    assert isinstance(face_track.default_face_detector(), HaarFaceDetector)
