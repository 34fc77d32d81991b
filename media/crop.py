"""Fixed-size square face crops with their exact inverse, and paste-back without a visible seam.

Coordinates: boxes use the edge convention of ``face_track`` (pixel i spans [i, i+1]); the affine
matrices use OpenCV's pixel-index convention (pixel i is the point i), so they can be handed to
``cv2.warpAffine`` as they are.

The crop is a square of ``scale`` x the face box side, centred on the face, resampled to
``size`` x ``size``. Near a frame border the square is NOT shifted inwards: it is padded by
repeating the border pixels, so the face keeps the same place in every crop (the model relies on
that) and paste-back simply skips the padding. Large downscales go through an image pyramid
first so small crops of 4K frames do not alias.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserFacingError
from .face_track import FaceTrack

DEFAULT_CROP_SCALE = 1.6


@dataclass(frozen=True)
class CropTransform:
    """Source frame pixel (x, y) -> crop pixel: ``matrix @ [x, y, 1]``."""

    matrix: np.ndarray  # float64 [2, 3]
    size: int
    frame_size: tuple[int, int]  # (height, width) of the source frame

    @property
    def inverse_matrix(self) -> np.ndarray:
        """Crop pixel -> source frame pixel, float64 [2, 3]."""
        import cv2

        return cv2.invertAffineTransform(self.matrix)

    @property
    def box(self) -> np.ndarray:
        """The square the crop covers, in source pixels (x0, y0, x1, y1), edge convention."""
        corners = self.inverse_matrix @ np.array([[-0.5, self.size - 0.5], [-0.5, self.size - 0.5], [1.0, 1.0]])
        return np.array([corners[0, 0] + 0.5, corners[1, 0] + 0.5, corners[0, 1] + 0.5, corners[1, 1] + 0.5])

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """Crop of one uint8 RGB frame -> uint8 [size, size, 3]."""
        if frame.shape[:2] != tuple(self.frame_size):
            raise UserFacingError(f"frame size {frame.shape[:2]} does not match the tracked video's {tuple(self.frame_size)}")
        x0, y0, x1, y1 = self.box
        height, width = self.frame_size
        # Only the region the crop reads (plus a margin for the pyramid filter) is resampled.
        margin = 2 + 4 / self.matrix[0, 0]
        left, top = int(max(0, np.floor(x0 - margin))), int(max(0, np.floor(y0 - margin)))
        right, bottom = int(min(width, np.ceil(x1 + margin))), int(min(height, np.ceil(y1 + margin)))
        if right <= left or bottom <= top:
            # The whole crop lies outside the frame: repeat the nearest border pixel.
            left, top = int(np.clip(x0, 0, width - 1)), int(np.clip(y0, 0, height - 1))
            right, bottom = left + 1, top + 1
        matrix = self.matrix.copy()
        matrix[:, 2] += matrix[:, :2] @ np.array([left, top], np.float64)
        return _resample(frame[top:bottom, left:right], matrix, self.size, self.size)


def _resample(source: np.ndarray, matrix: np.ndarray, out_width: int, out_height: int) -> np.ndarray:
    """``cv2.warpAffine`` of an axis-aligned scale+shift, halving the source with a Gaussian
    pyramid while the scale is below 1/2 so a large shrink does not alias.

    Bilinear when enlarging, bicubic when shrinking: on the shared real clips, crop -> paste-back
    of an untouched 512² crop measured 39-47 dB PSNR with bilinear both ways, 42-50 dB with this
    mix and 47-53 dB with bicubic both ways, which costs about 5 ms more per 512² crop (1 ms vs 6).
    """
    import cv2

    matrix = np.array(matrix, np.float64)
    while matrix[0, 0] < 0.5 and min(source.shape[:2]) >= 2:
        source = cv2.pyrDown(source)
        # pyrDown's output pixel j is centred on input pixel 2j.
        matrix[:, :2] *= 2.0
    interpolation = cv2.INTER_LINEAR if matrix[0, 0] >= 1.0 else cv2.INTER_CUBIC
    return cv2.warpAffine(
        np.ascontiguousarray(source), matrix, (out_width, out_height), flags=interpolation, borderMode=cv2.BORDER_REPLICATE
    )


def _check_size(size) -> int:
    if isinstance(size, bool) or int(size) != size or not 32 <= size <= 4096:
        raise UserFacingError(f"crop size must be a whole number of pixels between 32 and 4096 (256 or 512), got {size!r}")
    return int(size)


def crop_transforms(track: FaceTrack, size: int = 256, *, scale: float = DEFAULT_CROP_SCALE) -> list[CropTransform]:
    """One ``CropTransform`` per tracked frame: a square of ``scale`` x the face box, to ``size``²."""
    size = _check_size(size)
    if not np.isfinite(scale) or scale <= 0:
        raise UserFacingError(f"crop scale must be a positive number (1.6 frames head and hair), got {scale!r}")
    centres, sides = track.centres_and_sizes()
    crop_sides = np.maximum(sides.astype(np.float64) * scale, 1.0)
    zoom = size / crop_sides
    transforms = []
    for (centre_x, centre_y), factor in zip(centres.astype(np.float64), zoom):
        # Edge-convention x maps to crop edge coordinate (x - left) * factor; shift both sides by
        # half a pixel to go to pixel-index coordinates.
        left, top = centre_x - size / factor / 2, centre_y - size / factor / 2
        matrix = np.array([[factor, 0.0, (0.5 - left) * factor - 0.5], [0.0, factor, (0.5 - top) * factor - 0.5]])
        transforms.append(CropTransform(matrix=matrix, size=size, frame_size=tuple(track.frame_size)))
    return transforms


def crop_faces(frames, track: FaceTrack, size: int = 256, *, scale: float = DEFAULT_CROP_SCALE):
    """Crops of every frame -> (uint8 [T, size, size, 3], list of ``CropTransform``).

    ``frames``: an array [T, H, W, 3] or an iterable of frames (the ``iter_video_frames`` tuples
    work too). For long videos stream instead: ``crop_transforms(track)[i].apply(frame)``.
    """
    transforms = crop_transforms(track, size, scale=scale)
    crops = np.empty((len(transforms), transforms[0].size, transforms[0].size, 3), np.uint8) if transforms else None
    count = 0
    for frame in frames:
        if isinstance(frame, tuple) and len(frame) == 3:
            frame = frame[2]
        if count >= len(transforms):
            raise UserFacingError(f"got more frames than the face track's {len(transforms)}; track the same frames you crop")
        crops[count] = transforms[count].apply(np.asarray(frame))
        count += 1
    if count != len(transforms):
        raise UserFacingError(f"got {count} frames but the face track has {len(transforms)}; track the same frames you crop")
    return crops, transforms


def _feather_ramp(crop_coordinate: np.ndarray, size: int, feather: float) -> np.ndarray:
    """1 inside the crop, falling smoothly (smoothstep) to 0 over the outer ``feather`` share."""
    position = (crop_coordinate + 0.5) / size  # 0..1 across the crop
    distance = np.minimum(position, 1.0 - position)
    if feather <= 0:
        return (distance > 0).astype(np.float32)
    ramp = np.clip(distance / feather, 0.0, 1.0)
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)


def _match_colour(pasted: np.ndarray, original: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Shift/scale ``pasted``'s LAB mean and std (weighted by ``alpha``) onto ``original``'s."""
    import cv2

    # Statistics from every 3rd pixel each way: the same numbers to well under one grey level,
    # at a ninth of the cost.
    weights = alpha[::3, ::3].reshape(-1, 1).astype(np.float64)
    total = weights.sum()
    if total < 1.0:
        return pasted
    pasted_lab = cv2.cvtColor(pasted, cv2.COLOR_RGB2LAB)

    def statistics(image_lab):
        samples = image_lab.reshape(-1, 3).astype(np.float64)
        mean = (samples * weights).sum(axis=0) / total
        std = np.sqrt(((samples - mean) ** 2 * weights).sum(axis=0) / total)
        return mean, std

    pasted_mean, pasted_std = statistics(pasted_lab[::3, ::3])
    original_mean, original_std = statistics(cv2.cvtColor(np.ascontiguousarray(original[::3, ::3]), cv2.COLOR_RGB2LAB))
    # Bounded gain: a flat generated region must not be blown up into noise.
    gain = np.clip(original_std / np.maximum(pasted_std, 1e-6), 0.5, 2.0)
    matched = (pasted_lab - pasted_mean.astype(np.float32)) * gain.astype(np.float32) + original_mean.astype(np.float32)
    return np.clip(cv2.cvtColor(matched.astype(np.float32), cv2.COLOR_LAB2RGB), 0.0, 1.0)


def paste_back_frame(
    frame: np.ndarray, crop: np.ndarray, transform: CropTransform, *, feather: float = 0.12, color_match: bool = True
) -> np.ndarray:
    """One frame with ``crop`` warped back into the square it came from, blended by a feathered
    mask; returns a new uint8 frame."""
    crop = np.asarray(crop)
    if crop.shape != (transform.size, transform.size, 3) or crop.dtype != np.uint8:
        raise UserFacingError(
            f"crop must be uint8 [{transform.size}, {transform.size}, 3] like the crops it replaces, got {crop.dtype} {crop.shape}"
        )
    if not 0 <= feather <= 0.5:
        raise UserFacingError(f"feather must be between 0 and 0.5 (share of the crop side), got {feather}")
    height, width = transform.frame_size
    x0, y0, x1, y1 = transform.box
    left, top = int(max(0, np.floor(x0))), int(max(0, np.floor(y0)))
    right, bottom = int(min(width, np.ceil(x1))), int(min(height, np.ceil(y1)))
    result = np.array(frame, copy=True)
    if right <= left or bottom <= top:
        return result
    # Crop -> frame region [top:bottom, left:right]: inverse of the crop matrix, shifted.
    back = transform.inverse_matrix.copy()
    back[:, 2] -= np.array([left, top], np.float64)
    pasted = _resample(crop, back, right - left, bottom - top).astype(np.float32) / 255.0
    original = result[top:bottom, left:right].astype(np.float32) / 255.0
    factor, shift = transform.matrix[:, 0:2].diagonal(), transform.matrix[:, 2]
    crop_x = np.arange(left, right) * factor[0] + shift[0]
    crop_y = np.arange(top, bottom) * factor[1] + shift[1]
    alpha = _feather_ramp(crop_y, transform.size, feather)[:, None] * _feather_ramp(crop_x, transform.size, feather)[None, :]
    if color_match:
        pasted = _match_colour(pasted, original, alpha)
    blended = original + (pasted - original) * alpha[..., None]
    result[top:bottom, left:right] = np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)
    return result


def paste_back(frames, crops, transforms, *, feather: float = 0.12, color_match: bool = True) -> np.ndarray:
    """Every crop pasted back into its frame -> uint8 [T, H, W, 3] (the inputs are not changed).

    ``feather``: share of the crop side over which the mask fades to the original frame.
    ``color_match``: match the pasted region's LAB mean/std to the original inside the mask, so a
    generated face with a slight colour shift leaves no seam.
    """
    frames = np.asarray(frames)
    if len(frames) != len(crops) or len(crops) != len(transforms):
        raise UserFacingError(
            f"paste_back needs one crop and one transform per frame, got {len(frames)} frames, "
            f"{len(crops)} crops and {len(transforms)} transforms"
        )
    return np.stack(
        [
            paste_back_frame(frame, crop, transform, feather=feather, color_match=color_match)
            for frame, crop, transform in zip(frames, crops, transforms)
        ]
    ) if len(frames) else frames.copy()
