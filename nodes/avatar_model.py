"""Load Avatar Model: a checkpoint from models/avatar (or, on request, the Hugging Face Hub)."""
from __future__ import annotations

from ..errors import UserFacingError
from ..model.checkpoint import DTYPES, load_checkpoint, resolve_checkpoint
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
                "checkpoint": (_models.list_files(_models.AVATAR_FOLDER) or ["(put a .safetensors in models/avatar)"], {
                    "tooltip": "Checkpoint file in ComfyUI/models/avatar."}),
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
            path = _models.full_path(_models.AVATAR_FOLDER, checkpoint)
            if path is None:
                raise UserFacingError(f"checkpoint {checkpoint!r} not found in {models_dir}; put a sparse-avatar "
                                      ".safetensors there, or fill in hub_repo.")
        device = _models.compute_device()
        chosen_dtype = _models.default_dtype(device) if dtype == "auto" else dtype
        # Load on the CPU: ComfyUI's memory manager moves it to the GPU when a sampler needs it.
        model = load_checkpoint(path, dtype=chosen_dtype, device="cpu")
        model.eval()
        model.set_attention_backend(_comfyui_attention_default() if attention == "auto" else attention)
        return (_models.AvatarModelHandle(model, str(path)),)


NODE_CLASS_MAPPINGS = {"SparseAvatarLoadModel": LoadAvatarModel}
NODE_DISPLAY_NAME_MAPPINGS = {"SparseAvatarLoadModel": "Load Avatar Model"}
