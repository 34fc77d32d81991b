"""Latent codecs: the space the DiT works in, behind one interface.

A codec turns frames (float [B, T, H, W, 3] in 0..1) into latents [B, C, T', h, w] and back.
Every checkpoint names the codec it was trained with (``ModelConfig.latent_codec``); a codec with
another id is refused, because latents of another space mean nothing to the network.

- ``PixelCodec`` ("pixel-f<N>"): space-to-depth of RGB by N (each latent cell is an N×N RGB patch,
  scaled to -1..1). Lossless, parameter-free, exact round trip: the default for small models.
- ``ComfyVAECodec``: adapts a VAE object a user loads in ComfyUI, duck-typed (``.encode(pixels
  [N, H, W, 3]) -> latents``, ``.decode(latents) -> pixels``), so this file never imports ComfyUI.
"""
from __future__ import annotations

import re

import torch

from ..errors import UserFacingError


class LatentCodec:
    """Interface: ``id``, ``latent_channels``, ``spatial_factor``, ``temporal_factor``,
    ``encode(frames) -> latents`` and ``decode(latents) -> frames``."""

    id: str
    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.latent_channels, frames // self.temporal_factor, height // self.spatial_factor, width // self.spatial_factor)


def _check_frames(frames: torch.Tensor, factor: int) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise UserFacingError(f"frames must be a float tensor [B, T, H, W, 3] in 0..1; got {shape}.")
    height, width = frames.shape[2], frames.shape[3]
    if height % factor or width % factor:
        raise UserFacingError(f"frame size {height}x{width} must be divisible by the codec factor {factor}; resize the crops to the model's frame size.")


def space_to_depth(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, T, H, W, 3] -> [B, 3·f·f, T, H/f, W/f], channel order (rgb, dy, dx): channel c of a
    cell is a fixed pixel of its patch. A pure rearrangement (PixelCodec scales around it)."""
    batch, time, height, width, _ = frames.shape
    f = factor
    cells = frames.reshape(batch, time, height // f, f, width // f, f, 3)
    return cells.permute(0, 6, 3, 5, 1, 2, 4).reshape(batch, 3 * f * f, time, height // f, width // f)


def depth_to_space(latents: torch.Tensor, factor: int) -> torch.Tensor:
    """The inverse of ``space_to_depth``: [B, 3·f·f, T, h, w] -> [B, T, h·f, w·f, 3]."""
    batch, _, time, rows, cols = latents.shape
    f = factor
    cells = latents.reshape(batch, 3, f, f, time, rows, cols).permute(0, 4, 5, 2, 6, 3, 1)
    return cells.reshape(batch, time, rows * f, cols * f, 3)


class PixelCodec(LatentCodec):
    """Patchified RGB: [B, T, H, W, 3] in 0..1 <-> [B, 3·f·f, T, H/f, W/f] in -1..1."""

    def __init__(self, factor: int) -> None:
        if factor < 1:
            raise UserFacingError(f"pixel codec factor must be >= 1; got {factor}.")
        self.factor = factor
        self.id = f"pixel-f{factor}"
        self.latent_channels = 3 * factor * factor
        self.spatial_factor = factor
        self.temporal_factor = 1

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        _check_frames(frames, self.factor)
        return space_to_depth(frames, self.factor) * 2.0 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        channels = latents.shape[1]
        if channels != self.latent_channels:
            raise UserFacingError(f"latents have {channels} channels; the {self.id} codec expects {self.latent_channels}.")
        return ((depth_to_space(latents, self.factor) + 1.0) * 0.5).clamp(0.0, 1.0)


def _scalar_factor(value) -> int | None:
    """ComfyUI VAEs store downscale ratios as an int, or for video VAEs as a tuple/callable."""
    if isinstance(value, int):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[-1], int):
        return value[-1]
    return None


class ComfyVAECodec(LatentCodec):
    """Adapter for a VAE loaded in ComfyUI (image VAEs, and video VAEs for encode/decode).

    Duck-typed on ComfyUI's ``VAE`` object: ``encode(pixels [N, H, W, 3] 0..1)`` returns latents
    [N, C, h, w] (image VAE) or [1, C, t, h, w] (video VAE); ``decode`` inverts it. The id is
    built from the VAE's class and shape factors, e.g. ``comfy-vae:AutoencoderKL:c4:s8:t1``.
    """

    def __init__(self, vae, *, latent_channels: int | None = None, spatial_factor: int | None = None, temporal_factor: int | None = None) -> None:
        if not (callable(getattr(vae, "encode", None)) and callable(getattr(vae, "decode", None))):
            raise UserFacingError("the VAE input has no encode/decode methods; connect a VAE from a ComfyUI 'Load VAE' node.")
        self.vae = vae
        self.latent_channels = int(latent_channels or getattr(vae, "latent_channels", 0) or 0)
        self.spatial_factor = int(spatial_factor or _scalar_factor(getattr(vae, "downscale_ratio", None)) or 8)
        temporal = temporal_factor
        if temporal is None:
            downscale_index = getattr(vae, "downscale_index_formula", None)
            temporal = _scalar_factor(downscale_index[0]) if isinstance(downscale_index, (tuple, list)) and downscale_index else 1
        self.temporal_factor = int(temporal or 1)
        if self.latent_channels <= 0:
            raise UserFacingError("cannot tell how many latent channels this VAE has; it is not a ComfyUI VAE object.")
        inner = getattr(vae, "first_stage_model", vae)
        self.id = f"comfy-vae:{type(inner).__name__}:c{self.latent_channels}:s{self.spatial_factor}:t{self.temporal_factor}"

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        _check_frames(frames, self.spatial_factor)
        encoded = []
        for clip in frames:  # ComfyUI encodes one clip at a time: [T, H, W, 3]
            latents = self.vae.encode(clip[..., :3])
            if latents.dim() == 4:  # image VAE: [T, C, h, w] -> [C, T, h, w]
                latents = latents.permute(1, 0, 2, 3)
            elif latents.dim() == 5:
                latents = latents[0]
            else:
                raise UserFacingError(f"the VAE returned latents of shape {tuple(latents.shape)}; expected 4 or 5 dimensions.")
            encoded.append(latents)
        return torch.stack(encoded).to(frames.device, torch.float32)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        decoded = []
        for clip in latents:  # [C, T, h, w]
            if self.temporal_factor == 1:
                pixels = self.vae.decode(clip.permute(1, 0, 2, 3))  # image VAE decodes [T, C, h, w]
            else:
                pixels = self.vae.decode(clip[None])
            pixels = pixels.reshape(-1, *pixels.shape[-3:])  # [T, H, W, 3]
            decoded.append(pixels)
        return torch.stack(decoded).to(latents.device, torch.float32).clamp(0.0, 1.0)


_PIXEL_ID = re.compile(r"^pixel-f(\d+)$")


def codec_for_config(config, vae=None) -> LatentCodec:
    """The codec a checkpoint needs: built-in pixel codecs by id; VAE codecs from the user's VAE,
    refused with a clear message when its id differs from the checkpoint's latent space."""
    match = _PIXEL_ID.match(config.latent_codec)
    if vae is not None:
        # A VAE the user connected is checked even for pixel checkpoints: silently ignoring it
        # would hide a wiring mistake.
        codec: LatentCodec = vae if isinstance(vae, LatentCodec) else ComfyVAECodec(vae)
    elif match:
        codec = PixelCodec(int(match.group(1)))
    else:
        if vae is None:
            raise UserFacingError(
                f"this checkpoint works in the latent space {config.latent_codec!r}; connect the matching VAE (ComfyUI 'Load VAE') to use it."
            )
    if codec.id != config.latent_codec or codec.latent_channels != config.latent_channels:
        raise UserFacingError(
            f"the VAE you connected has latent space {codec.id!r} ({codec.latent_channels} channels), but this checkpoint "
            f"was trained in {config.latent_codec!r} ({config.latent_channels} channels); connect the VAE the checkpoint names (none for pixel-* checkpoints)."
        )
    return codec
