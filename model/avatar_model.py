"""AvatarModel: the DiT together with its config and latent codec — the object a checkpoint
loads into and every pipeline function takes. Conversion between user data (uint8 frames,
per-frame speech features) and model tensors happens here, once."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn

from ..errors import UserFacingError
from .codecs import LatentCodec, codec_for_config
from .configs import ModelConfig
from .dit import AvatarDiT


class AvatarModel(nn.Module):
    def __init__(self, config: ModelConfig, codec: LatentCodec | None = None, *, training_stage: str = "init") -> None:
        super().__init__()
        self.config = config
        self.codec = codec if codec is not None else codec_for_config(config)
        self.dit = AvatarDiT(config)
        self.training_stage = training_stage
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def set_attention_backend(self, backend: str) -> None:
        """"auto" | "naive" | "dense" | "flex" | "triton" | "xformers" (see sparse_attention;
        "reference" is a deprecated alias of "naive")."""
        self.dit.attention_backend = backend

    def fingerprint(self) -> str:
        """Short id of these weights, stored in identities so they are not used with another model.
        Hashes the config and a strided sample of every tensor (cheap even for billions of weights)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self.config.to_json().encode())
            for name, tensor in sorted(self.dit.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 257)][:257].float().cpu().numpy().tobytes()
                digest.update(name.encode() + str(tuple(tensor.shape)).encode() + sample)
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def forget_fingerprint(self) -> None:
        """Call after changing weights (training) so the next fingerprint is recomputed."""
        self._fingerprint = None

    # -- conversions ------------------------------------------------------------------------------

    def frames_to_tensor(self, frames) -> torch.Tensor:
        """np.uint8 [T, H, W, 3] (or float tensor in 0..1) at the model's frame size -> float [T, H, W, 3] on the model device."""
        if isinstance(frames, np.ndarray):
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
                raise UserFacingError(f"frames must be uint8 [T, H, W, 3]; got {frames.dtype} {frames.shape}.")
            tensor = torch.from_numpy(np.ascontiguousarray(frames)).float() / 255.0
        elif isinstance(frames, torch.Tensor):
            tensor = frames.float()
        else:
            raise UserFacingError(f"frames must be a numpy uint8 array or a tensor; got {type(frames).__name__}.")
        size = self.config.frame_size
        if tuple(tensor.shape[1:3]) != (size, size):
            raise UserFacingError(f"frames are {tensor.shape[1]}x{tensor.shape[2]}; this model renders {size}x{size} face crops. Crop/resize them first (media.crop_faces).")
        return tensor.to(self.device)

    def features_to_tensor(self, features, n_frames: int) -> torch.Tensor:
        """Speech features [T, F] -> float tensor [T, F] on the model device, checked against the config."""
        tensor = torch.as_tensor(np.asarray(features, dtype=np.float32) if not isinstance(features, torch.Tensor) else features).float()
        if tensor.dim() != 2 or tensor.shape[1] != self.config.speech_feature_dim:
            raise UserFacingError(
                f"speech features must be [frames, {self.config.speech_feature_dim}] ({self.config.speech_feature_id}); got {tuple(tensor.shape)}. "
                "Compute them with media.speech_features."
            )
        if tensor.shape[0] != n_frames:
            raise UserFacingError(f"got {tensor.shape[0]} speech-feature frames for {n_frames} video frames; they must match one to one.")
        if not torch.isfinite(tensor).all():
            raise UserFacingError("speech features contain NaN or infinity; check the audio file.")
        return tensor.to(self.device)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """float [B, T, H, W, 3] in 0..1 -> latents [B, C, T, h, w] in the model dtype."""
        return self.codec.encode(frames).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents.float())

    def resolution_shift(self, tokens_per_frame: int) -> float:
        """SD3-style time shift: more tokens per frame -> spend more steps at high noise."""
        return max(1.0, math.sqrt(tokens_per_frame / self.config.shift_base_tokens))

    def tokens_per_frame(self) -> int:
        _, ph, pw = self.config.patch_size
        side = self.config.frame_size // self.codec.spatial_factor
        return (side // ph) * (side // pw)
