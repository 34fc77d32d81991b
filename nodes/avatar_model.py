"""Load Avatar Model: a checkpoint from models/avatar (or, on request, the Hugging Face Hub)."""
from __future__ import annotations

from ..errors import UserFacingError
from ..model.checkpoint import (DTYPES, SHIPPED_MODEL, SHIPPED_MODEL_NAME, load_checkpoint, read_checkpoint_metadata,
                                resolve_checkpoint, shipped_model_path)
from ..sparse_attention import dispatch
from . import _comfy, _models

CATEGORY = "sparse-avatar"
# "naive" = the plain-PyTorch definition. "reference" is its old name, listed last only so saved
# workflows that chose it still validate; dispatch maps it to "naive" with a one-time warning.
ATTENTION_CHOICES = ("auto", "triton", "flex", "xformers", "dense", "naive", "reference")


def _comfyui_attention_default() -> str:
    """The backend ComfyUI's own attention flags ask for (auto outside ComfyUI)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return "auto"
    return dispatch.backend_for_comfyui_flags(args)


class LoadAvatarModel:
    """Load the avatar generator once; every sampler node downstream shares it."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("AVATAR_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The avatar model (DiT + latent codec), managed by ComfyUI's model memory manager.",)
    FUNCTION = "load"
    DESCRIPTION = "Loads a sparse-avatar checkpoint (.safetensors) from models/avatar, or from the Hugging Face Hub when asked."

    @classmethod
    def INPUT_TYPES(cls):
        _models.register_folders()
        return {
            "required": {
                "checkpoint": (_checkpoint_choices(), {
                    "tooltip": f"Checkpoint file in ComfyUI/models/avatar. {SHIPPED_MODEL_NAME} (first) is the model that ships "
                               "with the pack: trained on Avatar World only, a starting point for Train Avatar; on a real "
                               "person it needs Train Avatar first."}),
                "dtype": (("auto",) + tuple(DTYPES), {"default": "auto",
                          "tooltip": "Weight precision. auto = bf16 on GPUs that support it, fp32 on CPU."}),
                "attention": (ATTENTION_CHOICES, {"default": "auto",
                              "tooltip": "Sparse reference attention backend. auto = fastest available (fused "
                                         "Triton on CUDA), following ComfyUI's --use-*-attention flags."}),
            },
            "optional": {
                "hub_repo": ("STRING", {"default": "", "tooltip": "Instead of the file: a Hugging Face repo id "
                             "'owner/repo' or 'owner/repo/file.safetensors'. Needs 'allow_download'."}),
                "allow_download": ("BOOLEAN", {"default": False, "tooltip": "Allow fetching hub_repo into "
                                   "models/avatar. Off = never touch the network."}),
            },
        }

    def load(self, checkpoint, dtype="auto", attention="auto", hub_repo="", allow_download=False):
        _comfy.check_interrupted()
        models_dir = _models.folder(_models.AVATAR_FOLDER)
        if hub_repo.strip():
            path = resolve_checkpoint(hub_repo.strip(), models_dir, allow_download=bool(allow_download))
        else:
            path = _checkpoint_path(checkpoint)
            if path is None:
                raise UserFacingError(_not_found(checkpoint))
        device = _models.compute_device()
        chosen_dtype = _models.default_dtype(device) if dtype == "auto" else dtype
        # Load on the CPU: ComfyUI's memory manager moves it to the GPU when a sampler needs it.
        model = load_checkpoint(path, dtype=chosen_dtype, device="cpu")
        model.eval()
        model.set_attention_backend(_comfyui_attention_default() if attention == "auto" else attention)
        return (_models.AvatarModelHandle(model, str(path)),)

    # Naming 'checkpoint' here makes ComfyUI skip its combo check for it, so this checks what that
    # did (the file is in models/avatar or is the shipped model) and more: the file is a
    # sparse-avatar checkpoint (its header's metadata; no weights read). A bad choice is refused
    # with HTTP 400 before anything runs instead of failing once the graph has started.
    @classmethod
    def VALIDATE_INPUTS(cls, checkpoint, hub_repo=""):
        if isinstance(hub_repo, str) and hub_repo.strip():
            return True  # the hub's file is checked when it is fetched
        try:
            path = _checkpoint_path(checkpoint)
            if path is None:
                return _not_found(checkpoint)
            read_checkpoint_metadata(path)
        except UserFacingError as error:
            return str(error)
        return True


def _checkpoint_path(checkpoint) -> str | None:
    """The file a 'checkpoint' choice names (the user's copy in models/avatar first), or None."""
    if not isinstance(checkpoint, str) or not checkpoint:
        return None
    path = _models.full_path(_models.AVATAR_FOLDER, checkpoint)
    if path is None and checkpoint == SHIPPED_MODEL_NAME:
        path = shipped_model_path()
    return None if path is None else str(path)


def _not_found(checkpoint) -> str:
    return (f"checkpoint {checkpoint!r} not found in {_models.folder(_models.AVATAR_FOLDER)}; put a sparse-avatar "
            ".safetensors there, or fill in hub_repo.")


def _checkpoint_choices() -> list[str]:
    """The shipped model first, then the files in models/avatar (a file of the same name there
    is the user's copy and wins when loading)."""
    files = [name for name in _models.list_files(_models.AVATAR_FOLDER) if name != SHIPPED_MODEL_NAME]
    return ([SHIPPED_MODEL_NAME] if SHIPPED_MODEL.is_file() else []) + files or ["(put a .safetensors in models/avatar)"]


NODE_CLASS_MAPPINGS = {"SparseAvatarLoadModel": LoadAvatarModel}
NODE_DISPLAY_NAME_MAPPINGS = {"SparseAvatarLoadModel": "Load Avatar Model"}
