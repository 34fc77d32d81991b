"""The model nodes, run as plain classes (no ComfyUI): load -> identity -> sample -> decode, save/load/mix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_avatar.errors import UserFacingError
from sparse_avatar.media import SPEECH_SAMPLE_RATE, load_reference_video, probe_media
from sparse_avatar.model.checkpoint import new_model, save_checkpoint
from sparse_avatar.model.identity import extract_identity
from sparse_avatar.nodes.avatar_model import LoadAvatarModel
from sparse_avatar.nodes.generation import DecodeAvatarVideo, SparseReferenceSampler
from sparse_avatar.nodes.identity import ExtractIdentity, LoadIdentity, MixIdentity, SaveIdentity
from sparse_avatar.nodes.speech import EncodeSpeech


@pytest.fixture
def models_cwd(tmp_path, monkeypatch):
    """Outside ComfyUI the nodes use ./models/<folder>; run in a fresh folder with a tiny checkpoint."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "avatar").mkdir(parents=True)
    save_checkpoint(new_model("tiny", seed=3), tmp_path / "models" / "avatar" / "tiny.safetensors")
    return tmp_path


def _speech(seconds=1.2, fps=25.0):
    t = np.arange(int(seconds * SPEECH_SAMPLE_RATE)) / SPEECH_SAMPLE_RATE
    wave = (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    audio = {"waveform": torch.from_numpy(wave)[None, None], "sample_rate": SPEECH_SAMPLE_RATE}
    speech, _, frames = EncodeSpeech().encode(audio, fps=fps)
    return speech, frames


def _synthetic_crops(size, count=12, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    return np.repeat(base, count, axis=0)


def test_load_sample_decode_generate(models_cwd):
    assert "tiny.safetensors" in LoadAvatarModel.INPUT_TYPES()["required"]["checkpoint"][0]
    (handle,) = LoadAvatarModel().load("tiny.safetensors", dtype="fp32", attention="naive")
    avatar = handle.ready()
    identity = extract_identity(avatar, _synthetic_crops(avatar.config.frame_size), None, fps=25.0)
    speech, n_frames = _speech()
    (latent,) = SparseReferenceSampler().sample(handle, identity, speech, steps=2, seed=5, chunk_frames=8, overlap_frames=2)
    assert latent["samples"].shape[2] == n_frames
    decoded = DecodeAvatarVideo().decode(handle, latent)
    image, video, audio = decoded["result"]
    size = avatar.config.frame_size
    # The inline player's file: an mp4 with the frames and the sound, in ./temp (ComfyUI's temp folder there).
    (preview,) = decoded["ui"]["sparse_avatar_video"]
    assert preview["type"] == "temp" and preview["subfolder"] == "" and preview["format"] == "video/mp4"
    info = probe_media(str(models_cwd / "temp" / preview["filename"]))
    assert (info.n_frames, info.width, info.audio_streams) == (n_frames, size, 1)
    assert tuple(image.shape) == (n_frames, size, size, 3)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert audio["waveform"].shape[-1] == round(n_frames / 25.0 * SPEECH_SAMPLE_RATE)
    assert video is not None
    (again,) = SparseReferenceSampler().sample(handle, identity, speech, steps=2, seed=5, chunk_frames=8, overlap_frames=2)
    assert torch.equal(latent["samples"], again["samples"]), "same seed must give the same latents"


def test_identity_save_load_mix_round_trip(models_cwd):
    (handle,) = LoadAvatarModel().load("tiny.safetensors", dtype="fp32", attention="naive")
    avatar = handle.ready()
    first = extract_identity(avatar, _synthetic_crops(avatar.config.frame_size, seed=1), None, fps=25.0)
    second = extract_identity(avatar, _synthetic_crops(avatar.config.frame_size, seed=2), None, fps=25.0)
    result = SaveIdentity().save(first, filename_prefix="person a")
    saved_name = result["ui"]["text"][0]
    assert saved_name in LoadIdentity.INPUT_TYPES()["required"]["identity_file"][0]
    (loaded,) = LoadIdentity().load(saved_name)
    assert torch.equal(loaded.static_k, first.static_k) and torch.equal(loaded.ref_v, first.ref_v)
    (mixed,) = MixIdentity().mix(first, second)
    assert torch.equal(mixed.static_k, first.static_k) and torch.equal(mixed.ref_k, second.ref_k)
    with pytest.raises(UserFacingError, match="not allowed"):
        SaveIdentity().save(first, filename_prefix="../escape")


def test_bad_inputs_get_clear_messages(models_cwd):
    with pytest.raises(UserFacingError, match="not found"):
        LoadAvatarModel().load("missing.safetensors")
    (handle,) = LoadAvatarModel().load("tiny.safetensors", dtype="fp32")
    speech, _ = _speech(0.4)
    with pytest.raises(UserFacingError, match="Identity"):
        SparseReferenceSampler().sample(handle, "not an identity", speech)
    identity = extract_identity(handle.ready(), _synthetic_crops(handle.model.config.frame_size), None, fps=25.0)
    with pytest.raises(UserFacingError, match="source"):
        SparseReferenceSampler().sample(handle, identity, speech, mode="dub", steps=1)
    with pytest.raises(UserFacingError, match="Sparse Reference Sampler"):
        DecodeAvatarVideo().decode(handle, {"samples": torch.zeros(1, 4, 2, 2, 2)})


def test_extract_identity_and_dub_on_a_real_clip(models_cwd, shared_media_dir):
    reference = load_reference_video(str(shared_media_dir / "v15_real3dportrait_may_5s.mp4"), end_s=0.6, max_side=256)
    (handle,) = LoadAvatarModel().load("tiny.safetensors", dtype="fp32", attention="naive")
    identity, crops = ExtractIdentity().extract(handle, reference)
    size = handle.model.config.frame_size
    assert tuple(crops.shape) == (reference.n_frames, size, size, 3)
    speech, n_frames = _speech(0.8)
    (latent,) = SparseReferenceSampler().sample(handle, identity, speech, mode="dub", steps=1, source=reference)
    image, _, _ = DecodeAvatarVideo().decode(handle, latent)["result"]
    assert tuple(image.shape[1:3]) == reference.frames.shape[1:3]
    assert image.shape[0] == n_frames


def test_load_avatar_model_lists_the_shipped_model_first_and_loads_it(monkeypatch, tmp_path):
    from sparse_avatar.model.checkpoint import SHIPPED_MODEL_NAME, read_checkpoint_metadata, resolve_checkpoint, shipped_model_path
    from sparse_avatar.nodes import _models

    monkeypatch.setattr(_models, "list_files", lambda name: ["mine.safetensors", SHIPPED_MODEL_NAME])
    monkeypatch.setattr(_models, "full_path", lambda name, filename: None)
    monkeypatch.setattr(_models, "folder", lambda name: str(tmp_path))
    choices = LoadAvatarModel.INPUT_TYPES()["required"]["checkpoint"][0]
    assert choices == [SHIPPED_MODEL_NAME, "mine.safetensors"]  # shipped first, listed once
    assert read_checkpoint_metadata(shipped_model_path())["steps"] == "2456"  # the file the model card describes
    assert resolve_checkpoint("sparse-avatar-world") == shipped_model_path()
    (handle,) = LoadAvatarModel().load(SHIPPED_MODEL_NAME, dtype="fp32")
    assert handle.model.config.name == "compact"


def test_nodes_ask_comfyui_to_make_room_for_the_identity_and_the_reference_pass(models_cwd, monkeypatch):
    """In ComfyUI the model is loaded through its memory manager, and the memory the work needs
    beside the weights is asked for too (so other models are offloaded first on a small card): the
    identity's bytes for a render, the reference pass's working memory for Extract Identity."""
    import sys
    import types

    from sparse_avatar.model.identity import reference_pass_memory_bytes
    from sparse_avatar.nodes import identity as identity_nodes
    from sparse_avatar.nodes._models import AvatarModelHandle

    requests = []
    management = types.ModuleType("comfy.model_management")
    management.get_torch_device = lambda: torch.device("cpu")
    management.unet_offload_device = lambda: torch.device("cpu")
    management.load_models_gpu = lambda models, memory_required=0: requests.append((len(models), memory_required))
    management.throw_exception_if_processing_interrupted = lambda: None
    management.processing_interrupted = lambda: False
    management.InterruptProcessingException = type("InterruptProcessingException", (Exception,), {})
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = lambda model, load_device, offload_device, size: types.SimpleNamespace(model=model, size=size)
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.model_patcher = management, patcher
    for name, module in (("comfy", comfy), ("comfy.model_management", management), ("comfy.model_patcher", patcher)):
        monkeypatch.setitem(sys.modules, name, module)

    avatar = new_model("tiny", seed=3)
    handle = AvatarModelHandle(avatar, "tiny")
    identity = extract_identity(avatar, _synthetic_crops(avatar.config.frame_size), None, fps=25.0)
    speech, _ = _speech(0.4)
    SparseReferenceSampler().sample(handle, identity, speech, steps=1, seed=0)
    ref_bytes = sum(t.numel() * t.element_size() for t in (identity.ref_k, identity.ref_v))
    assert requests[-1][0] == 1 and requests[-1][1] >= ref_bytes  # fp32 model: the identity at 4 bytes a value
    assert identity.device_bytes(torch.bfloat16) < identity.device_bytes(torch.float32)

    monkeypatch.setattr(identity_nodes, "prepared_reference", lambda model, reference, max_frames=None: types.SimpleNamespace(crops=None))
    monkeypatch.setattr(identity_nodes, "extract_reference_identity", lambda model, prepared: identity)
    monkeypatch.setattr(identity_nodes, "frames_to_comfy_image", lambda crops: None)
    ExtractIdentity().extract(handle, "a reference")
    assert requests[-1] == (1, reference_pass_memory_bytes(avatar.config)) and requests[-1][1] > 0


@pytest.mark.skipif(not __import__("sparse_avatar.media", fromlist=["whisper_available"]).whisper_available(),
                    reason='needs the whisper extra: pip install "sparse-avatar[whisper]"')
def test_a_whisper_model_hears_encode_speech_through_its_own_features(models_cwd, shared_media_dir):
    """Encode Speech makes log-mel; a model trained on Whisper features gets them computed again
    from the speech's audio, in the sampler and in Extract Identity (the reference's own audio)."""
    from sparse_avatar.model.configs import get_config, with_speech_features

    model = new_model(with_speech_features(get_config("tiny"), "whisper"), seed=3)
    save_checkpoint(model, models_cwd / "models" / "avatar" / "tiny-whisper.safetensors")
    (handle,) = LoadAvatarModel().load("tiny-whisper.safetensors", dtype="fp32", attention="naive")
    reference = load_reference_video(str(shared_media_dir / "v15_real3dportrait_may_5s.mp4"), end_s=0.6, max_side=256)
    identity, _ = ExtractIdentity().extract(handle, reference)  # the model refuses features of the wrong width
    speech, n_frames = _speech()
    assert speech["features"].shape[1] == 160
    (latent,) = SparseReferenceSampler().sample(handle, identity, speech, steps=1, seed=5, mode="dub", source=reference)
    assert latent["samples"].shape[2] == n_frames
    without_audio = {**speech, "audio": None}
    with pytest.raises(UserFacingError, match="no audio to compute them again from"):
        SparseReferenceSampler().sample(handle, identity, without_audio, steps=1)
