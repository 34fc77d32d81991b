"""Conversions between the library's numpy media and ComfyUI's core types (the media library
takes arrays and paths only; the nodes convert at their edge).

IMAGE is a float tensor [B,H,W,C] in 0..1; AUDIO is ``{"waveform": [B,C,S] tensor, "sample_rate":
int}``; VIDEO is an object with ``get_components()`` (and, when file-backed, ``get_stream_source()``).
torch is imported lazily (the nodes run inside ComfyUI's torch; tests import this without it).
"""
from __future__ import annotations

import numpy as np

from ..errors import UserFacingError
from ..media.audio import planar_to_mono


def frames_to_comfy_image(frames: np.ndarray):
    """uint8 frames [T,H,W,3] (or one [H,W,3]) -> ComfyUI IMAGE float32 tensor [T,H,W,3] in 0..1."""
    import torch

    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise UserFacingError(f"expected uint8 frames [T,H,W,3], got {frames.dtype} {tuple(frames.shape)}")
    return torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32).div_(255.0)


def comfy_image_to_frames(image) -> np.ndarray:
    """ComfyUI IMAGE [B,H,W,C] (C = 1, 3 or 4; 0..1) -> uint8 RGB frames [B,H,W,3]."""
    if hasattr(image, "detach"):
        array = image.detach().to("cpu").float().numpy()
    else:
        array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4) or 0 in array.shape:
        raise UserFacingError(
            f"expected an IMAGE batch [B,H,W,3], got shape {tuple(array.shape)}; connect an image or video output"
        )
    if not np.isfinite(array).all():
        raise UserFacingError("the IMAGE input contains NaN/infinite pixels; check the node that produced it")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        array = array[..., :3]  # alpha is not part of a video frame
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def audio_to_comfy(wave: np.ndarray, sample_rate: int) -> dict:
    """Mono float32 samples -> ComfyUI AUDIO dict with waveform [1,1,S]."""
    import torch

    wave = np.ascontiguousarray(np.asarray(wave, dtype=np.float32).reshape(-1))
    return {"waveform": torch.from_numpy(wave.copy()).reshape(1, 1, -1), "sample_rate": int(sample_rate)}


def comfy_audio_to_wave(audio: dict) -> tuple[np.ndarray, int]:
    """ComfyUI AUDIO dict -> (mono float32 samples at the dict's rate, sample_rate).

    Channels are mixed as for files (``audio.planar_to_mono``); only the first item of a batch is used (the pipeline drives one clip).
    """
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise UserFacingError('expected an AUDIO input ({"waveform": [B,C,S], "sample_rate": int}); connect a Load Audio node')
    waveform = audio["waveform"]
    array = waveform.detach().to("cpu").float().numpy() if hasattr(waveform, "detach") else np.asarray(waveform, np.float32)
    if array.ndim == 1:
        array = array[None, None]
    elif array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise UserFacingError(f"AUDIO waveform must have shape [B,C,S], got {tuple(array.shape)}")
    rate = int(audio["sample_rate"])
    if rate <= 0:
        raise UserFacingError(f"AUDIO sample_rate must be positive, got {audio['sample_rate']}")

    return planar_to_mono(array[0], rate), rate


def is_comfy_video(value) -> bool:
    """True for ComfyUI VIDEO objects (duck-typed: the pack never imports ComfyUI here)."""
    return hasattr(value, "get_components") and callable(value.get_components)
