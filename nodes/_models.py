"""ComfyUI model folders and memory management for the avatar model, imported lazily.

Folders: ``models/avatar`` (checkpoints), ``models/avatar_identities`` (extracted identities) and
``models/avatar_loras`` (personality LoRAs from Train Avatar), registered with ``folder_paths`` so
extra_model_paths.yaml works for them too.

Memory: the AvatarModel is wrapped in a ComfyUI ``ModelPatcher`` so ComfyUI's memory manager
loads it onto the GPU before sampling and can offload it when another model needs the memory.
The patcher writes bookkeeping attributes (``device``, ``model_lowvram``, …) onto the module it
manages; AvatarModel exposes ``device`` as a read-only property, so the patcher manages a plain
container module holding it. Outside ComfyUI everything falls back to plain torch on the best
available device.
"""
from __future__ import annotations

import os

import torch
from torch import nn

AVATAR_FOLDER = "avatar"
IDENTITY_FOLDER = "avatar_identities"
LORA_FOLDER = "avatar_loras"
_EXTENSIONS = {".safetensors"}


def register_folders() -> None:
    """Add models/avatar, models/avatar_identities and models/avatar_loras to ComfyUI's folder registry (idempotent)."""
    try:
        import folder_paths
    except ImportError:
        return
    for name in (AVATAR_FOLDER, IDENTITY_FOLDER, LORA_FOLDER):
        if name not in folder_paths.folder_names_and_paths:
            path = os.path.join(folder_paths.models_dir, name)
            folder_paths.folder_names_and_paths[name] = ([path], set(_EXTENSIONS))


def folder(name: str) -> str:
    """First path of a registered model folder (created when missing); ./models/<name> outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        path = os.path.join(os.getcwd(), "models", name)
    else:
        register_folders()
        path = folder_paths.get_folder_paths(name)[0]
    os.makedirs(path, exist_ok=True)
    return path


def list_files(name: str) -> list[str]:
    try:
        import folder_paths
    except ImportError:
        root = folder(name)
        return sorted(entry for entry in os.listdir(root) if entry.endswith(tuple(_EXTENSIONS)))
    register_folders()
    return folder_paths.get_filename_list(name)


def full_path(name: str, filename: str) -> str | None:
    try:
        import folder_paths
    except ImportError:
        root = os.path.realpath(folder(name))
        path = os.path.realpath(os.path.join(root, filename))
        inside = os.path.commonpath([root, path]) == root
        return path if inside and os.path.isfile(path) else None
    register_folders()
    return folder_paths.get_full_path(name, filename)


def compute_device() -> torch.device:
    try:
        import comfy.model_management
    except ImportError:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return comfy.model_management.get_torch_device()


def default_dtype(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


class _PatcherContainer(nn.Module):
    """What ComfyUI's ModelPatcher manages: a plain module holding the AvatarModel."""

    def __init__(self, avatar: nn.Module) -> None:
        super().__init__()
        self.avatar = avatar
        self.device = next(avatar.parameters()).device

    def get_dtype(self):
        return next(self.avatar.parameters()).dtype


class AvatarModelHandle:
    """The AVATAR_MODEL value passed between nodes: the model plus its ComfyUI patcher."""

    def __init__(self, model, name: str) -> None:
        self.model = model
        self.name = name
        self._patcher = None
        try:
            import comfy.model_management
            import comfy.model_patcher
        except ImportError:
            return
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        self._patcher = comfy.model_patcher.ModelPatcher(
            _PatcherContainer(model), load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(), size=size)

    def ready(self, memory_required: int = 0):
        """The AvatarModel on the compute device (through ComfyUI's memory manager when present).

        memory_required: bytes the coming work needs beside the weights (the identity a render
        moves to the GPU, the reference pass's activations): ComfyUI then offloads other models
        until that much is free too, instead of the work running out of memory on a small card."""
        if self._patcher is not None:
            import comfy.model_management

            comfy.model_management.load_models_gpu([self._patcher], memory_required=int(memory_required))
        else:
            device = compute_device()
            if self.model.device != device:
                self.model.to(device)
        return self.model

    def __repr__(self) -> str:
        return f"AvatarModelHandle({self.name!r}, {self.model.config.name})"
