"""The dub region of a face crop: the lower face that dub mode re-renders.

One definition for rendering (``dub_mask``) and for training (``jittered_dub_masks``): the model
must be trained on the masks it is asked to fill, so training draws boxes around the same one.
Fractions are of the crop side, for ``media.crop_faces`` framing (face centred, chin near the
bottom).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

# top, bottom, left, right as fractions of the crop side
DUB_REGION = (0.52, 0.92, 0.22, 0.78)


def dub_mask(size: int) -> np.ndarray:
    """float32 [size, size] in {0, 1}; 1 = re-rendered (the lower face)."""
    top, bottom, left, right = (int(round(size * f)) for f in DUB_REGION)
    mask = np.zeros((size, size), np.float32)
    mask[top:bottom, left:right] = 1.0
    return mask


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
