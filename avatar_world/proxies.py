"""Proxies for REAL clips (no ground truth, no downloaded weights): lip sync and identity.

Both run on face crops from ``media.track_face`` + ``media.crop_faces`` (crop = the tracked face
box, ``scale=1.0``, resized to ``CROP_SIZE``).

**Mouth-motion vs audio-envelope sync** (``real_sync_proxy``). Video side: motion energy of the
mouth window (rows 0.68–0.95, columns 0.3–0.7 of the Haar face box): the mean absolute frame-to-
frame change of brightness there, relative to the central face's median brightness. Audio side:
the Avatar World loudness envelope of the clip's own audio (``speech.audio_mouth_track``
openness), smoothed with a 2-frame Gaussian (mouth motion spreads over neighbouring frames).
Reported: Pearson correlation at offset 0 and the best offset within ±10 frames.
Measured on the nine licensed real clips (first 8 s each): 0.26 on average with their own audio
(every clip positive, lowest 0.12), 0.09 on average with another clip's audio (highest 0.31). So
it separates in-sync from out-of-sync speech only on average over several clips, never for one
clip. We tried mouth darkness (dark-interior share, several thresholds), mean brightness and
darkest-row height first: all were weaker on real faces (mean 0.03–0.15 with own audio).
Known limits: head motion, talking hands, compression noise and lighting flicker add motion
energy that is not speech; closed-mouth speech (m, b, p) and silent mouth movements disagree by
design; the window follows the smoothed face box only. It is a sanity proxy, not SyncNet.

**Identity proxy** (``identity_embedding`` / ``identity_distance``). Per crop: a HOG descriptor
(OpenCV, 64×64 grey: face geometry and edges), a uniform-LBP histogram over a 4×4 grid (skin and
feature texture) and a hue/saturation histogram of the central face (skin colour); each block
L2-normalised, averaged over frames. Distance = 1 - cosine similarity of the averaged embeddings.
Known limits: it is a hand-made descriptor, not a learned face-recognition embedding; pose,
expression, lighting, white balance, glasses and hair change it; it separates clearly different
people under similar framing and tells little about near look-alikes. Use it for "did the output
keep the person" in relative comparisons (same clip halves vs other people), never as a biometric.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from ..errors import UserFacingError
from .metrics import lip_sync
from .speech import audio_mouth_track

CROP_SIZE = 96
_HOG = None


def face_crops(frames: np.ndarray, fps: float) -> np.ndarray:
    """Face-box crops (uint8 [T, CROP_SIZE, CROP_SIZE, 3]) of a real clip's frames."""
    from .. import media  # PyAV: the rest of Avatar World renders shards on GPU boxes without it

    track = media.track_face(frames, fps=fps)
    crops, _ = media.crop_faces(frames, track, size=CROP_SIZE, scale=1.0)
    return crops


def _luminance(crops: np.ndarray) -> np.ndarray:
    return crops.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def mouth_motion(crops: np.ndarray) -> np.ndarray:
    """Per frame: motion energy of the mouth window (see module docstring); frame 0 copies frame 1."""
    luminance = _luminance(crops)
    size = crops.shape[1]
    centre = luminance[:, int(0.3 * size):int(0.7 * size), int(0.25 * size):int(0.75 * size)]
    brightness = np.median(centre.reshape(len(crops), -1), axis=1) + 1.0
    mouth = luminance[:, int(0.68 * size):int(0.95 * size), int(0.3 * size):int(0.7 * size)] / brightness[:, None, None]
    if len(crops) < 2:
        return np.zeros(len(crops), np.float64)
    change = np.abs(np.diff(mouth, axis=0)).mean(axis=(1, 2))
    return np.concatenate([change[:1], change]).astype(np.float64)


@dataclass
class _MouthSignal:
    mouth_area: np.ndarray  # the field metrics.lip_sync reads


def real_sync_proxy(crops: np.ndarray, audio_16k: np.ndarray, fps: float) -> dict:
    """Lip-sync proxy of a real clip: {"sync_correlation", "sync_best_offset", ...}."""
    if audio_16k is None or len(audio_16k) == 0:
        raise UserFacingError("the clip has no audio; the sync proxy needs the speech that goes with the video")
    envelope = gaussian_filter1d(audio_mouth_track(audio_16k, fps, len(crops)).openness.astype(np.float64), 2.0)
    return lip_sync(_MouthSignal(mouth_motion(crops)), envelope)


def _lbp_histograms(grey: np.ndarray, grid: int = 4) -> np.ndarray:
    """Uniform 8-neighbour LBP codes -> a 10-bin histogram per grid cell."""
    centre = grey[1:-1, 1:-1]
    shifts = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    bits = [(grey[1 + dy:grey.shape[0] - 1 + dy, 1 + dx:grey.shape[1] - 1 + dx] >= centre) for dy, dx in shifts]
    stacked = np.stack(bits, axis=0).astype(np.int32)
    transitions = np.abs(np.diff(np.concatenate([stacked, stacked[:1]], axis=0), axis=0)).sum(axis=0)
    ones = stacked.sum(axis=0)
    codes = np.where(transitions <= 2, ones, 9)  # uniform patterns by their count of ones, else 9
    cells = []
    step = codes.shape[0] // grid
    for row in range(grid):
        for column in range(grid):
            cell = codes[row * step:(row + 1) * step, column * step:(column + 1) * step]
            cells.append(np.bincount(cell.ravel(), minlength=10).astype(np.float32))
    return np.concatenate(cells)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / (np.linalg.norm(vector) + 1e-9)


def identity_embedding(crops: np.ndarray, max_frames: int = 32) -> np.ndarray:
    """Averaged HOG + LBP + colour embedding of face crops (see module docstring)."""
    global _HOG
    if len(crops) == 0:
        raise UserFacingError("no face crops to embed; check that the clip shows a face")
    if _HOG is None:
        _HOG = cv2.HOGDescriptor((64, 64), (16, 16), (8, 8), (8, 8), 9)
    picks = crops[np.linspace(0, len(crops) - 1, min(max_frames, len(crops))).astype(int)]
    vectors = []
    for crop in picks:
        grey = cv2.cvtColor(cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
        hog = _HOG.compute(grey).ravel()
        lbp = _lbp_histograms(grey.astype(np.int16))
        size = crop.shape[0]
        centre = crop[int(0.25 * size):int(0.75 * size), int(0.25 * size):int(0.75 * size)]
        hsv = cv2.cvtColor(np.ascontiguousarray(centre), cv2.COLOR_RGB2HSV)
        colour = cv2.calcHist([hsv], [0, 1], None, [12, 8], [0, 180, 0, 256]).ravel()
        vectors.append(np.concatenate([_unit(hog), _unit(lbp), _unit(np.sqrt(colour))]))
    return np.mean(vectors, axis=0).astype(np.float32)


def identity_distance(embedding_a: np.ndarray, embedding_b: np.ndarray) -> float:
    """1 - cosine similarity (0 = same descriptor)."""
    return float(1.0 - np.dot(_unit(embedding_a), _unit(embedding_b)))
