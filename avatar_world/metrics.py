"""Metrics that read ONLY rendered frames (plus the driving audio), so they score any model.

Measurement (``measure_frames``) finds the face by colour segmentation and the renderer's layout:

1. the clip's skin colour is the dominant colour of the frame centre (mode of a coarse colour
   histogram, refined by the mean of the pixels near it);
2. per frame, pixels within a colour distance of it form a mask; the connected component that
   covers most of the frame centre is the face (its outline, holes filled, is the face region);
   ``a`` = half its width, its lowest row the chin;
3. zones are fixed fractions of ``a`` measured up from the chin (Avatar World faces have height /
   width 1.18–1.32, so this is stable): the mouth window [chin - 0.95a, chin - 0.2a] x
   [centre ± 0.6a], the eye band [chin - 1.65a, chin - 1.1a], the zone above the face (hair or
   hat), the ear-lobe zones (earrings), the bridge between the eyes (glasses).

Per frame this yields: face centre, mouth opening (non-skin height at the central columns of the
mouth window / a: lips, teeth and the dark interior replace skin as the mouth opens),
eye whites (bright neutral pixels in the eye band: they vanish during blinks), colours of skin /
top of head / iris, and accessory scores. Metrics then compare these measurements against the
audio-derived truth (lip sync) or against the same measurements of the reference clip (identity,
habits, background). Every metric here is validated in tests/test_world_metrics.py: near-perfect
on ground-truth renders, clearly worse under controlled corruptions.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import UserFacingError
from .speech import audio_mouth_track

SYNC_MAX_OFFSET = 10          # frames searched either side for the best audio/video offset
# A colour the generated clip does not show at all (no face found) scores as this ΔE: far worse
# than any real mismatch (another person is 10–100), so a broken output can never look good.
UNMEASURED_DELTA_E = 150.0
_BORDER_COLUMNS = 0.1         # left/right strips (fraction of width) treated as pure background
_BORDER_ROWS = 0.75           # ... down to this fraction of the height (below: shirt)


@dataclass
class ClipMeasurements:
    fps: float
    size: tuple                   # (height, width)
    skin_colour: np.ndarray       # [3] clip-level estimate, RGB float
    face_found: np.ndarray        # [T] bool
    centre_x: np.ndarray          # [T] face centre, pixels
    centre_y: np.ndarray
    half_width: np.ndarray        # [T] a, pixels
    mouth_area: np.ndarray        # [T] non-skin height at the mouth's centre columns / a
    eye_white: np.ndarray         # [T] eye-white area in the eye band / a^2
    skin_rgb: np.ndarray          # [T, 3]
    top_rgb: np.ndarray           # [T, 3] colour above the face (hair or hat)
    eye_rgb: np.ndarray           # [T, 3] iris colour (NaN when no iris visible)
    glasses_score: np.ndarray     # [T] non-skin fraction of the bridge between the eyes
    earring_score: np.ndarray     # [T] earring-coloured area beside the jaw / a^2
    border: np.ndarray            # [T, N, 3] uint8 background strips (every 2nd pixel)

    @property
    def n_frames(self) -> int:
        return len(self.face_found)

    @property
    def seconds(self) -> float:
        return self.n_frames / self.fps


def _mode_colour(pixels: np.ndarray) -> np.ndarray:
    """Dominant colour of [N, 3] uint8 pixels: mode of a 16-level histogram, then the mean of
    pixels close to it (robust to texture, freckles and features inside the sample)."""
    pixels = pixels.reshape(-1, 3)
    if len(pixels) == 0:
        return np.full(3, np.nan)
    codes = (pixels[:, 0] // 16).astype(np.int32) * 256 + (pixels[:, 1] // 16) * 16 + pixels[:, 2] // 16
    mode = np.bincount(codes, minlength=4096).argmax()
    centre = pixels[codes == mode].astype(np.float64).mean(axis=0)
    near = np.linalg.norm(pixels.astype(np.float64) - centre, axis=1) < 30
    return pixels[near].astype(np.float64).mean(axis=0)


def estimate_skin_colour(frames) -> np.ndarray:
    """Dominant colour of the frame centre over up to 8 frames spread through the clip."""
    frames = np.asarray(frames)
    h, w = frames.shape[1:3]
    picks = frames[np.linspace(0, len(frames) - 1, min(8, len(frames))).astype(int)]
    centre = picks[:, int(0.45 * h):int(0.65 * h), int(0.4 * w):int(0.6 * w)]
    return _mode_colour(centre)


def _distance_to_segment(pixels: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of each RGB pixel [..., 3] to the colour segment start-end."""
    direction = end - start
    offset = pixels.astype(np.float64) - start
    along = np.clip((offset @ direction) / float(direction @ direction), 0, 1)
    return np.linalg.norm(offset - along[..., None] * direction, axis=-1)


def _skin_threshold(skin: np.ndarray) -> float:
    return max(22.0, 0.15 * float(np.linalg.norm(skin)))


def _lab(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, np.float32).reshape(-1, 1, 3) / 255.0
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3)


def delta_e(rgb_a, rgb_b) -> float:
    """CIE76 colour difference of two RGB colours (0–255); NaN if either is unknown."""
    if not (np.isfinite(rgb_a).all() and np.isfinite(rgb_b).all()):
        return float("nan")
    return float(np.linalg.norm(_lab(rgb_a) - _lab(rgb_b)))


def _border_pixels(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    columns = max(1, int(_BORDER_COLUMNS * w))
    rows = int(_BORDER_ROWS * h)
    return np.concatenate([frame[:rows:2, :columns:2], frame[:rows:2, w - columns::2]], axis=1).reshape(-1, 3)


def _measure_one(frame: np.ndarray, skin: np.ndarray, threshold: float, kernel: np.ndarray) -> dict:
    h, w = frame.shape[:2]
    pixels = frame.astype(np.int32)
    distance = np.sqrt(((pixels - skin.astype(np.int32)) ** 2).sum(axis=2))
    skin_mask = (distance < threshold).astype(np.uint8)
    closed = cv2.morphologyEx(skin_mask, cv2.MORPH_CLOSE, kernel)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(closed, connectivity=8)
    centre_labels = labels[int(0.45 * h):int(0.65 * h), int(0.4 * w):int(0.6 * w)]
    votes = np.bincount(centre_labels.ravel(), minlength=count)
    votes[0] = 0
    if count < 2 or votes.max() < 0.1 * centre_labels.size:
        return {}
    label = int(votes.argmax())
    x0, y0, box_w, box_h, _ = stats[label]
    contours, _ = cv2.findContours((labels == label).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    region = np.zeros((h, w), np.uint8)
    cv2.drawContours(region, contours, -1, 1, thickness=-1)
    region = region.astype(bool)
    a = box_w / 2.0
    cx = x0 + a
    chin = y0 + box_h
    not_skin = ~skin_mask.astype(bool)

    def window(top, bottom, left, right):
        return (slice(max(0, int(round(top))), max(0, int(round(bottom)))),
                slice(max(0, int(round(left))), max(0, int(round(right)))))

    # Mouth opening: mean non-skin height of the central columns of the mouth window (the
    # height, unlike the area, does not change with the spectral mouth width or a smile).
    mouth = window(chin - 0.95 * a, chin - 0.2 * a, cx - 0.2 * a, cx + 0.2 * a)
    mouth_area = float((not_skin[mouth] & region[mouth]).sum(axis=0).mean()) / a if not_skin[mouth].size else np.nan
    band = window(chin - 1.65 * a, chin - 1.1 * a, cx - 0.85 * a, cx + 0.85 * a)
    band_pixels = pixels[band]
    brightness = band_pixels.mean(axis=2)
    spread = band_pixels.max(axis=2) - band_pixels.min(axis=2)
    sclera = (brightness > 185) & (spread < 45) & region[band]
    eye_white = float(sclera.sum()) / a ** 2
    eye_rgb = np.full(3, np.nan)
    if sclera.sum() >= 2:
        near_sclera = cv2.dilate(sclera.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=max(1, int(round(a / 14)))).astype(bool)
        iris = near_sclera & ~sclera & not_skin[band] & (brightness > 35) & region[band]
        # Anti-aliased edges mix sclera with skin: drop pixels near the skin-white segment, and
        # prefer coloured pixels to the grey white-pupil mixes (a grey iris falls back to all).
        off_blend = _distance_to_segment(band_pixels, skin, np.array([245.0, 245.0, 240.0])) > 20
        coloured = iris & off_blend & (spread > 12)
        chosen = coloured if coloured.sum() >= 2 else iris & off_blend
        if chosen.sum() >= 2:
            eye_rgb = _mode_colour(band_pixels[chosen])
        rows = np.nonzero(sclera.any(axis=1))[0]
        eye_row = band[0].start + int(np.median(rows))
    else:
        eye_row = int(chin - 1.37 * a)
    bridge = window(eye_row - 0.3 * a, eye_row + 0.1 * a, cx - 0.1 * a, cx + 0.1 * a)
    glasses_score = float(not_skin[bridge].mean()) if not_skin[bridge].size else 0.0
    top = window(y0 - 0.3 * a, y0 - 0.05 * a, cx - 0.4 * a, cx + 0.4 * a)
    top_rgb = _mode_colour(frame[top]) if frame[top].size else np.full(3, np.nan)
    earring_area = 0.0
    for side in (-1, 1):
        lobe = window(chin - 1.25 * a, chin - 0.75 * a, cx + side * a - 0.2 * a, cx + side * a + 0.2 * a)
        lobe_pixels = pixels[lobe].reshape(-1, 3)
        if lobe_pixels.size:
            gold = np.linalg.norm(lobe_pixels - np.array([222, 184, 60]), axis=1) < 45
            silver = np.linalg.norm(lobe_pixels - np.array([205, 205, 215]), axis=1) < 30
            earring_area += float((gold | silver).sum()) / a ** 2
    skin_pixels = frame[skin_mask.astype(bool) & region]
    return {"centre_x": float(centroids[label][0]), "centre_y": float(centroids[label][1]), "half_width": a,
            "mouth_area": mouth_area, "eye_white": eye_white, "skin_rgb": skin_pixels.reshape(-1, 3).mean(axis=0),
            "top_rgb": top_rgb, "eye_rgb": eye_rgb, "glasses_score": glasses_score, "earring_score": earring_area}


def measure_frames(frames, fps: float, *, skin_colour=None) -> ClipMeasurements:
    """Measure every frame of a clip (uint8 [T, H, W, 3] or a list of frames)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise UserFacingError(f"expected uint8 RGB frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    skin = estimate_skin_colour(frames) if skin_colour is None else np.asarray(skin_colour, np.float64)
    threshold = _skin_threshold(skin)
    side = max(3, int(round(frames.shape[2] / 64)) * 2 + 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    rows = [_measure_one(frame, skin, threshold, kernel) for frame in frames]
    found = np.array([bool(row) for row in rows])

    def column(name, width=None):
        blank = np.full(3, np.nan) if width else np.nan
        return np.array([row.get(name, blank) for row in rows], np.float64)

    return ClipMeasurements(
        fps=float(fps), size=frames.shape[1:3], skin_colour=skin, face_found=found,
        centre_x=column("centre_x"), centre_y=column("centre_y"), half_width=column("half_width"),
        mouth_area=column("mouth_area"), eye_white=column("eye_white"), skin_rgb=column("skin_rgb", 3),
        top_rgb=column("top_rgb", 3), eye_rgb=column("eye_rgb", 3), glasses_score=column("glasses_score"),
        earring_score=column("earring_score"), border=np.stack([_border_pixels(frame) for frame in frames]))


# -- lip sync ----------------------------------------------------------------------------------
def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    valid = np.isfinite(x) & np.isfinite(y)
    x, y = x[valid], y[valid]
    if len(x) < 3 or x.std() < 1e-9 or y.std() < 1e-9:
        return 0.0  # a frozen mouth (or silent audio) carries no sync
    return float(np.corrcoef(x, y)[0, 1])


def lip_sync(measured: ClipMeasurements, truth_openness: np.ndarray, max_offset: int = SYNC_MAX_OFFSET) -> dict:
    """Correlation of the measured mouth opening with the audio-derived openness.

    ``offset`` k compares video frame t + k with audio frame t, so a video that lags the audio by
    5 frames has its best correlation at k = +5. ``sync_correlation`` is at k = 0 (what a viewer
    sees), ``sync_best_offset`` where the correlation peaks.
    """
    video = measured.mouth_area
    truth = np.asarray(truth_openness, np.float64)[: len(video)]
    offsets = np.arange(-max_offset, max_offset + 1)
    curve = []
    for k in offsets:
        if k >= 0:
            curve.append(_correlation(video[k:len(truth)], truth[:len(truth) - k]))
        else:
            curve.append(_correlation(video[:len(truth) + k], truth[-k:]))
    curve = np.array(curve)
    best = int(np.argmax(curve))
    return {"sync_correlation": float(curve[max_offset]), "sync_best_offset": int(offsets[best]),
            "sync_best_correlation": float(curve[best]), "offsets": offsets, "curve": curve}


def truth_openness_from_audio(wave_16k: np.ndarray, fps: float, n_frames: int) -> np.ndarray:
    return audio_mouth_track(wave_16k, fps, n_frames).openness


# -- static identity ---------------------------------------------------------------------------
def _clip_colour(values: np.ndarray) -> np.ndarray:
    values = values[np.isfinite(values).all(axis=1)]
    return np.median(values, axis=0) if len(values) else np.full(3, np.nan)


def static_appearance(measured: ClipMeasurements) -> dict:
    """Clip-level static traits as read from frames."""
    found = measured.face_found
    return {"skin_rgb": _clip_colour(measured.skin_rgb), "top_rgb": _clip_colour(measured.top_rgb),
            "eye_rgb": _clip_colour(measured.eye_rgb),
            "glasses": bool(found.any() and np.median(measured.glasses_score[found]) > 0.12),
            "earrings": bool(found.any() and np.median(measured.earring_score[found]) > 0.006)}


def _generated_delta_e(generated_rgb: np.ndarray, reference_rgb: np.ndarray) -> float:
    """ΔE, with UNMEASURED_DELTA_E when the generated clip lacks the colour (NaN stays NaN only
    when the reference itself lacks it: then the case says nothing about the model)."""
    if not np.isfinite(reference_rgb).all():
        return float("nan")
    if not np.isfinite(generated_rgb).all():
        return UNMEASURED_DELTA_E
    return delta_e(generated_rgb, reference_rgb)


def static_identity_error(generated: ClipMeasurements, reference: ClipMeasurements) -> dict:
    gen, ref = static_appearance(generated), static_appearance(reference)
    return {"identity_skin_delta_e": _generated_delta_e(gen["skin_rgb"], ref["skin_rgb"]),
            "identity_hair_delta_e": _generated_delta_e(gen["top_rgb"], ref["top_rgb"]),
            "identity_eye_delta_e": _generated_delta_e(gen["eye_rgb"], ref["eye_rgb"]),
            "identity_accessory_mismatch": float(np.mean([gen[k] != ref[k] for k in ("glasses", "earrings")]))}


# -- dynamic habits ----------------------------------------------------------------------------
def _fill_gaps(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float64).copy()
    valid = np.isfinite(values)
    if not valid.any():
        return np.zeros_like(values)
    values[~valid] = np.interp(np.nonzero(~valid)[0], np.nonzero(valid)[0], values[valid])
    return values


def habits(measured: ClipMeasurements) -> dict:
    """Blink rate (per minute), sway frequency (Hz) and amplitude (std of the face centre / a)."""
    white = _fill_gaps(measured.eye_white)
    closed = white < 0.45 * np.median(white) if np.median(white) > 0 else np.zeros(len(white), bool)
    onsets = np.nonzero(closed[1:] & ~closed[:-1])[0] + 1
    if len(onsets) >= 3:
        blink_rate = 60.0 * measured.fps / float(np.median(np.diff(onsets)))
    else:
        blink_rate = 60.0 * len(onsets) / measured.seconds
    a = float(np.nanmedian(measured.half_width)) if np.isfinite(measured.half_width).any() else 1.0
    x = _fill_gaps(measured.centre_x) / a
    x = x - x.mean()
    amplitude = float(x.std())
    if amplitude < 0.005:
        frequency = 0.0  # no measurable sway
    else:
        padded = 8 * len(x)
        spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=padded))
        freqs = np.fft.rfftfreq(padded, 1 / measured.fps)
        usable = (freqs >= 0.1) & (freqs <= 2.0)
        frequency = float(freqs[usable][np.argmax(spectrum[usable])])
    return {"blink_rate_per_min": blink_rate, "sway_frequency_hz": frequency, "sway_amplitude": amplitude}


def _relative_error(value: float, reference: float, floor: float) -> float:
    return float(abs(value - reference) / max(abs(reference), floor))


def habit_error(generated: ClipMeasurements, reference: ClipMeasurements) -> dict:
    gen, ref = habits(generated), habits(reference)
    return {"habit_blink_rate_error": _relative_error(gen["blink_rate_per_min"], ref["blink_rate_per_min"], 6.0),
            "habit_sway_frequency_error": _relative_error(gen["sway_frequency_hz"], ref["sway_frequency_hz"], 0.1),
            "habit_sway_amplitude_error": _relative_error(gen["sway_amplitude"], ref["sway_amplitude"], 0.01)}


# -- background, drift, flicker ----------------------------------------------------------------
def background_error(generated: ClipMeasurements, reference: ClipMeasurements) -> float:
    """Mean absolute difference (0–1) of the time-median background strips."""
    if generated.border.shape[1:] != reference.border.shape[1:]:
        raise UserFacingError("generated and reference frames differ in size; render the model output at the reference's size")
    gen = np.median(generated.border, axis=0)
    ref = np.median(reference.border, axis=0)
    return float(np.abs(gen - ref).mean() / 255.0)


def drift(measured: ClipMeasurements, window_s: float = 10.0) -> float:
    """Colour drift: ΔE of skin and head-top colour between the last and the first window
    (10 s, or a third of a shorter clip)."""
    window = max(1, int(round(min(window_s, measured.seconds / 3) * measured.fps)))
    errors = []
    for track in (measured.skin_rgb, measured.top_rgb):
        first, last = _clip_colour(track[:window]), _clip_colour(track[-window:])
        # A face that is there at the start and gone at the end is the worst drift.
        errors.append(delta_e(first, last) if np.isfinite(first).all() and np.isfinite(last).all() else UNMEASURED_DELTA_E)
    return float(np.mean(errors))


def flicker(measured: ClipMeasurements) -> float:
    """Mean absolute second temporal difference (0–1) of the background strips: zero for a still
    background, high for frame-to-frame shimmer (a smooth camera pan scores low)."""
    border = measured.border.astype(np.float32)
    if len(border) < 3:
        return 0.0
    return float(np.abs(border[2:] - 2 * border[1:-1] + border[:-2]).mean() / 255.0)


def score_clip(generated_frames, reference: ClipMeasurements, driving_audio: np.ndarray, fps: float) -> tuple[dict, dict]:
    """All metrics for one generated clip. Returns (scalar metrics, details for plots)."""
    generated = measure_frames(generated_frames, fps)
    truth = truth_openness_from_audio(driving_audio, fps, generated.n_frames)
    sync = lip_sync(generated, truth)
    metrics = {key: sync[key] for key in ("sync_correlation", "sync_best_offset", "sync_best_correlation")}
    metrics["sync_abs_offset_frames"] = float(abs(sync["sync_best_offset"]))
    metrics.update(static_identity_error(generated, reference))
    metrics.update(habit_error(generated, reference))
    metrics["background_error"] = background_error(generated, reference)
    metrics["drift_delta_e"] = drift(generated)
    metrics["flicker"] = flicker(generated)
    metrics["face_found_fraction"] = float(generated.face_found.mean())
    details = {"sync_offsets": sync["offsets"], "sync_curve": sync["curve"], "measured_mouth": generated.mouth_area,
               "truth_openness": truth}
    return metrics, details
