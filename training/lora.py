"""LoRA for personality fine-tuning (stage 3): small ``.safetensors`` tied to its base checkpoint.

``apply_lora`` replaces selected ``nn.Linear`` layers of the DiT by ``LoRALinear`` (frozen base
weight + trainable low-rank ``up @ down``, ``up`` zero-initialised so the model is unchanged at
start). Targets default to the attention and MLP projections of every block: the layers that
carry "how this person looks and moves"; embedders, the final layer and norms stay shared.

The file holds only the ``down``/``up`` tensors under the wrapped layer's name, plus metadata:
format, rank, alpha, targets and the base model's fingerprint (``AvatarModel.fingerprint()``).
``load_lora`` refuses a LoRA made for another base, because low-rank deltas are meaningless on
other weights.
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UserFacingError
from ..files import open_safetensors, save_safetensors

LORA_FORMAT = "sparse-avatar-lora"
LORA_VERSION = "1"
DEFAULT_TARGETS = ("blocks.*.qkv", "blocks.*.attention_out", "blocks.*.reference_kv", "blocks.*.audio_q", "blocks.*.audio_out", "blocks.*.mlp.*")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.down = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.up = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.down, a=5**0.5)

    @property
    def weight(self) -> torch.Tensor:  # code that reads .weight (dtype/device checks) keeps working
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.t().to(x.dtype)) @ self.up.t().to(x.dtype) * (self.alpha / self.rank)

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.up @ self.down) * (self.alpha / self.rank)


def _matches(name: str, targets) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in targets)


def apply_lora(dit: nn.Module, *, rank: int = 16, alpha: float | None = None, targets=DEFAULT_TARGETS) -> list[str]:
    """Freeze ``dit`` and wrap every matching nn.Linear. Returns the wrapped layer names."""
    if rank < 1:
        raise UserFacingError(f"LoRA rank must be >= 1 (got {rank}).")
    alpha = float(alpha if alpha is not None else rank)
    dit.requires_grad_(False)
    wrapped = []
    for name, module in list(dit.named_modules()):
        if isinstance(module, nn.Linear) and _matches(name, targets):
            parent_name, _, child = name.rpartition(".")
            parent = dit.get_submodule(parent_name) if parent_name else dit
            setattr(parent, child, LoRALinear(module, rank, alpha))
            wrapped.append(name)
    if not wrapped:
        raise UserFacingError(f"no layer of the model matches the LoRA targets {list(targets)}; check the target patterns.")
    return wrapped


def lora_layers(dit: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in dit.named_modules() if isinstance(module, LoRALinear)}


def save_lora(dit: nn.Module, path: str | os.PathLike, *, base_fingerprint: str, extra_metadata: dict | None = None) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserFacingError(f"LoRA files are .safetensors; got {path.name!r}.")
    layers = lora_layers(dit)
    if not layers:
        raise UserFacingError("the model has no LoRA layers to save; apply_lora first.")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.down"] = layer.down.detach().cpu().contiguous()
        tensors[f"{name}.up"] = layer.up.detach().cpu().contiguous()
    any_layer = next(iter(layers.values()))
    metadata = {
        "format": LORA_FORMAT, "version": LORA_VERSION, "rank": str(any_layer.rank), "alpha": str(any_layer.alpha),
        "layers": json.dumps(sorted(layers)), "base_fingerprint": base_fingerprint, **(extra_metadata or {}),
    }
    return save_safetensors(tensors, path, metadata)


def load_lora(dit: nn.Module, path: str | os.PathLike, *, base_fingerprint: str, merge: bool = True) -> list[str]:
    """Put a LoRA onto its base DiT. ``merge``: fold it into the base weights (no runtime cost);
    otherwise wrap the layers (it can then be trained further). Returns the affected layers."""
    path = Path(path)
    with open_safetensors(path, what="LoRA file", if_missing="Pass a LoRA made by training with --lora-rank (or Train Avatar).",
                          if_damaged="The file is damaged or not a sparse-avatar LoRA; train or download it again.") as reader:
        metadata = reader.metadata
        tensors = reader.get_all()
    if metadata.get("format") != LORA_FORMAT:
        raise UserFacingError(f"{path} is not a sparse-avatar LoRA (format {metadata.get('format')!r}).")
    if metadata.get("base_fingerprint") != base_fingerprint:
        raise UserFacingError(
            f"{path.name} was trained on base model {metadata.get('base_fingerprint')} but this model is {base_fingerprint}; "
            "load the base checkpoint it was made for."
        )
    try:
        rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
        names = json.loads(metadata["layers"])
        if rank < 1 or not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError("rank or layer list out of range")
    except (KeyError, ValueError, TypeError) as error:
        raise UserFacingError(f"{path.name} has damaged LoRA metadata ({type(error).__name__}: {error}); train or download it again.") from None
    # Everything is checked before the first layer changes: a bad file never leaves a half-merged model.
    planned = []
    for name in names:
        try:
            module = dit.get_submodule(name)
        except AttributeError:
            raise UserFacingError(f"{path.name} adapts layer {name!r}, which this model does not have.") from None
        base = module.base if isinstance(module, LoRALinear) else module
        if not isinstance(base, nn.Linear):
            raise UserFacingError(f"{path.name} adapts {name!r}, which is not a linear layer of this model; it belongs to another model.")
        down, up = tensors.get(f"{name}.down"), tensors.get(f"{name}.up")
        if down is None or up is None:
            raise UserFacingError(f"{path.name} lacks the weights of layer {name!r}; the file is damaged: train or download it again.")
        if down.shape != (rank, base.in_features) or up.shape != (base.out_features, rank):
            raise UserFacingError(f"{path.name}: layer {name!r} has the wrong shape for this model.")
        planned.append((name, module, base, down, up))
    for name, module, base, down, up in planned:
        if merge:
            with torch.no_grad():
                base.weight += (up.to(base.weight) @ down.to(base.weight)) * (alpha / rank)
            if isinstance(module, LoRALinear):
                parent_name, _, child = name.rpartition(".")
                setattr(dit.get_submodule(parent_name) if parent_name else dit, child, base)
        else:
            if not isinstance(module, LoRALinear):
                parent_name, _, child = name.rpartition(".")
                module = LoRALinear(base, rank, alpha)
                setattr(dit.get_submodule(parent_name) if parent_name else dit, child, module)
            with torch.no_grad():
                module.down.copy_(down)
                module.up.copy_(up)
    return names
