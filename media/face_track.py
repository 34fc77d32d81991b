"""Face tracking over a video: detect on a stride, pick one face, smooth the box track, fill gaps.

Detector (``default_face_detector``): mediapipe's BlazeFace models (``MediapipeFaceDetector`` in
``mediapipe_face.py``: full-range search, an upright short-range measurement around each face,
the roll from its eye keypoints, boxes calibrated onto the Haar framing the crops and the model
assume) when ``mediapipe`` imports; otherwise OpenCV's bundled Haar cascades (``HaarFaceDetector``:
frontal default, then frontal alt2, then profile both ways). Both ship their weights in their
wheels, so nothing is downloaded at run time. Any object with ``detect(frame_rgb) -> [N, 4]``
boxes (or [N, 5] with the roll in degrees, clockwise positive, as a fifth column), optionally
``detect_near(frame_rgb, box)`` and ``confirm(frame_rgb, box)``, can be passed as ``detector=``.
``FaceTrack.source`` names the detector used.

Pipeline (``track_face``):
1. The detector runs on every ``detect_every``-th frame (5 per second by default), on a
   downscaled copy, so tracking costs a small fraction of decoding.
2. Orientation (a sideways or upside-down video without rotation metadata): a detector with
   ``upright_score`` (mediapipe) scores the first two examined frames with a face in all four 90
   degree orientations and the best total wins (BlazeFace also finds turned faces, with lower
   scores). With other detectors, frames with no face upright are searched turned by 90, 270 and
   180 degrees, and one orientation that finds a face on two examined frames (before any upright
   face) wins. The video is then tracked in that orientation (``FaceTrack.rotation``; boxes stay
   in the given frames' pixels) and the crops are upright (``crop.crop_transforms`` turns them).
3. One face is followed: the largest face (or the left/right-most, ``face=``) on the first frame
   with a face, then on each examined frame the candidate overlapping the last accepted box most
   (so two equal faces never swap). When the followed face has been lost for ``reacquire_s`` it
   is chosen again the same way.
4. Detections far from the median of their neighbouring detections (position or size) are
   dropped as false positives. A Rauch-Tung-Striebel smoother (constant-velocity Kalman filter
   run forward, then backward) on the box centre and log-size (and on the roll, when the detector
   measures it) then gives a zero-phase, jitter-free track and interpolates every frame that was
   not examined or where the face was missed.
5. Blank frames (black or one colour) without a face do not count against coverage. Too few detections ->
   ``UserFacingError`` telling the user to crop the video around the face or use a clip where it
   is visible and frontal.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserFacingError

DEFAULT_DETECTIONS_PER_SECOND = 5.0
DEFAULT_SMOOTHING_HZ = 1.5
# A face counts towards n_faces_seen when at least this fraction of the followed face's size:
# Haar's occasional small false positives in the background must not be reported as a 2nd person.
_SIGNIFICANT_FACE_FRACTION = 0.5
# Share of examined frames on which extra faces must appear before we report them.
_MULTI_FACE_MIN_SHARE = 0.2
# Measurement noise of a detected box, in units of the face size (centre) and log units (size).
_MEASUREMENT_STD = 0.05
# Detections farther than this from their neighbours (face-size units / log size) are outliers.
_OUTLIER_CENTRE = 0.5
_OUTLIER_LOG_SIZE = 0.35
# How often the whole frame is scanned while a face is being followed near its last position.
_FULL_SCAN_INTERVAL_S = 2.0
# Examined frames (before any face) on which one turned orientation must find a face to be taken.
_ROTATION_VOTES = 2
# The order turned orientations are tried in (clockwise degrees): phones lie on either side first.
_SEARCH_ROTATIONS = (90, 270, 180)
# A frame whose grey levels vary less than this (std on a 64 px thumbnail) is blank: no face can be in it.
_BLANK_STD = 3.0
FACE_CHOICES = ("largest", "left", "right")


def check_face_choice(face: str) -> str:
    """``face`` when it is one of FACE_CHOICES, else a UserFacingError naming them."""
    if face not in FACE_CHOICES:
        raise UserFacingError(f"face must be one of {', '.join(FACE_CHOICES)} (which face to follow), got {face!r}")
    return face


class HaarFaceDetector:
    """OpenCV Haar cascades on a downscaled grey frame. Returns boxes [N, 4] (x0, y0, x1, y1)."""

    name = "opencv-haar"

    def __init__(self, *, detection_side: int = 320, min_face_fraction: float = 0.08):
        import cv2

        self._cv2 = cv2
        self.detection_side = int(detection_side)
        self.min_face_fraction = float(min_face_fraction)
        cascade_dir = cv2.data.haarcascades
        self._frontal = [
            cv2.CascadeClassifier(cascade_dir + "haarcascade_frontalface_default.xml"),
            cv2.CascadeClassifier(cascade_dir + "haarcascade_frontalface_alt2.xml"),
        ]
        self._profile = cv2.CascadeClassifier(cascade_dir + "haarcascade_profileface.xml")
        if any(cascade.empty() for cascade in [*self._frontal, self._profile]):
            raise UserFacingError(
                f"OpenCV's face cascades are missing from {cascade_dir}; reinstall opencv-python-headless"
            )

    def _run(
        self, grey: np.ndarray, cascades, min_side: int, max_side: int | None = None, *, coarse: bool = False
    ) -> np.ndarray:
        """Boxes [N, 4] (x0, y0, x1, y1) in ``grey``'s pixels from the first cascade that finds any.

        ``coarse``: fewer scales and neighbours, for the small search region around a known face
        (half the cost; the region and size range already rule out most false positives).
        """
        options = dict(scaleFactor=1.2 if coarse else 1.1, minNeighbors=3 if coarse else 5, minSize=(min_side, min_side))
        if max_side is not None:
            options["maxSize"] = (max_side, max_side)
        for cascade in cascades:
            found = np.asarray(cascade.detectMultiScale(grey, **options), np.float64).reshape(-1, 4)
            if len(found):
                break
        if not len(found) and self._profile in cascades:
            # The profile cascade only knows one side: run it on the mirrored image too.
            right = np.asarray(self._profile.detectMultiScale(grey[:, ::-1].copy(), **options), np.float64).reshape(-1, 4)
            right[:, 0] = grey.shape[1] - right[:, 0] - right[:, 2]
            found = right
        return np.stack([found[:, 0], found[:, 1], found[:, 0] + found[:, 2], found[:, 1] + found[:, 3]], axis=1)

    def _grey(self, image_rgb: np.ndarray, factor: float) -> np.ndarray:
        cv2 = self._cv2
        if factor < 1.0:
            height, width = image_rgb.shape[:2]
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            image_rgb = cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA)
        return cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2GRAY))

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray:
        """All faces in the whole frame (downscaled to ``detection_side``)."""
        factor = min(1.0, self.detection_side / max(frame_rgb.shape[:2]))
        grey = self._grey(frame_rgb, factor)
        min_side = max(20, int(self.min_face_fraction * min(grey.shape)))
        boxes = self._run(grey, [*self._frontal, self._profile], min_side)
        return (boxes / factor).astype(np.float32)

    def detect_near(self, frame_rgb: np.ndarray, box: np.ndarray, *, cascades=None) -> np.ndarray:
        """Faces of about ``box``'s size near ``box``: a small region at a small scale, so tracking
        a found face costs a fraction of a full-frame scan. A coarse search first, a fine one when
        that finds nothing (still far cheaper than scanning the frame)."""
        found = self._detect_in_region(frame_rgb, box, cascades, coarse=True)
        return found if len(found) else self._detect_in_region(frame_rgb, box, cascades, coarse=False)

    def _detect_in_region(self, frame_rgb: np.ndarray, box: np.ndarray, cascades, *, coarse: bool) -> np.ndarray:
        x0, y0, x1, y1 = (float(v) for v in box)
        side = max(x1 - x0, y1 - y0)
        centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
        height, width = frame_rgb.shape[:2]
        left, top = max(0, int(centre_x - self._ROI_SIDE * side / 2)), max(0, int(centre_y - self._ROI_SIDE * side / 2))
        right = min(width, int(math.ceil(centre_x + self._ROI_SIDE * side / 2)))
        bottom = min(height, int(math.ceil(centre_y + self._ROI_SIDE * side / 2)))
        if right - left < 8 or bottom - top < 8:
            return np.empty((0, 4), np.float32)
        factor = min(1.0, self._TRACK_FACE_SIDE / side)
        grey = self._grey(frame_rgb[top:bottom, left:right], factor)
        expected = side * factor
        boxes = self._run(
            grey,
            # alt2 first here: it is the faster of the two frontal cascades on small regions.
            cascades or [self._frontal[1], self._frontal[0], self._profile],
            max(20, int(expected / self._SIZE_RANGE)),
            int(expected * self._SIZE_RANGE) + 1,
            coarse=coarse,
        )
        return (boxes / factor + np.array([left, top, left, top])).astype(np.float32)

    def confirm(self, frame_rgb: np.ndarray, box: np.ndarray) -> bool:
        """Second opinion on a face the default cascade found: the alt2 cascade must find it too.
        Used before reporting a second person, because single-cascade false positives on
        static backgrounds repeat frame after frame."""
        found = self._detect_in_region(frame_rgb, box, [self._frontal[1]], coarse=False)
        return bool(len(found)) and float(_iou(np.asarray(box, np.float32), found).max()) > 0.3

    # Tracking region = this many face sides around the last box; the face is scaled to about
    # _TRACK_FACE_SIDE pixels there, and looked for between 1/_SIZE_RANGE and _SIZE_RANGE times
    # its last size.
    _ROI_SIDE = 2.2
    _TRACK_FACE_SIDE = 48.0
    _SIZE_RANGE = 1.3


@dataclass
class FaceTrack:
    """One face box per frame, in source pixels (edge convention: pixel i spans [i, i+1]).

    ``boxes`` [T, 4] (x0, y0, x1, y1): smoothed, square, every frame filled.
    ``raw_boxes`` [T, 4]: accepted detections, NaN where none. ``examined`` [T]: the detector ran
    on that frame. ``coverage``: share of examined (non-blank) frames with an accepted face (1.0
    for a user box). ``rotation``: clockwise degrees (0/90/180/270) that turn the frames upright
    (the face was found turned so). ``rolls`` [T]: the face's smoothed roll in degrees in the
    upright frames (clockwise on screen positive), None when the detector does not measure it;
    ``raw_rolls`` [T]: the measured rolls, NaN where none.
    """

    boxes: np.ndarray
    raw_boxes: np.ndarray
    examined: np.ndarray
    frame_size: tuple[int, int]
    fps: float
    coverage: float
    n_faces_seen: int
    warnings: list[str] = field(default_factory=list)
    source: str = HaarFaceDetector.name
    rotation: int = 0
    rolls: np.ndarray | None = None
    raw_rolls: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return len(self.boxes)

    @property
    def detected(self) -> np.ndarray:
        """bool [T]: an accepted detection on this frame."""
        return ~np.isnan(self.raw_boxes[:, 0])

    def select(self, frames) -> FaceTrack:
        """The track of some of its frames (a slice or indices): boxes, rolls and flags alike."""
        from dataclasses import replace

        def pick(array):
            return None if array is None else np.asarray(array)[frames]

        return replace(self, boxes=pick(self.boxes), raw_boxes=pick(self.raw_boxes), examined=pick(self.examined),
                       rolls=pick(self.rolls), raw_rolls=pick(self.raw_rolls), warnings=list(self.warnings))

    def upright(self, frames: np.ndarray) -> np.ndarray:
        """Frames of this video ([T, H, W, 3] or one [H, W, 3]) turned by ``rotation``, so the
        face stands upright (full-frame output of a sideways clip); unchanged when 0."""
        if not self.rotation:
            return frames
        frames = np.asarray(frames)
        axes = (0, 1) if frames.ndim == 3 else (1, 2)
        return np.ascontiguousarray(np.rot90(frames, k=-(int(self.rotation) // 90), axes=axes))

    def centres_and_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Box centres [T, 2] (x, y) and side lengths [T]."""
        centres = (self.boxes[:, :2] + self.boxes[:, 2:]) / 2
        return centres, self.boxes[:, 2] - self.boxes[:, 0]

    def to_metadata(self) -> dict:
        """JSON-friendly summary (for identity files): smoothed boxes rounded to 0.01 px."""
        return {
            "frame_size": list(self.frame_size),
            "fps": self.fps,
            "coverage": round(float(self.coverage), 4),
            "n_faces_seen": int(self.n_faces_seen),
            "source": self.source,
            "rotation": int(self.rotation),
            "boxes": np.round(self.boxes.astype(np.float64), 2).tolist(),
            "rolls": None if self.rolls is None else np.round(self.rolls.astype(np.float64), 2).tolist(),
        }


def smooth_box_track(
    raw_boxes: np.ndarray, fps: float, *, smoothing_hz: float = DEFAULT_SMOOTHING_HZ, measurement_interval: int = 1
) -> np.ndarray:
    """Zero-phase smoothing + gap filling of a box track.

    ``raw_boxes`` [T, 4] (x0, y0, x1, y1) with NaN rows where there is no measurement. Returns
    square boxes [T, 4] with every row filled: frames before the first (after the last)
    measurement hold the first (last) smoothed box. ``smoothing_hz`` is roughly where the
    smoother stops following motion; ``measurement_interval`` is the detector stride, so the
    smoothing strength does not change when fewer frames are measured.
    """
    raw_boxes = np.asarray(raw_boxes, np.float64)
    measured = ~np.isnan(raw_boxes).any(axis=1)
    if not measured.any():
        raise ValueError("smooth_box_track needs at least one measured box")
    centres = (raw_boxes[:, :2] + raw_boxes[:, 2:]) / 2
    sizes = np.maximum(raw_boxes[:, 2] - raw_boxes[:, 0], raw_boxes[:, 3] - raw_boxes[:, 1])
    unit = float(np.median(sizes[measured]))
    # Channels in face-size units so one noise model fits every resolution.
    observations = np.column_stack([centres / unit, np.log(np.maximum(sizes, 1e-6) / unit)])
    smoothed = _rts_constant_velocity(observations, measured, 1.0 / fps, smoothing_hz, measurement_interval)
    centre = smoothed[:, :2] * unit
    half = np.exp(smoothed[:, 2]) * unit / 2
    return np.column_stack([centre[:, 0] - half, centre[:, 1] - half, centre[:, 0] + half, centre[:, 1] + half]).astype(np.float32)


def smooth_roll_track(
    raw_rolls: np.ndarray, fps: float, *, smoothing_hz: float = DEFAULT_SMOOTHING_HZ, measurement_interval: int = 1
) -> np.ndarray:
    """``smooth_box_track`` for a roll track: degrees [T] with NaN where not measured -> [T], every
    frame filled (the same smoother on the angle in radians; a roll measurement is as noisy as a
    box, about 3 degrees)."""
    raw_rolls = np.asarray(raw_rolls, np.float64)
    measured = np.isfinite(raw_rolls)
    if not measured.any():
        raise ValueError("smooth_roll_track needs at least one measured roll")
    observations = np.radians(np.where(measured, raw_rolls, 0.0))[:, None]
    smoothed = _rts_constant_velocity(observations, measured, 1.0 / fps, smoothing_hz, measurement_interval)
    return np.degrees(smoothed[:, 0]).astype(np.float32)


def _rts_constant_velocity(
    observations: np.ndarray, measured: np.ndarray, dt: float, smoothing_hz: float, measurement_interval: int
) -> np.ndarray:
    """RTS smoother, constant-velocity model, channels [T, C] sharing one noise model.

    Because all channels share the noise model, the covariances and gains are the same scalars
    for every channel: only the state means are vectors.
    """
    n_frames, _ = observations.shape
    indices = np.flatnonzero(measured)
    first, last = int(indices[0]), int(indices[-1])
    measurement_var = _MEASUREMENT_STD**2
    # Continuous white-acceleration density chosen so the steady-state filter bandwidth is about
    # smoothing_hz: omega^4 = q / (r * dt_between_measurements).
    omega = 2 * math.pi * smoothing_hz
    q = omega**4 * measurement_var * dt * max(1, measurement_interval)
    q11, q12, q22 = q * dt**3 / 3, q * dt**2 / 2, q * dt

    span = last - first + 1
    mean_pred = np.zeros((span, 2, observations.shape[1]))
    mean_filt = np.zeros_like(mean_pred)
    cov_pred = np.zeros((span, 3))  # (p11, p12, p22)
    cov_filt = np.zeros((span, 3))
    mean = np.stack([observations[first], np.zeros(observations.shape[1])])
    p11, p12, p22 = measurement_var, 0.0, (1.0 / dt) ** 2 * measurement_var
    for step in range(span):
        if step:
            mean = np.stack([mean[0] + dt * mean[1], mean[1]])
            p11, p12, p22 = p11 + 2 * dt * p12 + dt * dt * p22 + q11, p12 + dt * p22 + q12, p22 + q22
        mean_pred[step], cov_pred[step] = mean, (p11, p12, p22)
        if measured[first + step]:
            innovation = observations[first + step] - mean[0]
            denominator = p11 + measurement_var
            gain1, gain2 = p11 / denominator, p12 / denominator
            mean = np.stack([mean[0] + gain1 * innovation, mean[1] + gain2 * innovation])
            p11, p12, p22 = (1 - gain1) * p11, (1 - gain1) * p12, p22 - gain2 * p12
        mean_filt[step], cov_filt[step] = mean, (p11, p12, p22)

    smoothed = np.empty((span, observations.shape[1]))
    mean_smooth = mean_filt[-1]
    smoothed[-1] = mean_smooth[0]
    velocity_first, velocity_last = None, mean_smooth[1]
    for step in range(span - 2, -1, -1):
        f11, f12, f22 = cov_filt[step]
        n11, n12, n22 = cov_pred[step + 1]
        # G = P_filt F^T P_pred^-1 with F = [[1, dt], [0, 1]]
        a11, a12, a21, a22 = f11 + dt * f12, f12, f12 + dt * f22, f22
        determinant = n11 * n22 - n12 * n12
        i11, i12, i22 = n22 / determinant, -n12 / determinant, n11 / determinant
        g11, g12 = a11 * i11 + a12 * i12, a11 * i12 + a12 * i22
        g21, g22 = a21 * i11 + a22 * i12, a21 * i12 + a22 * i22
        difference = mean_smooth - mean_pred[step + 1]
        mean_smooth = np.stack(
            [
                mean_filt[step][0] + g11 * difference[0] + g12 * difference[1],
                mean_filt[step][1] + g21 * difference[0] + g22 * difference[1],
            ]
        )
        smoothed[step] = mean_smooth[0]
    velocity_first = mean_smooth[1] if span > 1 else velocity_last

    result = np.empty_like(observations)
    result[first : last + 1] = smoothed
    # Outside the measured span: carry on with the end velocity for a short while (a sudden stop
    # would be a visible kink in the crop), then hold.
    coast = max(1, measurement_interval)
    before = np.minimum(np.arange(first, 0, -1), coast)[:, None]
    after = np.minimum(np.arange(1, n_frames - last), coast)[:, None]
    result[:first] = smoothed[0] - velocity_first * before * dt
    result[last + 1 :] = smoothed[-1] + velocity_last * after * dt
    return result


def _iou(box: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], candidates[:, 0])
    y0 = np.maximum(box[1], candidates[:, 1])
    x1 = np.minimum(box[2], candidates[:, 2])
    y1 = np.minimum(box[3], candidates[:, 3])
    intersection = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = _area(box) + _area(candidates) - intersection
    return intersection / np.maximum(union, 1e-9)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _frames_of(frames_or_iterator) -> Iterable[tuple[np.ndarray, float | None]]:
    """Yields (frame, time_s or None) from an array [T,H,W,3], frames, or iter_video_frames tuples."""
    for item in frames_or_iterator:
        if isinstance(item, tuple) and len(item) == 3:
            yield item[2], float(item[1])
        else:
            yield item, None


def _check_frame(frame, frame_size) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise UserFacingError(
            f"frames must be uint8 RGB [height, width, 3], got {frame.dtype} {tuple(frame.shape)}; "
            "convert ComfyUI images with nodes.comfy_types.comfy_image_to_frames"
        )
    if frame_size is not None and frame.shape[:2] != frame_size:
        raise UserFacingError(f"frame size changed from {frame_size} to {frame.shape[:2]} inside one video; re-encode it")
    return frame


def _validated_face_box(face_box, frame_size) -> np.ndarray:
    try:
        box = np.asarray(face_box, np.float64).reshape(4)
    except (TypeError, ValueError):
        raise UserFacingError(f"face box must be four numbers (x0, y0, x1, y1) in pixels, got {face_box!r}") from None
    height, width = frame_size
    x0, y0, x1, y1 = box
    if not np.isfinite(box).all() or x1 - x0 < 8 or y1 - y0 < 8:
        raise UserFacingError(f"face box {tuple(box)} is empty or tiny; give (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise UserFacingError(f"face box {tuple(box)} lies outside the {width}x{height} frame; give it in pixels of the video")
    return box


def default_face_detector():
    """The detector ``track_face`` uses when none is given: ``MediapipeFaceDetector`` when
    mediapipe imports, else ``HaarFaceDetector`` (the fallback when that package is absent)."""
    from .mediapipe_face import MediapipeFaceDetector, mediapipe_available  # it imports crop, which imports this module

    return MediapipeFaceDetector() if mediapipe_available() else HaarFaceDetector()


def _candidates(found) -> np.ndarray:
    """A detector's answer -> float32 [N, 5] (x0, y0, x1, y1, roll degrees or NaN)."""
    found = np.asarray(found, np.float32)
    if found.size == 0:
        return np.empty((0, 5), np.float32)
    if found.ndim != 2 or found.shape[1] not in (4, 5):
        raise ValueError(f"a face detector must return boxes [N, 4] or [N, 5], got shape {found.shape}")
    if found.shape[1] == 4:
        found = np.concatenate([found, np.full((len(found), 1), np.nan, np.float32)], axis=1)
    return found


def _box_for(detector_box: np.ndarray) -> np.ndarray:
    """A candidate as a detector takes it back: with its roll when it has one."""
    return detector_box if np.isfinite(detector_box[4]) else detector_box[:4]


def _turn_points(points: np.ndarray, clockwise: int, height: int, width: int, *, inverse: bool = False) -> np.ndarray:
    """Points [N, 2] (edge convention) of a ``height`` x ``width`` frame -> the same points in the
    frame turned ``clockwise`` degrees (``video_io._apply_rotation``); ``inverse``: back again."""
    x, y = points[:, 0], points[:, 1]
    if inverse:  # (x, y) are in the turned frame
        turned = {90: (y, height - x), 180: (width - x, height - y), 270: (width - y, x)}[clockwise]
    else:
        turned = {90: (height - y, x), 180: (width - x, height - y), 270: (y, width - x)}[clockwise]
    return np.stack(turned, axis=1)


class _TurnedDetector:
    """A detector looking at the frames turned ``clockwise`` degrees; boxes come back in the given
    frame's pixels (a square stays a square), rolls as measured in the turned (upright) frame."""

    def __init__(self, detector, clockwise: int):
        from .video_io import _apply_rotation  # video_io needs PyAV; tracking arrays does not

        self.inner, self.clockwise, self._turn = detector, int(clockwise), _apply_rotation
        self.name = getattr(detector, "name", type(detector).__name__)
        if hasattr(detector, "detect_near"):
            self.detect_near = self._detect_near
        if hasattr(detector, "confirm"):
            self.confirm = self._confirm
        if hasattr(detector, "upright_score"):
            self.upright_score = lambda frame_rgb: detector.upright_score(self._turn(frame_rgb, self.clockwise))

    def _map(self, boxes: np.ndarray, frame_shape, *, inverse: bool) -> np.ndarray:
        boxes = np.array(boxes, np.float32, copy=True)
        if not len(boxes):
            return boxes
        height, width = frame_shape[:2]
        centres = (boxes[:, :2] + boxes[:, 2:4]) / 2
        half = (boxes[:, 2:4] - boxes[:, :2]) / 2
        if self.clockwise in (90, 270):
            half = half[:, ::-1]
        mapped = _turn_points(centres, self.clockwise, height, width, inverse=inverse)
        boxes[:, :2], boxes[:, 2:4] = mapped - half, mapped + half
        return boxes

    def detect(self, frame_rgb):
        found = _candidates(self.inner.detect(self._turn(frame_rgb, self.clockwise)))
        return self._map(found, frame_rgb.shape, inverse=True)

    def _detect_near(self, frame_rgb, box):
        box = self._map(np.asarray(box, np.float32)[None], frame_rgb.shape, inverse=False)[0]
        found = _candidates(self.inner.detect_near(self._turn(frame_rgb, self.clockwise), box))
        return self._map(found, frame_rgb.shape, inverse=True)

    def _confirm(self, frame_rgb, box):
        box = self._map(np.asarray(box, np.float32)[None], frame_rgb.shape, inverse=False)[0]
        return self.inner.confirm(self._turn(frame_rgb, self.clockwise), box[:4])


def _is_blank(frame: np.ndarray) -> bool:
    """Black or one colour (a fade, a title card's background): no face can be found in it."""
    step = max(1, max(frame.shape[:2]) // 64)
    return float(frame[::step, ::step].std()) < _BLANK_STD


def track_face(
    frames_or_iterator,
    *,
    fps: float | None = None,
    min_coverage: float = 0.5,
    face_box=None,
    face: str = "largest",
    detect_every: int | None = None,
    detector=None,
    smoothing_hz: float = DEFAULT_SMOOTHING_HZ,
    reacquire_s: float = 1.0,
    search_rotations: bool = True,
) -> FaceTrack:
    """Track one face through a video; see the module docstring for the method.

    ``frames_or_iterator``: uint8 RGB frames [T, H, W, 3], an iterable of frames, or the
    ``(index, time_s, frame)`` tuples of ``iter_video_frames`` (streamed: frames are not kept).
    ``fps`` defaults to the spacing of those timestamps, else 25. ``face_box`` (x0, y0, x1, y1)
    skips detection and uses that box on every frame. ``face``: which face to follow when there
    are several: "largest" (default), "left" or "right" (the left/right-most of the faces at least
    half the largest one's size). ``search_rotations``: look for the face turned by 90 degree
    steps when none is upright. Raises ``UserFacingError`` when a face is found on less than
    ``min_coverage`` of the examined frames.
    """
    check_face_choice(face)
    if face_box is not None:
        n_frames, frame_size, fps = 0, None, fps
        first_times = []
        for frame, time_s in _frames_of(frames_or_iterator):
            frame_size = _check_frame(frame, frame_size).shape[:2]
            n_frames += 1
            if time_s is not None and len(first_times) < 2:
                first_times.append(time_s)
        if n_frames == 0:
            raise UserFacingError("the video has no frames; check the file or the start/end range")
        box = _validated_face_box(face_box, frame_size)
        side = max(box[2] - box[0], box[3] - box[1])
        centre = (box[:2] + box[2:]) / 2
        square = np.concatenate([centre - side / 2, centre + side / 2]).astype(np.float32)
        boxes = np.repeat(square[None], n_frames, axis=0)
        return FaceTrack(
            boxes=boxes,
            raw_boxes=boxes.copy(),
            examined=np.zeros(n_frames, bool),
            frame_size=tuple(frame_size),
            fps=_resolve_fps(fps, first_times),
            coverage=1.0,
            n_faces_seen=1,
            source="user_box",
        )

    detector = detector if detector is not None else default_face_detector()
    can_track_near = hasattr(detector, "detect_near")
    raw, examined, blank, face_counts = [], [], [], []
    first_times: list[float] = []
    frame_size = None
    followed = None  # last accepted candidate [5]
    followed_at = last_full_scan = -(10**9)
    stride = None
    # Orientation: 0 unless no face is upright and a turned one is (None while undecided).
    rotation = None if search_rotations else 0
    active = detector
    votes: dict[int, list] = {}  # turned orientation -> [(index, frame, candidates)] while undecided
    chosen_side = {"left": 0, "right": 0, "middle": 0}
    # A detector that scores how upright a face is decides the orientation by comparing all four.
    scores_orientation = rotation is None and hasattr(detector, "upright_score")
    pending: list = []  # (index, frame) scored while undecided
    totals: dict[int, float] = {}

    def decide() -> None:
        """Take the best-scoring orientation and track the frames scored so far in it."""
        nonlocal rotation, active
        rotation = max((0, *_SEARCH_ROTATIONS), key=lambda turn: totals.get(turn, 0.0))
        active = _TurnedDetector(detector, rotation) if rotation else detector
        for pending_index, pending_frame in pending:
            consider(pending_index, pending_frame, _candidates(active.detect(pending_frame)), True)
        pending.clear()

    def consider(index, frame, candidates, full_scan) -> None:
        """Pick the followed face among one examined frame's candidates."""
        nonlocal followed, followed_at
        if not len(candidates):
            if full_scan:
                face_counts.append(0)
            return
        areas = (candidates[:, 2] - candidates[:, 0]) * (candidates[:, 3] - candidates[:, 1])
        chosen = None
        if followed is not None:
            overlaps = _iou(followed, candidates)
            if overlaps.max() > 0.1:
                chosen = int(overlaps.argmax())
        if chosen is None and index - followed_at >= reacquire_s * frames_per_second:
            chosen = _acquire(active, frame, candidates, areas, face)
        if chosen is None:
            if full_scan:
                face_counts.append(0)
            return
        followed, followed_at = candidates[chosen], index
        raw[index] = candidates[chosen]
        if full_scan:
            others = _other_faces(active, frame, candidates, areas, chosen)
            face_counts.append(1 + len(others))
            if others:
                centre_x = (candidates[chosen, 0] + candidates[chosen, 2]) / 2
                other_x = [(candidates[i, 0] + candidates[i, 2]) / 2 for i in others]
                side = "left" if centre_x < min(other_x) else "right" if centre_x > max(other_x) else "middle"
                chosen_side[side] += 1

    for index, (frame, time_s) in enumerate(_frames_of(frames_or_iterator)):
        frame = _check_frame(frame, frame_size)
        frame_size = frame.shape[:2]
        if time_s is not None and len(first_times) < 2:
            first_times.append(time_s)
        if stride is None:
            # Fixed at the first frame. With fps unknown (timestamps give it only from the second
            # frame) the 25 fps stride is used.
            frames_per_second = fps or 25.0
            stride = detect_every or max(1, round(frames_per_second / DEFAULT_DETECTIONS_PER_SECOND))
        raw.append(np.full(5, np.nan, np.float32))
        examined.append(index % stride == 0)
        blank.append(False)
        if not examined[-1]:
            continue
        blank[-1] = _is_blank(frame)  # a miss here does not count against coverage
        if rotation is None and scores_orientation:
            # Score all four orientations on the first frames with a face; the best total wins.
            last_full_scan = index
            scores = {turn: (_TurnedDetector(detector, turn) if turn else detector).upright_score(frame) for turn in (0, *_SEARCH_ROTATIONS)}
            if max(scores.values()) <= 0:
                face_counts.append(0)
                continue
            pending.append((index, frame))
            for turn, score in scores.items():
                totals[turn] = totals.get(turn, 0.0) + score
            if len(pending) >= _ROTATION_VOTES:
                decide()
            continue
        if rotation is None:
            last_full_scan = index
            candidates = _candidates(detector.detect(frame))
            if len(candidates):
                rotation = 0
                face_counts.extend([0] * sum(len(turned) for turned in votes.values()))  # turned finds were false
                votes.clear()
                consider(index, frame, candidates, True)
                continue
            for turn in () if blank[-1] else _SEARCH_ROTATIONS:
                found = _candidates(_TurnedDetector(detector, turn).detect(frame))
                if len(found):
                    votes.setdefault(turn, []).append((index, frame, found))
                    break
            else:
                face_counts.append(0)
            decided = [turn for turn in _SEARCH_ROTATIONS if len(votes.get(turn, ())) >= _ROTATION_VOTES]
            if decided:
                rotation, active = decided[0], _TurnedDetector(detector, decided[0])
                for voted in votes.pop(decided[0]):
                    consider(*voted, True)
                face_counts.extend([0] * sum(len(other) for other in votes.values()))
                votes.clear()
            continue
        # Near the followed face most of the time (cheap); the whole frame every 2 s,
        # to count people and to find the face again after losing it.
        full_scan = (
            not can_track_near
            or followed_at != index - stride
            or index - last_full_scan >= _FULL_SCAN_INTERVAL_S * frames_per_second
        )
        if not full_scan:
            candidates = _candidates(active.detect_near(frame, _box_for(followed)))
            if not len(candidates):
                full_scan = True
        if full_scan:
            last_full_scan = index
            candidates = _candidates(active.detect(frame))
        consider(index, frame, candidates, full_scan)

    n_frames = len(raw)
    if n_frames == 0:
        raise UserFacingError("the video has no frames; check the file or the start/end range")
    if rotation is None and pending:
        decide()
    if rotation is None and votes:
        # The stream ended before a second vote: the orientation that found the most faces.
        rotation = max(_SEARCH_ROTATIONS, key=lambda turn: len(votes.get(turn, ())))
        active = _TurnedDetector(detector, rotation)
        for voted in votes.pop(rotation):
            consider(*voted, True)
        face_counts.extend([0] * sum(len(other) for other in votes.values()))
    rotation = rotation or 0
    fps = _resolve_fps(fps, first_times)
    candidates_track = np.stack(raw)
    raw_boxes, raw_rolls = candidates_track[:, :4].copy(), candidates_track[:, 4].copy()
    examined = np.asarray(examined)
    detected = ~np.isnan(raw_boxes[:, 0])
    blank = np.asarray(blank) & ~detected  # blank and no face found: not counted
    n_counted = int((examined & ~blank).sum())
    outliers = _outliers(raw_boxes)
    if outliers.sum() * 2 < detected.sum():  # most detections must agree, else keep them all
        raw_boxes[outliers] = np.nan
        detected = ~np.isnan(raw_boxes[:, 0])
    raw_rolls[~detected] = np.nan
    coverage = float(detected.sum()) / max(1, n_counted)
    if coverage < min_coverage or not detected.any():
        blank_note = f" ({int((examined & blank).sum())} blank frames not counted)" if (examined & blank).any() else ""
        raise UserFacingError(
            f"reference video has no face in {100 * (1 - coverage):.0f}% of frames{blank_note}; "
            "crop the video around the face, or use a clip where the face is visible and frontal"
        )
    smoothed = smooth_box_track(raw_boxes, fps, smoothing_hz=smoothing_hz, measurement_interval=stride)
    rolls = None
    if np.isfinite(raw_rolls).any():
        rolls = smooth_roll_track(raw_rolls, fps, smoothing_hz=smoothing_hz, measurement_interval=stride)

    face_counts = np.asarray(face_counts)
    with_face = face_counts[face_counts > 0]
    n_faces_seen = 1
    for count in range(2, int(with_face.max()) + 1 if len(with_face) else 1):
        seen_on = int((with_face >= count).sum())
        if seen_on / len(with_face) >= _MULTI_FACE_MIN_SHARE and seen_on >= min(2, len(with_face)):
            n_faces_seen = count
    warnings = []
    if rotation:
        warnings.append(
            f"no upright face: the face was found with the frames turned {rotation} degrees clockwise (a sideways or "
            "upside-down video without rotation metadata), so it is tracked and cropped upright, and full-frame output is turned upright"
        )
    if n_faces_seen > 1:
        share = (with_face >= 2).mean()
        where = max(chosen_side, key=chosen_side.get)
        which = {"largest": "the largest one", "left": "the left-most one", "right": "the right-most one"}[face]
        position = {"left": "on the left", "right": "on the right", "middle": "in the middle"}[where]
        warnings.append(
            f"{n_faces_seen} faces seen in {100 * share:.0f}% of the examined frames; following {which} ({position}). "
            "To use another person, choose the face to follow (left or right), or crop the video around their face."
        )
    if (examined & blank).any():
        warnings.append(
            f"{int((examined & blank).sum())} of {int(examined.sum())} examined frames are blank (black or one colour) and do not "
            "count against face coverage; they keep the nearest face box"
        )
    if coverage < 0.9:
        warnings.append(f"face found in only {100 * coverage:.0f}% of the examined frames; the gaps are interpolated")
    return FaceTrack(
        boxes=smoothed,
        raw_boxes=raw_boxes,
        examined=examined,
        frame_size=tuple(frame_size),
        fps=fps,
        coverage=coverage,
        n_faces_seen=n_faces_seen,
        warnings=warnings,
        source=getattr(detector, "name", type(detector).__name__),
        rotation=int(rotation),
        rolls=rolls,
        raw_rolls=raw_rolls if rolls is not None else None,
    )


def _acquire(detector, frame, candidates, areas, face: str = "largest") -> int | None:
    """The face to start following: the largest candidate (or the left/right-most of those at
    least ``_SIGNIFICANT_FACE_FRACTION`` of the largest one's side) that a second cascade
    confirms (when the detector can confirm): starting to follow a false positive would cost the
    whole track, so we ask twice here."""
    order = np.argsort(-areas, kind="stable")
    if face != "largest":
        significant = [int(i) for i in order if areas[i] >= _SIGNIFICANT_FACE_FRACTION**2 * areas[order[0]]]
        centre_x = (candidates[significant, 0] + candidates[significant, 2]) / 2
        ranked = np.argsort(centre_x if face == "left" else -centre_x, kind="stable")
        order = [significant[i] for i in ranked] + [int(i) for i in order if int(i) not in significant]
    for index in order:
        if not hasattr(detector, "confirm") or detector.confirm(frame, _box_for(candidates[index])):
            return int(index)
    return None


def _other_faces(detector, frame, candidates, areas, chosen) -> list[int]:
    """Faces besides the chosen one that look like another person: not overlapping it, at least
    half its size, and confirmed by a second cascade when the detector offers one."""
    others = []
    for index in range(len(candidates)):
        if index == chosen or areas[index] < _SIGNIFICANT_FACE_FRACTION**2 * areas[chosen]:
            continue
        if _iou(candidates[chosen], candidates[index : index + 1])[0] > 0:
            continue
        if hasattr(detector, "confirm") and not detector.confirm(frame, _box_for(candidates[index])):
            continue
        others.append(index)
    return others


def _resolve_fps(fps, first_times: list[float]) -> float:
    if fps is not None:
        fps = float(fps)
        if not math.isfinite(fps) or fps <= 0:
            raise UserFacingError(f"fps must be a positive number, got {fps}")
        return fps
    if len(first_times) == 2 and first_times[1] > first_times[0]:
        return 1.0 / (first_times[1] - first_times[0])
    return 25.0


def _outliers(raw_boxes: np.ndarray, neighbours: int = 2) -> np.ndarray:
    """Detections that disagree with the median of the ``neighbours`` detections on each side
    (leave-one-out, so a single wrong box cannot drag its own reference along as a smoother would)."""
    indices = np.flatnonzero(~np.isnan(raw_boxes[:, 0]))
    boxes = raw_boxes[indices].astype(np.float64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    flagged = np.zeros(len(raw_boxes), bool)
    if len(indices) < 3:
        return flagged
    for position, frame_index in enumerate(indices):
        others = [p for p in range(position - neighbours, position + neighbours + 1) if p != position and 0 <= p < len(indices)]
        reference_centre = np.median(centres[others], axis=0)
        reference_size = float(np.median(sizes[others]))
        centre_error = float(np.hypot(*(centres[position] - reference_centre))) / reference_size
        size_error = abs(math.log(sizes[position] / reference_size))
        flagged[frame_index] = centre_error > _OUTLIER_CENTRE or size_error > _OUTLIER_LOG_SIZE
    return flagged
