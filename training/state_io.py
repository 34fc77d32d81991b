"""Training checkpoints without pickle: safetensors for every tensor, JSON for everything else.

One checkpoint is a folder ``step-00000100/``:

- ``model.safetensors``      full (unsharded) model weights, model config JSON in the metadata
- ``ema.safetensors``        EMA weights of the trainable parameters (absent when EMA is off)
- ``optimizer.safetensors``  optimizer state tensors under flat names ``state.<param>.<key>``
- ``rng.safetensors``        torch CPU (and CUDA) generator states of every rank (uint8 tensors)
- ``trainer_state.json``     step, samples seen, non-tensor optimizer values, config, world size

Weights and optimizer state are gathered to full tensors (``torch.distributed.checkpoint``'s
``get_*_state_dict(full_state_dict=True)``), so a checkpoint written by 8 FSDP2 ranks resumes on 1,
2 or 4 ranks, and a plain single-process run reads it too. Rank 0 writes into a temporary folder
that is renamed into place, so a crash never leaves a half checkpoint under the final name.
Every rank reads the full files on resume (the checkpoint folder must be visible to all ranks,
e.g. a shared filesystem when training on several hosts).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserFacingError
from ..files import disk_full_error, is_disk_full, open_safetensors, save_safetensors
from .distributed import DistributedContext

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE_FORMAT = "sparse-avatar-trainer-state"
TRAINER_STATE_VERSION = 1


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded DTensor (a collective: every rank must call it)."""
    if hasattr(tensor, "full_tensor"):
        return tensor.full_tensor()
    return tensor


def _cpu_contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or strided storage; a clone per tensor keeps it simple.
    return {name: full_tensor(value).detach().to("cpu").contiguous().clone() for name, value in tensors.items()}


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU state dict of a plain, DDP-unwrapped or FSDP2 model (non-empty on rank 0 only when distributed)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_dict_options(full_state_dict=True, cpu_offload=True))
    return _cpu_contiguous(state)


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Full optimizer state keyed by parameter name, split into (tensors, JSON-able rest).

    Tensors are stored as ``state/<param name>/<key>`` ("/" because names contain dots); the
    param groups (hyperparameters and the names of their parameters) go to JSON.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_state_dict_options(full_state_dict=True, cpu_offload=True))
    tensors, scalars = {}, {}
    for param_name, entries in full.get("state", {}).items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{param_name}/{key}"] = value
            else:
                scalars.setdefault(param_name, {})[key] = value
    values = {"param_groups": full.get("param_groups", []), "non_tensor_state": scalars}
    return _cpu_contiguous(tensors), json.loads(json.dumps(values, default=_json_number))


def _json_number(value):
    """A one-value tensor among the hyperparameters (the trainer's CUDA graphs keep lr on the
    device) is written as its number; the trainer makes it a tensor again on resume."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _optimizer_state_from_files(tensors: dict[str, torch.Tensor], values: dict) -> dict:
    state: dict[str, dict] = {}
    for flat_key, value in tensors.items():
        _, rest = flat_key.split("/", 1)
        param_name, key = rest.rsplit("/", 1)
        state.setdefault(param_name, {})[key] = value
    for param_name, entries in values.get("non_tensor_state", {}).items():
        state.setdefault(param_name, {}).update(entries)
    groups = [dict(group, betas=tuple(group["betas"])) if "betas" in group else dict(group) for group in values.get("param_groups", [])]
    return {"state": state, "param_groups": groups}


def _forget_states_never_saved(model: nn.Module, optimizer: torch.optim.Optimizer, saved_names: set[str]) -> None:
    for name, parameter in model.named_parameters():
        state = optimizer.state.get(parameter)
        if name in saved_names or not state:
            continue
        moments = [value for key, value in state.items() if key != "step" and isinstance(value, torch.Tensor)]
        if all(float(full_tensor(value).abs().max()) == 0.0 for value in moments):  # the dummy step's, nothing learned
            del optimizer.state[parameter]


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _gather_rng_states(context: DistributedContext) -> dict[str, torch.Tensor]:
    local = _rng_state()
    if not context.is_distributed:
        return {f"rank0.{key}": value for key, value in local.items()}
    gathered: list = [None] * context.world_size
    # RNG states are small byte tensors: object gather is fine and avoids device juggling.
    dist.all_gather_object(gathered, {key: value.tolist() for key, value in local.items()})
    return {
        f"rank{rank}.{key}": torch.tensor(values, dtype=torch.uint8)
        for rank, state in enumerate(gathered)
        for key, values in state.items()
    }


def save_training_checkpoint(
    out_dir: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_state: dict[str, torch.Tensor] | None,
    trainer_state: dict,
    model_metadata: dict[str, str] | None,
    context: DistributedContext,
    keep: int = 2,
) -> Path:
    """Write ``out_dir/step-XXXXXXXX/`` (collective: every rank must call it). Returns the folder."""
    final = Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:08d}"
    model_state = gather_model_state(model)
    optimizer_tensors, optimizer_values = gather_optimizer_state(model, optimizer)
    ema_tensors = _cpu_contiguous(ema_state) if ema_state else {}
    rng_states = _gather_rng_states(context)
    if context.is_main:
        temporary = final.with_name(final.name + f".tmp-{os.getpid()}")
        try:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
            metadata = {"format": "sparse-avatar-training-weights", **(model_metadata or {})}
            # The folder is the atomic unit (renamed into place below); save_safetensors also gives
            # the files normal permissions (safetensors alone writes them owner-only).
            save_safetensors(model_state, temporary / "model.safetensors", metadata)
            if ema_tensors:
                save_safetensors(ema_tensors, temporary / "ema.safetensors", metadata)
            save_safetensors(optimizer_tensors, temporary / "optimizer.safetensors")
            save_safetensors(rng_states, temporary / "rng.safetensors")
            state = {
                "format": TRAINER_STATE_FORMAT,
                "version": TRAINER_STATE_VERSION,
                "step": step,
                "world_size": context.world_size,
                "optimizer_values": optimizer_values,
                **trainer_state,
            }
            (temporary / "trainer_state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
        except Exception as error:
            shutil.rmtree(temporary, ignore_errors=True)  # a save cut short leaves nothing behind
            if is_disk_full(error):
                raise disk_full_error(final) from None
            raise
        _prune_old_checkpoints(Path(out_dir), keep)
    if context.is_distributed:
        dist.barrier()
    return final


def _prune_old_checkpoints(out_dir: Path, keep: int) -> None:
    # A save cut short (killed process, full disk) leaves its temporary folder; one process writes
    # a run's checkpoints, so any temporary folder but this process's own is such a left-over.
    for stale in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*.tmp-*"):
        if not stale.name.endswith(f".tmp-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    if keep <= 0:
        return
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders of a crashed save are skipped)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and ".tmp-" not in p.name]
    return sorted((p for p in found if (p / "trainer_state.json").is_file()), key=lambda p: p.name)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def read_trainer_state(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserFacingError(f"{checkpoint_dir} is not a training checkpoint (no trainer_state.json); pass a step-XXXXXXXX folder or the run's --out folder.") from None
    except json.JSONDecodeError as error:
        raise UserFacingError(f"{path} is corrupt ({error}); delete that checkpoint folder to resume from the previous one.") from None
    if state.get("format") != TRAINER_STATE_FORMAT:
        raise UserFacingError(f"{path} has format {state.get('format')!r}, expected {TRAINER_STATE_FORMAT!r}.")
    return state


def load_training_checkpoint(
    checkpoint_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_state: dict[str, torch.Tensor] | None,
    context: DistributedContext,
) -> dict:
    """Load weights, optimizer, EMA and (same world size only) RNG in place; returns trainer_state.json."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    checkpoint_dir = Path(checkpoint_dir)
    state = read_trainer_state(checkpoint_dir)
    model_state = _read_all(checkpoint_dir / "model.safetensors")
    optimizer_tensors = _read_all(checkpoint_dir / "optimizer.safetensors")
    missing = set(gather_names(model)) - set(model_state)
    if missing:
        raise UserFacingError(
            f"checkpoint {checkpoint_dir} does not match this model: {len(missing)} parameters missing "
            f"(e.g. {sorted(missing)[:3]}); was it written with another --config?"
        )
    set_model_state_dict(model, model_state, options=_state_dict_options(full_state_dict=True, strict=False))
    optimizer_state = _optimizer_state_from_files(optimizer_tensors, state.get("optimizer_values", {}))
    # A parameter that has had no gradient yet (personal training's reference path while every
    # step so far dropped the reference) has no Adam state in the saved run, as in an unbroken one.
    # torch fills such gaps by a zero-gradient dummy step (step 1, zero moments; strict=False lets
    # it): that state is dropped again, so the parameter starts its state on its first gradient
    # (step 0), exactly as it would have without the interruption.
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=_state_dict_options(full_state_dict=True, strict=False))
    _forget_states_never_saved(model, optimizer, set(optimizer_state["state"]))
    if ema_state is not None:
        ema_path = checkpoint_dir / "ema.safetensors"
        if ema_path.is_file():
            saved = _read_all(ema_path)
            for name, shadow in ema_state.items():
                _copy_full_into(shadow, saved[name])
    if state.get("world_size") == context.world_size:
        with _open(checkpoint_dir / "rng.safetensors") as reader:
            if f"rank{context.rank}.cpu" in reader.tensors:
                torch.set_rng_state(reader.get(f"rank{context.rank}.cpu"))
            if f"rank{context.rank}.cuda" in reader.tensors and context.device.type == "cuda":
                torch.cuda.set_rng_state(reader.get(f"rank{context.rank}.cuda"))
    # Different world size: per-rank RNG streams cannot map one to one. Training randomness
    # (noise, timesteps, condition dropout) is drawn from per-sample seeds, so only stochastic
    # layers such as dropout see a different stream; that is the documented trade-off.
    return state


def _open(path: Path):
    folder = path.parent
    return open_safetensors(path, what="training checkpoint file", if_missing=f"{folder} is incomplete; delete it to resume from the previous one.",
                            if_damaged=f"Delete {folder} to resume from the previous one.")


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with _open(path) as reader:
        return reader.get_all()


def gather_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def _copy_full_into(shadow: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a possibly sharded DTensor shadow (keeps its placement)."""
    if hasattr(shadow, "device_mesh"):
        try:
            from torch.distributed.tensor import distribute_tensor
        except ImportError:  # torch 2.4 keeps DTensor under a private name
            from torch.distributed._tensor import distribute_tensor

        full_dtensor = distribute_tensor(full.to(shadow.device_mesh.device_type), shadow.device_mesh, shadow.placements)
        shadow.to_local().copy_(full_dtensor.to_local())
    else:
        shadow.copy_(full.to(shadow.device))
