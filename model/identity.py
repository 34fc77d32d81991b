"""Identity: everything the generator needs from a reference video, computed once and cached.

``extract_identity`` runs the reference pass (linear in the reference length, see dit.py) and
keeps, per layer:
  - dynamic identity: the reference K/V of every reference token, plus block centroids for
    routing (talking rhythm, habitual expressions, blinks, head motion live in *which moments*
    of the reference a query finds);
  - static identity: S static tokens (K/V), a resampling of all reference tokens by learned
    queries, trained to be time-invariant (teeth, skin, geometry, hair, accessories).

``save_identity`` / ``load_identity`` store it as .safetensors (exact round trip) with metadata:
source hash, fps, crop track, the model's fingerprint. ``mix_identity(a, b)`` takes static
identity from A and dynamic identity from B.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserFacingError
from ..files import open_safetensors, save_safetensors
from .dit import LayerCache

IDENTITY_FORMAT = "sparse-avatar-identity"
IDENTITY_VERSION = "1"


@dataclass
class Identity:
    """Per-layer tensors, stacked over layers: static_k/v [L, B, Hkv, S, d], ref_k/v
    [L, B, Hkv, Lr, d], centroids [L, B, Hkv, nR, d], ref_lengths [B] (tokens). metadata: str -> str
    (model_fingerprint, fps, source_hash, crop_track JSON, reference_frames, ...)."""

    static_k: torch.Tensor
    static_v: torch.Tensor
    ref_k: torch.Tensor
    ref_v: torch.Tensor
    centroids: torch.Tensor
    ref_lengths: torch.Tensor
    metadata: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return self.ref_k.shape[0]

    @property
    def fps(self) -> float | None:
        value = self.metadata.get("fps")
        return float(value) if value not in (None, "") else None

    def layer_caches(self, *, device=None, dtype=None) -> list[LayerCache]:
        def cast(tensor):
            return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() and dtype is not None else tensor.dtype)

        lengths = cast(self.ref_lengths)
        return [
            LayerCache(cast(self.static_k[i]), cast(self.static_v[i]), cast(self.ref_k[i]), cast(self.ref_v[i]), cast(self.centroids[i]), lengths)
            for i in range(self.depth)
        ]

    def device_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the identity takes on the compute device once ``layer_caches`` moved it there (its
        floating-point tensors in ``dtype``): what a render holds beside the model's weights."""
        return sum(tensor.numel() * (dtype.itemsize if dtype is not None and tensor.is_floating_point() else tensor.element_size())
                   for tensor in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "static_k": self.static_k, "static_v": self.static_v, "ref_k": self.ref_k, "ref_v": self.ref_v,
            "centroids": self.centroids, "ref_lengths": self.ref_lengths,
        }


def identity_from_caches(caches: list[LayerCache], metadata: dict | None = None) -> Identity:
    def stack(name):
        return torch.stack([getattr(cache, name).detach() for cache in caches])

    lengths = caches[0].ref_lengths
    if lengths is None:
        lengths = torch.full((caches[0].ref_k.shape[0],), caches[0].ref_k.shape[2], dtype=torch.long)
    return Identity(
        static_k=stack("static_k"), static_v=stack("static_v"), ref_k=stack("ref_k"), ref_v=stack("ref_v"),
        centroids=stack("centroids"), ref_lengths=lengths.detach().cpu().long(), metadata=dict(metadata or {}),
    )


# Reference tokens per chunk of the reference pass: 256 frames of 16x16 tokens (10 s at 25 fps).
REFERENCE_CHUNK_TOKENS = 1 << 16
# GPU working memory of one chunk, in bytes per token and hidden channel, beyond the weights:
# measured on an H200 under a 12 GiB cap (bench/results/vram.md: compact 1.16, small 1.83, base
# 5.24 GiB peak at 65 536 tokens in bf16 is 31-36 bytes per token-channel); 40 leaves a margin.
_REFERENCE_PASS_BYTES_PER_TOKEN_CHANNEL = 40


def reference_pass_memory_bytes(config) -> int:
    """What the reference pass needs on the GPU beside the weights (the chunk's activations and one
    layer's K/V): what a memory manager is asked to free before ``extract_identity``."""
    return REFERENCE_CHUNK_TOKENS * config.hidden * _REFERENCE_PASS_BYTES_PER_TOKEN_CHANNEL


@torch.no_grad()
def extract_identity(model, reference_frames, reference_audio=None, *, fps: float | None = None, metadata: dict | None = None) -> Identity:
    """Reference pass. reference_frames: np.uint8 [T, H, W, 3] face crops at the model's frame size
    (or float tensor [T, H, W, 3] in 0..1); reference_audio: the reference's own speech features
    [T, F] (None when the reference is silent). Returns an Identity on the CPU."""
    frames = model.frames_to_tensor(reference_frames)
    if frames.shape[0] < 1:
        raise UserFacingError("the reference video has no frames; pass a clip of at least one second.")
    latents = model.encode_frames(frames[None])
    audio = None
    if reference_audio is not None:
        audio = model.features_to_tensor(reference_audio, frames.shape[0])[None]
    # In chunks of frames, each layer's K/V kept on the CPU as it is made (where the Identity lives
    # anyway); the caches are then made one layer at a time on the model's device. The GPU holds
    # one chunk's activations and one layer's K/V instead of the whole reference's.
    reference_kv = model.dit.encode_reference(latents, audio, chunk_tokens=REFERENCE_CHUNK_TOKENS, store_device="cpu")
    caches = []
    for index, (ref_k, ref_v) in enumerate(reference_kv):
        cache = model.dit.layer_cache(index, ref_k.to(latents.device), ref_v.to(latents.device))
        caches.append(LayerCache(cache.static_k.cpu(), cache.static_v.cpu(), ref_k, ref_v, cache.centroids.cpu()))
    info = {
        "format": IDENTITY_FORMAT, "version": IDENTITY_VERSION, "model_fingerprint": model.fingerprint(),
        "reference_frames": str(frames.shape[0]), "frame_size": str(frames.shape[1]), "has_audio": str(reference_audio is not None).lower(),
    }
    if fps is not None:
        info["fps"] = repr(float(fps))
    for key, value in (metadata or {}).items():
        info[key] = value if isinstance(value, str) else json.dumps(value)
    identity = identity_from_caches(caches, info)
    return Identity(**{name: tensor.cpu() for name, tensor in identity.tensors().items()}, metadata=identity.metadata)


def mix_identity(static_source: Identity, dynamic_source: Identity) -> Identity:
    """Static identity (appearance) from A, dynamic identity (reference K/V: motion, habits) from B."""
    a, b = static_source, dynamic_source
    if a.metadata.get("model_fingerprint") != b.metadata.get("model_fingerprint"):
        raise UserFacingError("the two identities were extracted with different models; extract both with the same checkpoint before mixing.")
    if a.static_k.shape[0] != b.ref_k.shape[0] or a.static_k.shape[1] != b.ref_k.shape[1]:
        raise UserFacingError("the two identities have different layer counts or batch sizes; extract both with the same checkpoint, one reference each.")
    metadata = dict(b.metadata)
    metadata["static_source_hash"] = a.metadata.get("source_hash", "")
    metadata["dynamic_source_hash"] = b.metadata.get("source_hash", "")
    metadata["mixed"] = "true"
    return Identity(a.static_k, a.static_v, b.ref_k, b.ref_v, b.centroids, b.ref_lengths, metadata)


def save_identity(identity: Identity, path) -> Path:
    """Write atomically as .safetensors (tensors as they are, metadata as strings)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserFacingError(f"identity files are .safetensors; got {path.name!r}. Name the file '<name>.safetensors'.")
    metadata = {str(k): str(v) for k, v in identity.metadata.items()}
    metadata["format"], metadata["version"] = IDENTITY_FORMAT, IDENTITY_VERSION
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in identity.tensors().items()}
    return save_safetensors(tensors, path, metadata)


def load_identity(path) -> Identity:
    path = Path(path)
    with open_safetensors(path, what="identity file", if_missing="Extract one with 'Extract Identity' / save_identity first.",
                          if_damaged="The file is damaged or not an identity; extract it again.") as reader:
        metadata = dict(reader.metadata)
        tensors = reader.get_all()
    if metadata.get("format") != IDENTITY_FORMAT:
        raise UserFacingError(f"{path.name} is not a sparse-avatar identity (format {metadata.get('format')!r}); pass a file made by save_identity.")
    missing = [name for name in ("static_k", "static_v", "ref_k", "ref_v", "centroids", "ref_lengths") if name not in tensors]
    if missing:
        raise UserFacingError(f"{path.name} lacks {', '.join(missing)}; the identity file is damaged. Extract it again.")
    return Identity(**tensors, metadata=metadata)
