"""The Sparse-Reference DiT and everything around it: configs, latent codecs, identity,
flow matching, checkpoints and the long-video pipeline. See README.md for the API."""
from .avatar_model import AvatarModel
from .checkpoint import load_checkpoint, new_model, read_checkpoint_metadata, resolve_checkpoint, save_checkpoint
from .codecs import ComfyVAECodec, LatentCodec, PixelCodec, codec_for_config
from .configs import CONFIGS, ModelConfig, get_config
from .flow import SAMPLERS, SamplingCancelled, guided_velocity, sample_flow, training_step
from .identity import Identity, extract_identity, load_identity, mix_identity, save_identity
from .pipeline import RenderProgress, chunk_plan, default_dub_mask, prepare_reference, render, render_files

__all__ = [
    "AvatarModel", "CONFIGS", "ComfyVAECodec", "Identity", "LatentCodec", "ModelConfig", "PixelCodec", "RenderProgress",
    "SAMPLERS", "SamplingCancelled", "chunk_plan", "codec_for_config", "default_dub_mask", "extract_identity", "get_config",
    "guided_velocity", "load_checkpoint", "load_identity", "mix_identity", "new_model", "prepare_reference",
    "read_checkpoint_metadata", "render", "render_files", "resolve_checkpoint", "sample_flow", "save_checkpoint",
    "save_identity", "training_step",
]
