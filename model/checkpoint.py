"""Model checkpoints: one .safetensors file, the config as JSON in its metadata. Never pickle.

Metadata keys: format ("sparse-avatar-model"), version, architecture ("AvatarDiT"), config (JSON
of ModelConfig), latent_codec, speech_features, training_stage. Loading validates every piece and
says exactly what does not match. ``resolve_checkpoint`` finds a file by path, by name in a
models folder, or (only when asked for a Hub repo id) downloads it with huggingface_hub.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import UserFacingError
from ..files import open_safetensors, save_safetensors
from .avatar_model import AvatarModel
from .codecs import codec_for_config
from .configs import ModelConfig, get_config

CHECKPOINT_FORMAT = "sparse-avatar-model"
CHECKPOINT_VERSION = "1"
ARCHITECTURE = "AvatarDiT"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise UserFacingError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}.")


def save_checkpoint(model: AvatarModel, path, *, dtype="fp32", training_stage: str | None = None, extra_metadata: dict | None = None) -> Path:
    """Write the model's weights atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserFacingError(f"checkpoints are .safetensors files; got {path.name!r}.")
    target_dtype = _parse_dtype(dtype)
    tensors = {name: tensor.detach().to("cpu", target_dtype if tensor.is_floating_point() else tensor.dtype).contiguous() for name, tensor in model.dit.state_dict().items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": ARCHITECTURE,
        "config": model.config.to_json(),
        "latent_codec": model.config.latent_codec,
        "speech_features": model.config.speech_feature_id,
        "training_stage": training_stage or model.training_stage,
    }
    for key, value in (extra_metadata or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return save_safetensors(tensors, path, metadata)


def _open(path):
    return open_safetensors(path, what="checkpoint", if_missing="Pass a .safetensors file made by 'init-checkpoint' or training.",
                            if_damaged="It is damaged, truncated or another format; download or save it again.")


def read_checkpoint_metadata(path) -> dict:
    """The metadata of a checkpoint, validated (format, version, architecture); no weights read."""
    path = Path(path)
    with _open(path) as reader:
        metadata = dict(reader.metadata)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise UserFacingError(
            f"{path.name} is not a sparse-avatar model checkpoint (format {metadata.get('format')!r}); "
            "pass a checkpoint made by 'python -m sparse_avatar init-checkpoint' or by training."
        )
    if metadata.get("version") != CHECKPOINT_VERSION:
        raise UserFacingError(f"{path.name} has checkpoint version {metadata.get('version')!r}; this pack reads version {CHECKPOINT_VERSION}. Update the pack.")
    if metadata.get("architecture") != ARCHITECTURE:
        raise UserFacingError(f"{path.name} holds architecture {metadata.get('architecture')!r}; this pack builds {ARCHITECTURE}.")
    return metadata


def load_checkpoint(path, *, dtype="fp32", device="cpu", vae=None, expected_config: str | ModelConfig | None = None) -> AvatarModel:
    """Build the model from the file's config and load its weights (strictly: every key, every
    shape). vae: the user's VAE for checkpoints in a VAE latent space. expected_config: refuse a
    checkpoint whose config differs (name or ModelConfig)."""

    path = Path(path)
    metadata = read_checkpoint_metadata(path)
    config = ModelConfig.from_json(metadata.get("config"))
    if expected_config is not None:
        expected = get_config(expected_config) if isinstance(expected_config, str) else expected_config
        if expected != config:
            raise UserFacingError(f"{path.name} was built with config {config.name!r}, which differs from the expected {expected.name!r}; pick the matching checkpoint.")
    target_dtype = _parse_dtype(dtype)
    codec = codec_for_config(config, vae)
    with torch.device("meta"):
        model = AvatarModel(config, codec, training_stage=metadata.get("training_stage", "unknown"))
    expected_shapes = {name: tuple(tensor.shape) for name, tensor in model.dit.state_dict().items()}
    with _open(path) as reader:
        names = set(reader.names())
        missing = sorted(set(expected_shapes) - names)
        unexpected = sorted(names - set(expected_shapes))
        if missing or unexpected:
            details = []
            if missing:
                details.append(f"missing {len(missing)} weights (e.g. {', '.join(missing[:3])})")
            if unexpected:
                details.append(f"{len(unexpected)} unexpected weights (e.g. {', '.join(unexpected[:3])})")
            raise UserFacingError(f"{path.name} does not match its own config {config.name!r}: " + "; ".join(details) + ". The file is damaged or was edited.")
        for name in sorted(names):  # every shape checked from the header, before any weight is read
            if reader.shape(name) != expected_shapes[name]:
                raise UserFacingError(f"{path.name}: weight {name} has shape {reader.shape(name)}, but config {config.name!r} needs {expected_shapes[name]}; the config and weights are incompatible.")
        state = {}
        for name in sorted(names):
            tensor = reader.get(name)
            state[name] = tensor.to(target_dtype) if tensor.is_floating_point() else tensor
    model.to_empty(device=device)
    model.dit.load_state_dict(state, strict=True, assign=False)
    model.to(device=device, dtype=target_dtype)
    model.eval()
    return model


def new_model(config_name: str | ModelConfig, *, seed: int = 0, dtype="fp32", device="cpu") -> AvatarModel:
    """Randomly initialised model (for tests and as the start of training)."""
    config = get_config(config_name) if isinstance(config_name, str) else config_name
    torch.manual_seed(seed)
    return AvatarModel(config).to(device=device, dtype=_parse_dtype(dtype))


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/.+\.safetensors)?$")


# The default model that ships inside the pack (models/avatar/SHIPPED_MODEL_NAME, its card beside
# it): `compact` trained on Avatar World only. Load Avatar Model lists it first, the CLI renders
# with it when no --model is given, and personalize starts from it.
SHIPPED_MODEL_NAME = "sparse-avatar-world.safetensors"
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "avatar" / SHIPPED_MODEL_NAME


def shipped_model_path() -> Path:
    """The shipped default checkpoint; a clear error when the pack was installed without it."""
    if not SHIPPED_MODEL.is_file():
        raise UserFacingError(f"the shipped model {SHIPPED_MODEL} is missing; reinstall the pack (git clone brings it), "
                              "or pass a checkpoint with --model.")
    return SHIPPED_MODEL


def resolve_checkpoint(name_or_repo: str, models_dir=None, *, allow_download: bool = False) -> Path:
    """Find a checkpoint: an existing path; a file name inside models_dir; or, with
    allow_download, a Hugging Face Hub repo id "owner/repo" or "owner/repo/file.safetensors"
    downloaded into models_dir. Offline or unreachable Hub -> a clear UserFacingError, not a hang."""
    candidate = Path(name_or_repo).expanduser()
    if candidate.is_file():
        return candidate
    if name_or_repo in (SHIPPED_MODEL_NAME, SHIPPED_MODEL.stem):
        return shipped_model_path()
    if models_dir is not None:
        for name in (name_or_repo, f"{name_or_repo}.safetensors"):
            if (Path(models_dir) / name).is_file():
                return Path(models_dir) / name
    if not _REPO_ID.match(name_or_repo):
        raise UserFacingError(f"checkpoint {name_or_repo!r} not found (looked for a file and in {models_dir}); pass a .safetensors path or a Hub repo id 'owner/repo'.")
    if not allow_download:
        raise UserFacingError(f"checkpoint {name_or_repo!r} is not on disk; enable download to fetch it from the Hugging Face Hub, or put the file in {models_dir}.")
    return _download_from_hub(name_or_repo, models_dir)


def _download_from_hub(repo_spec: str, models_dir) -> Path:
    owner, repo, *rest = repo_spec.split("/", 2)
    repo_id = f"{owner}/{repo}"
    # Offline first: it is the real reason whether or not huggingface_hub is installed.
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserFacingError(f"cannot fetch {repo_id}: the Hugging Face Hub is in offline mode (HF_HUB_OFFLINE is set); download it while online or put the file in {models_dir}.")
    try:
        import huggingface_hub
    except ImportError:
        raise UserFacingError("downloading from the Hub needs the 'huggingface_hub' package (pip install huggingface_hub); or download the file yourself.") from None
    local_dir = Path(models_dir or ".") / repo_id.replace("/", "--")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")  # never hang on a dead network
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        if rest:
            filename = rest[0]
        else:
            files = [f for f in huggingface_hub.list_repo_files(repo_id) if f.endswith(".safetensors")]
            if len(files) != 1:
                raise UserFacingError(f"{repo_id} holds {len(files)} .safetensors files; name one as '{repo_id}/<file>.safetensors'.")
            filename = files[0]
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, local_dir=str(local_dir)))
    except UserFacingError:
        raise
    except Exception as error:  # network, auth, missing repo: all user-fixable
        raise UserFacingError(f"could not fetch {repo_spec} from the Hugging Face Hub ({type(error).__name__}: {error}); check the repo id and your connection, or download the file yourself.") from None
