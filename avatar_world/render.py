"""Avatar World renderer: a person's traits + per-frame face state -> RGB frames.

Speed comes from doing the static work once per clip (``HeadRenderer.__init__``: background,
textured face, hair, neck, earrings, fringe and hat) and only drawing the moving parts per frame
(eyes with lids, brows, nose, mouth with teeth, glasses) into a head canvas, which one affine warp
(roll + sway + nod drop) places over the background.

Head coordinates: origin at the face centre, x right, y down, in pixels; ``a`` is the face
half-width, ``b = face_aspect * a`` the half-height. Yaw and pitch are drawn as a shift of the
facial features inside the fixed face outline (a 2.5-D look that is cheap and measurable).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from .speech import MouthTrack, stressed_frames
from .traits import DynamicTraits, SceneTraits, StaticTraits, derive_seed

_SHIFT = 4                      # cv2 sub-pixel bits: coordinates are multiplied by 16
_SCALE = 1 << _SHIFT
FACE_CENTRE = (0.5, 0.54)       # face centre as fractions of the frame side, before motion


@dataclass
class FaceState:
    """Per-frame state of the moving parts; every field is a float32 array of length T."""
    openness: np.ndarray     # mouth, 0 closed … mouth_gain (the person's widest opening)
    width: np.ndarray        # mouth, 0 narrow … 1 wide
    rounding: np.ndarray     # mouth, 0 spread … 1 rounded
    blink: np.ndarray        # eyelid closure, 0 open … 1 closed
    brow_raise: np.ndarray   # 0 … 1
    smile: np.ndarray        # 0 … 1
    yaw_deg: np.ndarray
    pitch_deg: np.ndarray    # positive = nod down
    roll_deg: np.ndarray
    shift_x: np.ndarray      # head translation / a
    shift_y: np.ndarray

    def __len__(self) -> int:
        return len(self.openness)

    def frame(self, index: int) -> dict:
        return {f.name: float(getattr(self, f.name)[index]) for f in fields(self)}

    def as_arrays(self) -> dict:
        return {f.name: np.asarray(getattr(self, f.name), np.float32) for f in fields(self)}

    @classmethod
    def neutral(cls, n_frames: int = 1) -> "FaceState":
        """Eyes open, mouth closed, head straight, no expression: the pose for appearance checks."""
        zeros = np.zeros(n_frames, np.float32)
        values = {f.name: zeros.copy() for f in fields(cls)}
        values["width"] = np.full(n_frames, 0.5, np.float32)
        return cls(**values)

    def frozen(self, what: str) -> "FaceState":
        """A copy with the mouth (``"mouth"``) or the head (``"head"``) held at frame 0's value."""
        arrays = self.as_arrays()
        names = {"mouth": ("openness", "width", "rounding"),
                 "head": ("yaw_deg", "pitch_deg", "roll_deg", "shift_x", "shift_y")}[what]
        for name in names:
            arrays[name] = np.full_like(arrays[name], arrays[name][0])
        return FaceState(**arrays)


def _bump(n_frames: int, fps: float, centres: np.ndarray, width_s: float) -> np.ndarray:
    """Sum of raised-cosine bumps (peak 1) of total width ``width_s`` at frame ``centres``."""
    t = np.arange(n_frames) / fps
    out = np.zeros(n_frames, np.float64)
    for centre in centres:
        phase = (t - centre / fps) / width_s
        inside = np.abs(phase) < 0.5
        out[inside] += 0.5 * (1 + np.cos(2 * np.pi * phase[inside]))
    return np.clip(out, 0, 1)


def motion_track(dynamic: DynamicTraits, mouth: MouthTrack, fps: float, clip_seed: int) -> FaceState:
    """Per-frame state from a person's habits and the audio; depends on NO static trait.

    ``clip_seed`` varies the random events (blink times, which stresses get nods, phases) between
    clips of the same person while the habit statistics stay the person's own.
    """
    n = len(mouth.openness)
    rng = np.random.default_rng(derive_seed(clip_seed, "motion"))
    t = np.arange(n) / fps
    # Mouth: zero-phase smoothing so the habit never shifts lip sync in time.
    sigma_frames = (0.012 + 0.05 * (1 - dynamic.mouth_speed)) * fps
    # No clipping after the gain: a wide-mouthed speaker opens further, the timing is untouched.
    openness = dynamic.mouth_gain * gaussian_filter1d(mouth.openness.astype(np.float64), sigma_frames)
    width = gaussian_filter1d(mouth.width.astype(np.float64), sigma_frames)
    rounding = gaussian_filter1d(mouth.rounding.astype(np.float64), sigma_frames)
    # Blinks: at the person's rate with intervals jittered ±25 % (regular enough that a 20 s clip
    # shows the habit, irregular enough to look alive); each closes the lid fully for ~90 ms
    # within a ~240 ms movement.
    blink = np.zeros(n)
    interval_s = 60.0 / dynamic.blink_rate_per_min
    time_s = rng.uniform(0.2, 1.0) * interval_s
    while time_s < n / fps:
        blink = np.maximum(blink, np.clip(1.6 * (1 - np.abs(t - time_s) / 0.12), 0, 1))
        time_s += interval_s * rng.uniform(0.75, 1.25)
    # Head sway: the person's own frequency dominates; a weaker faster component keeps it alive.
    f = dynamic.sway_frequency_hz
    phase = rng.uniform(0, 2 * np.pi, 4)
    shift_x = dynamic.sway_amplitude * (np.sin(2 * np.pi * f * t + phase[0]) + 0.25 * np.sin(2 * np.pi * 2.3 * f * t + phase[1]))
    yaw = dynamic.yaw_amplitude_deg * np.sin(2 * np.pi * f * t + phase[0] + 0.4)
    roll = dynamic.roll_amplitude_deg * np.sin(2 * np.pi * 0.6 * f * t + phase[2])
    stresses = stressed_frames(mouth, fps)
    nods = stresses[rng.random(len(stresses)) < dynamic.nod_probability]
    brows = stresses[rng.random(len(stresses)) < dynamic.brow_raise_probability]
    pitch = dynamic.nod_amplitude_deg * _bump(n, fps, nods + 0.05 * fps, 0.35)
    shift_y = 0.3 * dynamic.sway_amplitude * np.sin(2 * np.pi * 0.8 * f * t + phase[3]) + 0.01 * pitch
    brow_raise = _bump(n, fps, brows, 0.5)
    smile_wander = gaussian_filter1d(rng.normal(0, 1, n), 1.5 * fps) * np.sqrt(1.5 * fps) * 0.08
    smile = np.clip(dynamic.smile_baseline + smile_wander, 0, 1)
    as32 = lambda values: np.asarray(values, np.float32)  # noqa: E731
    return FaceState(as32(openness), as32(width), as32(rounding), as32(blink), as32(brow_raise), as32(smile),
                     as32(yaw), as32(pitch), as32(roll), as32(shift_x), as32(shift_y))


def _pts(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points) * _SCALE).astype(np.int32).reshape(-1, 1, 2)


def _ellipse_points(cx, cy, rx, ry, n=28, start=0.0, stop=2 * np.pi) -> np.ndarray:
    angle = np.linspace(start, stop, n, endpoint=False if stop - start >= 2 * np.pi else True)
    return np.stack([cx + rx * np.cos(angle), cy + ry * np.sin(angle)], axis=1)


def _rgba(colour, alpha=255):
    return (int(colour[0]), int(colour[1]), int(colour[2]), alpha)


def _scaled(colour, factor):
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)


def render_background(scene: SceneTraits, size: int) -> np.ndarray:
    """The scene as uint8 [size, size, 3]; independent of any person."""
    rng = np.random.default_rng(scene.layout_seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b, c = (np.asarray(colour, np.float32) for colour in (scene.colour_a, scene.colour_b, scene.colour_c))
    angle = np.deg2rad(scene.angle_deg)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if scene.kind == "flat":
        image = np.broadcast_to(a, (size, size, 3)).copy()
    elif scene.kind == "gradient":
        weight = np.clip(along / max(abs(np.cos(angle)) + abs(np.sin(angle)), 1e-3), 0, 1)[..., None]
        image = a * (1 - weight) + b * weight
    elif scene.kind == "stripes":
        image = np.where((np.floor(along / scene.pattern_scale) % 2 == 0)[..., None], a, b)
    elif scene.kind == "checker":
        image = np.where(((np.floor(xx / scene.pattern_scale) + np.floor(yy / scene.pattern_scale)) % 2 == 0)[..., None], a, b)
    elif scene.kind == "dots":
        image = np.broadcast_to(a, (size, size, 3)).copy()
        period = scene.pattern_scale
        fx, fy = (xx % period) / period - 0.5, (yy % period) / period - 0.5
        image[(fx ** 2 + fy ** 2) < 0.09] = b
    else:  # "room": wall, floor, a window and a picture; the person stands in front
        image = np.broadcast_to(a, (size, size, 3)).copy()
        horizon = rng.uniform(0.72, 0.85)
        image[yy > horizon] = b
        image[np.abs(yy - horizon) < 0.006] = a * 0.6
        wx, wy = rng.uniform(0.02, 0.7), rng.uniform(0.05, 0.3)
        window = (xx > wx) & (xx < wx + 0.25) & (yy > wy) & (yy < wy + 0.3)
        image[window] = np.clip(c * 0.5 + 128, 0, 255)
        image[window & ((np.abs(xx - wx - 0.125) < 0.008) | (np.abs(yy - wy - 0.15) < 0.008))] = a * 0.7
        px, py = rng.uniform(0.05, 0.75), rng.uniform(0.08, 0.35)
        image[(xx > px) & (xx < px + 0.18) & (yy > py) & (yy < py + 0.14)] = c
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _skin_texture(static: StaticTraits, size: int) -> np.ndarray:
    """Skin colour with the person's texture pattern, float32 [size, size, 3]."""
    rng = np.random.default_rng(static.skin_pattern_seed)
    skin = np.asarray(static.skin_colour, np.float32)
    texture = np.broadcast_to(skin, (size, size, 3)).copy()
    if static.skin_pattern == "rough":
        noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), max(size / 160, 0.6))
        texture *= (1 + 0.05 * noise / (noise.std() + 1e-6))[..., None]
    elif static.skin_pattern == "blotchy":
        noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 20)
        texture *= (1 + 0.05 * noise / (noise.std() + 1e-6))[..., None]
    elif static.skin_pattern in ("freckles", "moles"):
        count, radius, darkness = (60, size / 160, 0.82) if static.skin_pattern == "freckles" else (5, size / 70, 0.45)
        image = texture.copy()
        for _ in range(count):
            centre = (rng.uniform(0.3, 0.7) * size, rng.uniform(0.35, 0.75) * size)
            colour = tuple(float(v) for v in skin * darkness)
            cv2.circle(image, _pts(centre)[0, 0].tolist(), int(max(radius, 0.6) * _SCALE), colour, -1, cv2.LINE_AA, _SHIFT)
        texture = image
    return texture


class HeadRenderer:
    """Renders one person in one scene at one size. ``render(state_row)`` -> uint8 [S, S, 3]."""

    def __init__(self, static: StaticTraits, scene: SceneTraits, size: int):
        if not 32 <= size <= 1024:
            raise ValueError(f"size must be between 32 and 1024 pixels, got {size}")
        self.static, self.size = static, size
        self.background = render_background(scene, size)
        self.a = static.face_width * size
        self.b = static.face_aspect * self.a
        self.centre = np.array([FACE_CENTRE[0] * size, FACE_CENTRE[1] * size])
        self.line = max(1, int(round(size / 128)))
        self.base = self._base_layer()
        front = self._front_layer()
        self.front_alpha = front[..., 3:4].astype(np.float32) / 255.0
        self.front_premultiplied = front[..., :3].astype(np.float32) * self.front_alpha

    # -- static layers, built once ---------------------------------------------------------
    def _face_outline(self) -> np.ndarray:
        angle = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x, y = self.a * np.cos(angle), self.b * np.sin(angle)
        lower = y > 0
        x[lower] *= 1 - 0.3 * self.static.jaw_taper * (y[lower] / self.b) ** 2
        return np.stack([x, y], axis=1) + self.centre

    def _hair_back(self, canvas: np.ndarray) -> None:
        s, a, b, (cx, cy) = self.static, self.a, self.b, self.centre
        colour = _rgba(s.hair_colour)
        if s.hair_style == "long":
            cv2.ellipse(canvas, _pts((cx, cy - 0.15 * b))[0, 0].tolist(), (int(1.22 * a * _SCALE), int(1.02 * b * _SCALE)),
                        0, 180, 360, colour, -1, cv2.LINE_AA, _SHIFT)
            cv2.fillPoly(canvas, [_pts([(cx - 1.22 * a, cy - 0.15 * b), (cx + 1.22 * a, cy - 0.15 * b),
                                        (cx + 1.1 * a, cy + 0.95 * b), (cx - 1.1 * a, cy + 0.95 * b)])], colour, cv2.LINE_AA, _SHIFT)
        elif s.hair_style in ("short", "side_part", "bun"):
            cv2.ellipse(canvas, _pts((cx, cy - 0.1 * b))[0, 0].tolist(), (int(1.1 * a * _SCALE), int(1.0 * b * _SCALE)),
                        0, 180, 360, colour, -1, cv2.LINE_AA, _SHIFT)
            if s.hair_style == "bun":
                cv2.circle(canvas, _pts((cx, cy - 1.15 * b))[0, 0].tolist(), int(0.45 * a * _SCALE), colour, -1, cv2.LINE_AA, _SHIFT)
        elif s.hair_style == "curly":
            rng = np.random.default_rng(s.skin_pattern_seed + 1)
            for angle in np.linspace(np.pi * 0.95, np.pi * 2.05, 14):
                radius = rng.uniform(0.3, 0.42) * a
                cv2.circle(canvas, _pts((cx + 1.0 * a * np.cos(angle), cy - 0.1 * b + 1.0 * b * np.sin(angle)))[0, 0].tolist(),
                           int(radius * _SCALE), colour, -1, cv2.LINE_AA, _SHIFT)

    def _base_layer(self) -> np.ndarray:
        s, a, b, (cx, cy) = self.static, self.a, self.b, self.centre
        size = self.size
        canvas = np.zeros((size, size, 4), np.uint8)
        self._hair_back(canvas)
        # Shirt and neck: the neck is shaded (under-chin shadow), which also keeps it apart from
        # the face's skin colour for the frame-only metrics.
        cv2.ellipse(canvas, _pts((cx, cy + 2.1 * b))[0, 0].tolist(), (int(1.9 * a * _SCALE), int(1.0 * b * _SCALE)),
                    0, 0, 360, _rgba(s.shirt_colour), -1, cv2.LINE_AA, _SHIFT)
        cv2.fillPoly(canvas, [_pts([(cx - 0.5 * a, cy + 0.5 * b), (cx + 0.5 * a, cy + 0.5 * b),
                                    (cx + 0.55 * a, cy + 1.25 * b), (cx - 0.55 * a, cy + 1.25 * b)])],
                     _rgba(_scaled(s.skin_colour, 0.72)), cv2.LINE_AA, _SHIFT)
        face_mask = np.zeros((size, size), np.uint8)
        cv2.fillPoly(face_mask, [_pts(self._face_outline())], 255, cv2.LINE_AA, _SHIFT)
        alpha = face_mask[..., None].astype(np.float32) / 255.0
        rgb = canvas[..., :3].astype(np.float32) * (1 - alpha) + _skin_texture(s, size) * alpha
        canvas[..., :3] = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
        canvas[..., 3] = np.maximum(canvas[..., 3], face_mask)
        if s.earrings:
            for side in (-1, 1):
                centre = (cx + side * 1.0 * a, cy + 0.12 * b)
                cv2.circle(canvas, _pts(centre)[0, 0].tolist(), int(0.09 * a * _SCALE), _rgba(s.earring_colour), -1, cv2.LINE_AA, _SHIFT)
        return canvas

    def _front_layer(self) -> np.ndarray:
        """Fringe and hat: drawn over the face, moving rigidly with the head."""
        s, a, b, (cx, cy) = self.static, self.a, self.b, self.centre
        canvas = np.zeros((self.size, self.size, 4), np.uint8)
        colour = _rgba(s.hair_colour)
        if s.hair_style in ("short", "long", "curly", "bun"):
            depth = {"short": 0.72, "long": 0.62, "curly": 0.66, "bun": 0.78}[s.hair_style]
            outline = self._face_outline()
            top = outline[outline[:, 1] < cy - depth * b]
            cv2.fillPoly(canvas, [_pts(top)], colour, cv2.LINE_AA, _SHIFT)
        elif s.hair_style == "side_part":
            outline = self._face_outline()
            top = outline[(outline[:, 1] < cy - 0.55 * b) & ((outline[:, 1] < cy - 0.8 * b) | (outline[:, 0] < cx))]
            cv2.fillPoly(canvas, [_pts(np.vstack([top, [(cx - 0.2 * a, cy - 0.8 * b)]]))], colour, cv2.LINE_AA, _SHIFT)
        if s.hat:
            hat = _rgba(s.hat_colour)
            cv2.ellipse(canvas, _pts((cx, cy - 0.78 * b))[0, 0].tolist(), (int(1.35 * a * _SCALE), int(0.16 * b * _SCALE)),
                        0, 0, 360, hat, -1, cv2.LINE_AA, _SHIFT)
            cv2.fillPoly(canvas, [_pts([(cx - 0.95 * a, cy - 0.8 * b), (cx + 0.95 * a, cy - 0.8 * b),
                                        (cx + 0.8 * a, cy - 1.45 * b), (cx - 0.8 * a, cy - 1.45 * b)])], hat, cv2.LINE_AA, _SHIFT)
        return canvas

    # -- moving parts, drawn per frame -------------------------------------------------------
    def _draw_eyes(self, canvas, dx, dy, blink, brow_raise):
        s, a, b, (cx, cy) = self.static, self.a, self.b, self.centre
        half_w = s.eye_size * a
        half_h = s.eye_shape * half_w
        lid_colour = _rgba(_scaled(s.skin_colour, 0.93))
        for side in (-1, 1):
            ex, ey = cx + side * s.eye_spacing * a + dx, cy - 0.1 * b + dy
            outline = _ellipse_points(ex, ey, half_w, half_h, 24)
            cv2.fillPoly(canvas, [_pts(outline)], (245, 245, 240, 255), cv2.LINE_AA, _SHIFT)
            iris_r = min(0.45 * half_w, 0.9 * half_h)
            cv2.circle(canvas, _pts((ex + 0.3 * dx, ey))[0, 0].tolist(), int(iris_r * _SCALE), _rgba(s.eye_colour), -1, cv2.LINE_AA, _SHIFT)
            cv2.circle(canvas, _pts((ex + 0.3 * dx, ey))[0, 0].tolist(), int(0.45 * iris_r * _SCALE), (15, 15, 15, 255), -1, cv2.LINE_AA, _SHIFT)
            if blink > 0.02:
                lid_y = ey - half_h + 2 * half_h * min(blink, 1.0)
                lid = outline.copy()
                lid[:, 1] = np.minimum(lid[:, 1], lid_y)
                cv2.fillPoly(canvas, [_pts(lid)], lid_colour, cv2.LINE_AA, _SHIFT)
            edge = outline[outline[:, 1] <= ey] if blink <= 0.5 else outline[outline[:, 1] >= ey]
            edge = edge[np.argsort(edge[:, 0])]
            cv2.polylines(canvas, [_pts(edge)], False, (30, 25, 25, 255), self.line, cv2.LINE_AA, _SHIFT)
            # Brow: a thick tilted bar above the eye; raises lift it.
            by = ey - half_h - 0.18 * a - 0.14 * a * brow_raise
            inner, outer = (ex - side * 0.9 * half_w, by), (ex + side * 1.1 * half_w, by - s.brow_tilt * half_w)
            cv2.line(canvas, _pts(inner)[0, 0].tolist(), _pts(outer)[0, 0].tolist(), _rgba(s.brow_colour),
                     max(1, int(round(s.brow_thickness * a))), cv2.LINE_AA, _SHIFT)
            if s.glasses:
                if s.glasses_round:
                    cv2.circle(canvas, _pts((ex, ey))[0, 0].tolist(), int(1.45 * half_w * _SCALE), _rgba(s.glasses_colour), self.line, cv2.LINE_AA, _SHIFT)
                else:
                    box = _pts([(ex - 1.45 * half_w, ey - 1.1 * half_w), (ex + 1.45 * half_w, ey - 1.1 * half_w),
                                (ex + 1.45 * half_w, ey + 1.0 * half_w), (ex - 1.45 * half_w, ey + 1.0 * half_w)])
                    cv2.polylines(canvas, [box], True, _rgba(s.glasses_colour), self.line, cv2.LINE_AA, _SHIFT)
        if s.glasses:
            bridge_y = cy - 0.1 * b + dy - 0.3 * half_w
            left, right = cx - s.eye_spacing * a + 1.4 * half_w + dx, cx + s.eye_spacing * a - 1.4 * half_w + dx
            cv2.line(canvas, _pts((left, bridge_y))[0, 0].tolist(), _pts((right, bridge_y))[0, 0].tolist(),
                     _rgba(s.glasses_colour), self.line, cv2.LINE_AA, _SHIFT)

    def _draw_nose(self, canvas, dx, dy):
        s, a, b, (cx, cy) = self.static, self.a, self.b, self.centre
        tip_y = cy - 0.1 * b + s.nose_length * a + 0.15 * a + dy
        shade = _rgba(_scaled(s.skin_colour, 0.7))
        cv2.line(canvas, _pts((cx + 1.2 * dx, cy - 0.05 * b + dy))[0, 0].tolist(), _pts((cx + 1.4 * dx + 0.05 * a, tip_y))[0, 0].tolist(),
                 _rgba(_scaled(s.skin_colour, 0.85)), self.line, cv2.LINE_AA, _SHIFT)
        for side in (-1, 1):
            cv2.ellipse(canvas, _pts((cx + 1.4 * dx + side * s.nose_width * a, tip_y))[0, 0].tolist(),
                        (int(0.06 * a * _SCALE), int(0.035 * a * _SCALE)), 0, 0, 360, shade, -1, cv2.LINE_AA, _SHIFT)

    def _draw_mouth(self, canvas, dx, dy, openness, width, rounding, smile):
        s, a, b, (cx, cy) = self.static, self.a, self.b, self.centre
        mx, my = cx + dx, cy + 0.5 * b + dy
        half_w = s.mouth_width * a * (1 + 0.3 * (width - 0.5) - 0.25 * rounding + 0.1 * smile)
        open_h = 0.2 * a * openness * (1 + 0.25 * rounding)
        lip = 0.07 * a
        lift = 0.12 * a * smile
        u = np.linspace(-1, 1, 17)
        curve = -lift * u ** 2
        arch = np.sqrt(1 - u ** 2)
        lips = np.concatenate([np.stack([mx + (half_w + lip) * u, my + curve - (open_h + lip) * arch], 1),
                               np.stack([mx + (half_w + lip) * u[::-1], my + curve[::-1] + (open_h + 1.2 * lip) * arch[::-1]], 1)])
        cv2.fillPoly(canvas, [_pts(lips)], _rgba(s.lip_colour), cv2.LINE_AA, _SHIFT)
        if open_h > 0.02 * a:
            upper = np.stack([mx + half_w * u, my + curve - open_h * arch], 1)
            lower = np.stack([mx + half_w * u[::-1], my + curve[::-1] + open_h * arch[::-1]], 1)
            cv2.fillPoly(canvas, [_pts(np.concatenate([upper, lower]))], (45, 12, 18, 255), cv2.LINE_AA, _SHIFT)
            teeth_lower = lower.copy()
            teeth_lower[:, 1] = np.minimum(teeth_lower[:, 1], upper[::-1, 1] + 0.09 * a)
            cv2.fillPoly(canvas, [_pts(np.concatenate([upper, teeth_lower]))], _rgba(s.teeth_colour), cv2.LINE_AA, _SHIFT)
            if s.teeth_gap:
                cv2.line(canvas, _pts((mx, my - open_h))[0, 0].tolist(), _pts((mx, my - open_h + 0.09 * a))[0, 0].tolist(),
                         (45, 12, 18, 255), self.line, cv2.LINE_AA, _SHIFT)
        else:
            closed = np.stack([mx + half_w * u, my + curve], 1)
            cv2.polylines(canvas, [_pts(closed)], False, _rgba(_scaled(s.lip_colour, 0.6)), self.line, cv2.LINE_AA, _SHIFT)

    def render(self, state: dict) -> np.ndarray:
        """One frame from a state row (``FaceState.frame(i)``)."""
        a, b = self.a, self.b
        canvas = self.base.copy()
        dx = 0.35 * a * np.sin(np.deg2rad(state["yaw_deg"]))
        dy = 0.3 * b * np.sin(np.deg2rad(state["pitch_deg"]))
        self._draw_eyes(canvas, dx, dy, state["blink"], state["brow_raise"])
        self._draw_nose(canvas, dx, dy)
        self._draw_mouth(canvas, dx, dy, state["openness"], state["width"], state["rounding"], state["smile"])
        head = canvas.astype(np.float32)
        head[..., :3] = head[..., :3] * (1 - self.front_alpha) + self.front_premultiplied
        head[..., 3:4] = np.maximum(head[..., 3:4], self.front_alpha * 255)
        matrix = cv2.getRotationMatrix2D((float(self.centre[0]), float(self.centre[1])), -state["roll_deg"], 1.0)
        matrix[0, 2] += state["shift_x"] * a
        matrix[1, 2] += state["shift_y"] * a
        warped = cv2.warpAffine(head, matrix, (self.size, self.size), flags=cv2.INTER_LINEAR, borderValue=0)
        alpha = warped[..., 3:4] * (1 / 255.0)
        frame = self.background + (warped[..., :3] - self.background) * alpha
        return np.clip(frame + 0.5, 0, 255).astype(np.uint8)

    def render_clip(self, states: FaceState):
        """Frames one at a time (a 60 s clip at 256 px never sits in RAM as floats)."""
        for index in range(len(states)):
            yield self.render(states.frame(index))
