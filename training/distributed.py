"""Process-group setup and model wrapping for torchrun (DDP or FSDP2), NCCL on GPUs, gloo on CPU.

Everything here reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...);
several hosts work through torchrun's own rendezvous (``--nnodes``, ``--rdzv-endpoint``), nothing
home-made. A single plain ``python`` process is world size 1 with no process group at all, so the
same trainer runs everywhere.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserFacingError

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def init_distributed(device: str | None = None, *, timeout_s: float = 600.0) -> DistributedContext:
    """Join torchrun's process group when launched by torchrun, else return a one-process context.

    ``device``: "cuda", "cpu" or None (cuda when available). NCCL for CUDA, gloo for CPU.
    """
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise UserFacingError("--device cuda was asked for but no CUDA GPU is visible; pass --device cpu or run on a GPU machine.")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size <= 1:
        return DistributedContext(0, 1, 0, torch_device, None)
    backend = "nccl" if want_cuda else "gloo"
    if not dist.is_initialized():
        kwargs = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if want_cuda:
            # Binds the communicator to this GPU up front (avoids NCCL guessing the device).
            kwargs["device_id"] = torch_device
        dist.init_process_group(**kwargs)
    return DistributedContext(rank, world_size, local_rank, torch_device, backend)


def shutdown_distributed(context: DistributedContext) -> None:
    if context.is_distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _fully_shard_function():
    """FSDP2's ``fully_shard``: public in torch >= 2.6, under ``_composable`` in 2.4/2.5."""
    try:
        from torch.distributed.fsdp import fully_shard  # type: ignore[attr-defined]

        return fully_shard
    except ImportError:
        pass
    try:
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore

        return fully_shard
    except ImportError:
        return None


def _register_forward_method_function():
    try:
        from torch.distributed.fsdp import register_fsdp_forward_method  # type: ignore[attr-defined]

        return register_fsdp_forward_method
    except ImportError:
        pass
    try:
        from torch.distributed._composable.fsdp import register_fsdp_forward_method  # type: ignore

        return register_fsdp_forward_method
    except ImportError:
        return None


def fsdp_available() -> bool:
    return _fully_shard_function() is not None


def resolve_parallel_mode(mode: str, context: DistributedContext) -> str:
    if mode not in PARALLEL_MODES:
        raise UserFacingError(f"unknown --parallel {mode!r}; choose one of {', '.join(PARALLEL_MODES)}.")
    if not context.is_distributed:
        return "none"
    if mode == "auto":
        return "ddp"
    if mode == "fsdp" and not fsdp_available():
        raise UserFacingError(
            f"--parallel fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.4); this torch "
            f"{torch.__version__} lacks it. Use --parallel ddp or upgrade torch."
        )
    return mode


def shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks FSDP2 shards one by one (each gathered just in time)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
        return list(blocks)
    return []


def block_entry_methods(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(block, method name) of the block methods a model calls from outside a block's forward,
    as the model declares them (``model.block_entry_methods()``; none if it declares none)."""
    return model.block_entry_methods() if hasattr(model, "block_entry_methods") else []


def wrap_model(model: nn.Module, mode: str, context: DistributedContext, *, find_unused_parameters: bool = True) -> nn.Module:
    """Wrap for data parallelism. Returns the module to call in the training step.

    DDP returns a wrapper (the original module stays reachable as ``.module``); FSDP2 shards the
    given module in place (each block, then the root) and returns it. Optimizer construction must
    come AFTER this call so FSDP2's sharded parameters are the ones optimized.
    """
    if mode == "none":
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [context.local_rank] if context.device.type == "cuda" else None
        # find_unused_parameters: stages switch conditions on and off (text in stage 1, audio from
        # stage 2), so some parameters legitimately receive no gradient on a given step.
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    if mode == "fsdp":
        fully_shard = _fully_shard_function()
        for block in shardable_blocks(model):
            fully_shard(block)
        fully_shard(model)
        entry_methods = block_entry_methods(model)
        if entry_methods:
            register = _register_forward_method_function()
            if register is None:
                raise UserFacingError(f"this torch {torch.__version__} cannot shard a model whose blocks have extra entry methods; use --parallel ddp.")
            for module, name in entry_methods:
                register(module, name)
        return model
    raise UserFacingError(f"unknown parallel mode {mode!r}")


def all_reduce_mean(value: float, context: DistributedContext) -> float:
    """Mean of a python float over ranks (for logging only)."""
    if not context.is_distributed:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size
