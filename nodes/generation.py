"""Sparse Reference Sampler (identity + speech -> LATENT) and Decode Avatar Video (LATENT -> IMAGE, VIDEO).

LATENT is the core dict ``{"samples": [1, C, T, h, w]}``; the sampler adds a ``sparse_avatar`` entry
with what decoding needs (fps, the driving audio, the mode and, when a source is connected, its
``PreparedReference``), so the two nodes stay independent of each other's internals. Both run the
library's steps (``model.pipeline``: render -> decode_frames -> composite_frames), the same ones
``render_files`` (the CLI) runs.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import UserFacingError
from ..media import write_video
from .comfy_types import audio_to_comfy, frames_to_comfy_image
from ..model.flow import SAMPLERS, MAX_STEPS, SamplingCancelled
from ..model.identity import Identity
from ..model.pipeline import MODES, PreparedReference, composite_frames, decode_frames, features_for_model, render
from . import _comfy
from .reference_video import prepared_reference

CATEGORY = "sparse-avatar"
_PREVIEW_SIDE = 256
PREVIEW_PREFIX = "sparse_avatar_preview"

logger = logging.getLogger(__name__)


def _preview_image(avatar, latents: torch.Tensor):
    """The middle frame of the chunk being sampled, as a PIL image for ComfyUI's node preview."""
    from PIL import Image

    middle = latents[:, :, latents.shape[2] // 2: latents.shape[2] // 2 + 1]
    frame = avatar.decode_latents(middle)[0, 0].clamp(0, 1).mul(255).round().byte().cpu().numpy()
    return Image.fromarray(frame)


class SparseReferenceSampler:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The generated video latents (one latent frame per video frame) for Decode Avatar Video.",)
    FUNCTION = "sample"
    DESCRIPTION = ("Generates the talking-head video for the whole driving speech, in overlapping chunks that all "
                   "attend to the same full reference. generate = new performance in the person's own style; "
                   "dub = keep the source video's head motion and re-render the lower face.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("AVATAR_MODEL", {"tooltip": "From Load Avatar Model."}),
                "identity": ("AVATAR_IDENTITY", {"tooltip": "From Extract / Load / Mix Identity."}),
                "speech": ("SPEECH_FEATURES", {"tooltip": "From Encode Speech: one feature vector per output frame."}),
                "mode": (MODES, {"default": "generate", "tooltip": "generate: new head motion and expressions; "
                                 "dub: the source's motion, lower face re-rendered (needs 'source')."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": MAX_STEPS, "tooltip": "Sampler steps per chunk "
                                  "(distilled checkpoints need 4-8)."}),
                "sampler": (SAMPLERS, {"default": "euler", "tooltip": "ODE solver for the flow."}),
                "audio_guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                             "tooltip": "Classifier-free guidance on the speech (1 = off). Higher = "
                                                        "stronger lip motion."}),
                "reference_guidance": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                                 "tooltip": "Guidance on the reference identity (1 = off). Higher = "
                                                            "closer likeness."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Same seed and inputs = the same video."}),
                "chunk_frames": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "Frames generated at once; "
                                         "0 = the model's default. Longer = more memory."}),
                "overlap_frames": ("INT", {"default": -1, "min": -1, "max": 256, "tooltip": "Frames carried over "
                                           "between chunks for continuous motion; -1 = the model's default."}),
            },
            "optional": {
                "source": ("REFERENCE_VIDEO", {"tooltip": "Dub mode: the video whose lower face is re-rendered "
                                               "(usually the same Load Reference Video). Generate mode (optional): "
                                               "the framing the generated face is placed back into, so Decode "
                                               "Avatar Video can output full frames."}),
            },
        }

    def sample(self, model, identity, speech, mode="generate", steps=20, sampler="euler", audio_guidance=1.0,
               reference_guidance=1.0, seed=0, chunk_frames=0, overlap_frames=-1, source=None):
        if not isinstance(identity, Identity):
            raise UserFacingError("'identity' must come from Extract, Load or Mix Identity.")
        if not isinstance(speech, dict) or "features" not in speech:
            raise UserFacingError("'speech' must come from Encode Speech.")
        if mode not in MODES:
            raise UserFacingError(f"unknown mode {mode!r}; choose 'generate' or 'dub'.")
        if mode == "dub" and source is None:
            raise UserFacingError("dub mode needs the source video: connect Load Reference Video to 'source'.")
        # The identity goes to the GPU beside the weights for the whole render (a 60 s reference of
        # `base` is ~9 GB): ask ComfyUI to make room for it too.
        avatar = model.ready(memory_required=identity.device_bytes(model.model.dtype))
        fps = float(speech["fps"])
        features = features_for_model(speech["features"], speech.get("feature_id", ""), speech.get("audio"), fps, avatar.config)
        prepared = prepared_reference(avatar, source) if source is not None else None
        if prepared is not None and abs(prepared.fps - fps) > 1e-3:
            logger.warning("Sparse Reference Sampler: the speech was encoded at %g fps but the source runs at %g fps; "
                           "connect Load Reference Video's fps to Encode Speech so the source plays at its own speed.",
                           fps, prepared.fps)
        source_inputs = prepared.render_inputs(mode, identity, len(features)) if prepared is not None else {}
        if mode == "dub":
            logger.info("Sparse Reference Sampler: dub mask: %s", prepared.dub_mask_source)

        progress = _comfy.progress_bar(100)

        def on_progress(state):
            preview = None
            if state.step == state.steps or state.step % 4 == 0:
                preview = ("JPEG", _preview_image(avatar, state.latents), _PREVIEW_SIDE)
            progress.update_absolute(int(round(state.fraction * 100)), 100, preview)

        def should_cancel() -> bool:
            _comfy.check_interrupted()  # raises ComfyUI's own interrupt exception
            return False

        try:
            latents = render(
                avatar, identity, features, mode=mode, steps=int(steps), sampler=sampler,
                audio_guidance=float(audio_guidance), reference_guidance=float(reference_guidance), seed=int(seed),
                chunk_frames=int(chunk_frames) or None, overlap_frames=None if overlap_frames < 0 else int(overlap_frames),
                fps=fps, progress=on_progress, should_cancel=should_cancel, output="latents", **source_inputs,
            )
        except SamplingCancelled:
            raise UserFacingError("sampling was cancelled") from None
        info = {"fps": fps, "audio": speech.get("audio"), "sample_rate": speech.get("sample_rate", 16000),
                "mode": mode, "reference": prepared}
        return ({"samples": latents.cpu().float(), "sparse_avatar": info},)


class DecodeAvatarVideo:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "VIDEO", "AUDIO")
    RETURN_NAMES = ("frames", "video", "audio")
    OUTPUT_TOOLTIPS = ("The video frames: with a source connected to the sampler, the face pasted back into the "
                       "source's full frames (generate and dub); otherwise the face crops.",
                       "A core VIDEO with the driving audio, for Save Video.",
                       "The driving audio, exactly as long as the frames.")
    FUNCTION = "decode"
    DESCRIPTION = ("Decodes the sampler's latents to frames; with a source connected to the sampler, pastes the face "
                   "back into the source video's full frames (looped ping-pong), in generate and dub mode. The node "
                   "shows the result as a video with its sound (a preview in ComfyUI's temp folder; Save Video keeps it).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("AVATAR_MODEL", {"tooltip": "The model that sampled the latents."}),
                "latent": ("LATENT", {"tooltip": "From Sparse Reference Sampler."}),
            },
            "optional": {
                "paste_back": ("BOOLEAN", {"default": True, "tooltip": "Paste the face crop back into the full source "
                                           "frames (needs the sampler's 'source'; off = the face crop only)."}),
                "color_match": ("BOOLEAN", {"default": True, "tooltip": "Match the crop's colours to the source "
                                            "around the seam when pasting back."}),
            },
        }

    def decode(self, model, latent, paste_back=True, color_match=True):
        info = latent.get("sparse_avatar") if isinstance(latent, dict) else None
        if info is None:
            raise UserFacingError("this LATENT was not made by Sparse Reference Sampler; connect its output.")
        avatar = model.ready()
        samples = latent["samples"]
        progress = _comfy.progress_bar(samples.shape[2])
        _comfy.check_interrupted()

        def on_batch(done: int, total: int) -> None:
            progress.update_absolute(done)
            _comfy.check_interrupted()

        frames = decode_frames(avatar, samples, on_batch=on_batch)
        prepared = info.get("reference")
        if isinstance(prepared, PreparedReference):
            frames = composite_frames(prepared, frames, mode=info.get("mode", "generate"), full_frame=bool(paste_back),
                                      color_match=bool(color_match))
        image = frames_to_comfy_image(frames)
        audio = info.get("audio")
        if audio is None:
            audio = np.zeros(int(round(len(frames) / info["fps"] * info["sample_rate"])), np.float32)
        audio = np.asarray(audio, np.float32)
        comfy_audio = audio_to_comfy(audio, int(info["sample_rate"]))
        # The web extension's inline player plays this mp4 (with the sound) from ComfyUI's temp folder.
        preview = write_video(_comfy.numbered_path(_comfy.temp_directory(), PREVIEW_PREFIX, ".mp4"), frames, info["fps"],
                              audio=audio, sample_rate=int(info["sample_rate"]))
        entry = _comfy.view_entry(str(preview))
        ui = {"sparse_avatar_video": [dict(entry, format="video/mp4", frame_rate=float(info["fps"]))]} if entry else {}
        return {"ui": ui, "result": (image, _comfy.make_video(image, info["fps"], comfy_audio), comfy_audio)}


NODE_CLASS_MAPPINGS = {
    "SparseAvatarSampler": SparseReferenceSampler,
    "SparseAvatarDecodeVideo": DecodeAvatarVideo,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SparseAvatarSampler": "Sparse Reference Sampler",
    "SparseAvatarDecodeVideo": "Decode Avatar Video",
}
