"""Identity nodes: Extract (reference video -> identity), Save / Load (.safetensors), Mix.

AVATAR_IDENTITY is a ``model.identity.Identity``: static tokens plus per-layer reference K/V and
routing centroids. Extracting it is the expensive, once-per-reference step; save it to reuse it.
"""
from __future__ import annotations

import os

from ..errors import UserFacingError
from .comfy_types import frames_to_comfy_image
from ..model.identity import load_identity, mix_identity, reference_pass_memory_bytes, save_identity
from ..model.pipeline import extract_reference_identity
from . import _comfy, _models
from .reference_video import prepared_reference

CATEGORY = "sparse-avatar/identity"


class ExtractIdentity:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("AVATAR_IDENTITY", "IMAGE")
    RETURN_NAMES = ("identity", "face_crops")
    OUTPUT_TOOLTIPS = ("Static tokens + per-layer reference keys/values of the whole reference, for the sampler.",
                       "The aligned face crops the model saw (for checking the face track).")
    FUNCTION = "extract"
    DESCRIPTION = ("Runs the reference pass once: face-tracks and crops the reference, then encodes every frame "
                   "(with the clip's own speech) into the identity the sampler attends to at every layer.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("AVATAR_MODEL", {"tooltip": "From Load Avatar Model."}),
            "reference": ("REFERENCE_VIDEO", {"tooltip": "From Load Reference Video."}),
            "max_frames": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                   "tooltip": "Use at most this many reference frames; 0 = all of them."}),
        }}

    def extract(self, model, reference, max_frames=0):
        _comfy.check_interrupted()
        avatar = model.ready(memory_required=reference_pass_memory_bytes(model.model.config))
        prepared = prepared_reference(avatar, reference, max_frames=max_frames or None)
        return extract_reference_identity(avatar, prepared), frames_to_comfy_image(prepared.crops)


class SaveIdentity:
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    DESCRIPTION = "Saves an identity as .safetensors in models/avatar_identities, to skip extraction next time."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity": ("AVATAR_IDENTITY", {"tooltip": "From Extract Identity or Mix Identity."}),
            "filename_prefix": ("STRING", {"default": "avatar", "tooltip": "File name start; a counter is appended. "
                                           "Letters, digits, '-', '_', '.' and spaces only."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix="avatar"):
        return _comfy.file_name_problem(filename_prefix) or True

    def save(self, identity, filename_prefix="avatar"):
        folder = _models.folder(_models.IDENTITY_FOLDER)
        path = save_identity(identity, _comfy.numbered_path(folder, filename_prefix, ".safetensors"))
        return {"ui": {"text": [os.path.basename(str(path))]}}


class LoadIdentity:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("AVATAR_IDENTITY",)
    RETURN_NAMES = ("identity",)
    FUNCTION = "load"
    DESCRIPTION = "Loads an identity saved by Save Identity from models/avatar_identities."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "identity_file": (_models.list_files(_models.IDENTITY_FOLDER) or ["(none saved yet)"], {
                "tooltip": "An identity in ComfyUI/models/avatar_identities."}),
        }}

    def load(self, identity_file):
        path = _models.full_path(_models.IDENTITY_FOLDER, identity_file)
        if path is None:
            raise UserFacingError(f"identity {identity_file!r} not found in models/avatar_identities; "
                                  "save one with Save Identity first.")
        return (load_identity(path),)


class MixIdentity:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("AVATAR_IDENTITY",)
    RETURN_NAMES = ("identity",)
    FUNCTION = "mix"
    DESCRIPTION = ("Static identity (teeth, skin, face geometry, hair, accessories) from A with dynamic identity "
                   "(talking rhythm, expressions, blinks, head motion) from B.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "static_from": ("AVATAR_IDENTITY", {"tooltip": "A: whose looks to keep."}),
            "dynamic_from": ("AVATAR_IDENTITY", {"tooltip": "B: whose way of moving and talking to use."}),
        }}

    def mix(self, static_from, dynamic_from):
        return (mix_identity(static_from, dynamic_from),)


NODE_CLASS_MAPPINGS = {
    "SparseAvatarExtractIdentity": ExtractIdentity,
    "SparseAvatarSaveIdentity": SaveIdentity,
    "SparseAvatarLoadIdentity": LoadIdentity,
    "SparseAvatarMixIdentity": MixIdentity,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SparseAvatarExtractIdentity": "Extract Identity",
    "SparseAvatarSaveIdentity": "Save Identity",
    "SparseAvatarLoadIdentity": "Load Identity",
    "SparseAvatarMixIdentity": "Mix Identity",
}
