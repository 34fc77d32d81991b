"""The one trainer every curriculum stage uses.

A stage is (model, loss function, batch source, TrainerConfig); the trainer owns everything else:
bf16 autocast on CUDA, gradient checkpointing, AdamW with linear warmup + cosine decay, EMA,
gradient clipping, optional ``torch.compile``, optional CUDA graphs of the whole step (below),
DDP/FSDP2 through ``distributed.py``, checkpoints every N steps with exact resume, and logs
(stdout + JSONL, TensorBoard optional).

Exact resume rests on one rule: nothing random depends on hidden state. A batch source returns
the batch for ``(step, rank, world_size)`` as a pure function (so "data position" is the step),
per-sample randomness comes from per-sample seeds in the batch, the generator passed to the loss
is re-seeded from (seed, step, rank) each step, and the learning rate is a pure function of the
step. The optimizer state, EMA and global RNG are saved bit-exactly (safetensors, fp32).

Interfaces:
    loss_fn(model, batch, generator) -> (loss scalar tensor, metrics dict of floats)
    batch_source.batch(step, rank, world_size) -> dict (tensors go to the device; the global batch
        of ``batch_source.global_batch_size`` samples is split evenly over ranks)
    graph_key(generator) -> hashable (optional, CUDA graphs): the host-side decisions the loss
        will make with this step's generator (e.g. reference dropout), one graph per answer

CUDA graphs (``TrainerConfig.cuda_graphs``). At the model sizes a user fine-tunes, a step is
host-bound: tens of thousands of operator launches take longer than the GPU's work (H200,
personality step of ``small``: 0.23 s a step for ~0.12 s of kernels). A CUDA graph records the
whole step once (forward, backward, gradient clipping, the fused AdamW) and replays it with one
launch. What that asks of a step: no host syncs, fixed batch shapes, randomness only from the
trainer's generator (registered with the graph and re-seeded from (seed, step, rank) before each
replay, as eager re-seeds it) and the learning rate held in a device tensor. Each decision key is
run eagerly ``GRAPH_WARMUP_RUNS`` times first (compilation, autotuning and lazy state happen
outside the capture), then captured; a capture that fails falls back to eager steps with a warning.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import resource
import time
import traceback
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..errors import UserFacingError
from . import state_io
from .distributed import DistributedContext, all_reduce_mean, block_entry_methods, resolve_parallel_mode, shardable_blocks, wrap_model

LossFn = Callable[[nn.Module, dict, torch.Generator], "tuple[torch.Tensor, dict]"]
GraphKey = Callable[[torch.Generator], Hashable]
logger = logging.getLogger(__name__)
# Eager runs of each graph key before it is captured: the first compiles and autotunes, the second
# runs with everything warm (the capture must not be the first to touch anything lazy).
GRAPH_WARMUP_RUNS = 2


class BatchSource(Protocol):
    global_batch_size: int

    def batch(self, step: int, rank: int, world_size: int) -> dict: ...


@dataclass
class TrainerConfig:
    total_steps: int = 1000
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at total_steps
    warmup_steps: int = 0
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    ema_decay: float = 0.0  # 0 disables EMA
    precision: str = "bf16"  # "bf16" autocast on CUDA (fp32 master weights); CPU always runs fp32
    gradient_checkpointing: bool = False
    compile: bool = False
    cuda_graphs: bool = False  # replay the whole step as a CUDA graph (one process on CUDA; see the module docstring)
    parallel: str = "auto"  # auto | none | ddp | fsdp
    checkpoint_every: int = 0  # 0: only at the end
    final_checkpoint: bool = True  # False: a caller that writes the result itself (personality) skips the trainer state
    keep_checkpoints: int = 2
    log_every: int = 1
    prefetch_batches: bool = False  # read the next step's batch on a host thread during the step
    sample_every: int = 0  # 0: no periodic samples
    seed: int = 0
    tensorboard: bool = False

    def validate(self) -> None:
        if self.total_steps < 1:
            raise UserFacingError(f"total_steps must be >= 1 (got {self.total_steps}).")
        if not (0.0 <= self.ema_decay < 1.0):
            raise UserFacingError(f"ema_decay must be in [0, 1) (got {self.ema_decay}).")
        if self.precision not in ("bf16", "fp32"):
            raise UserFacingError(f"precision must be 'bf16' or 'fp32' (got {self.precision!r}).")
        if self.lr <= 0:
            raise UserFacingError(f"lr must be > 0 (got {self.lr}).")


def learning_rate_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base LR for the update made at ``step`` (0-based): linear warmup, cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int, rank: int) -> int:
    # A fixed odd-multiplier mix: distinct, reproducible streams per (seed, step, rank).
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def compile_blocks(model: nn.Module) -> None:
    """``TrainerConfig.compile``: ``nn.Module.compile`` on each block (the whole model if it has
    none), in place, so parameter names do not change; the block methods the model calls from
    outside a block's forward (``block_entry_methods``) are compiled as well."""
    for block in shardable_blocks(model) or [model]:
        block.compile()
    for block, name in block_entry_methods(model):
        uncompiled = block.__dict__.setdefault("_sparse_avatar_uncompiled", {})  # name -> what uncompile_blocks puts back
        if name not in uncompiled:
            uncompiled[name] = block.__dict__.get(name)  # an instance wrapper (checkpointing, FSDP2), or None: the class's method
            setattr(block, name, torch.compile(getattr(block, name)))


def uncompile_blocks(model: nn.Module) -> None:
    """Undo ``compile_blocks`` once training is done: a caller that renders with the trained model
    in the same process would otherwise recompile the blocks for every new inference shape."""
    for block in shardable_blocks(model) or [model]:
        if getattr(block, "_compiled_call_impl", None) is not None:
            block._compiled_call_impl = None
        for name, original in block.__dict__.pop("_sparse_avatar_uncompiled", {}).items():
            if original is None:
                block.__dict__.pop(name, None)
            else:
                setattr(block, name, original)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute block activations in backward. Returns how many blocks were wrapped.

    A model may provide its own ``set_gradient_checkpointing(True)``; otherwise each block of
    ``model.blocks`` gets its forward wrapped in ``torch.utils.checkpoint`` (non-reentrant, so it
    composes with DDP, FSDP2 and frozen parameters). Parameter names do not change.
    """
    if hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(True)
        return len(shardable_blocks(model))
    from torch.utils.checkpoint import checkpoint

    blocks = shardable_blocks(model)
    for block in blocks:
        if getattr(block, "_sparse_avatar_checkpointed", False):
            continue
        # The DiT's reference pass (forward_reference) runs over many more tokens than the clip
        # pass; leaving it out would keep its activations for every layer (the bulk of memory).
        for method in ("forward", "forward_reference"):
            original = getattr(block, method, None)
            if original is None:
                continue

            def checkpointed(*args, _original=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _original(*args, **kwargs)
                return checkpoint(_original, *args, use_reentrant=False, **kwargs)

            setattr(block, method, checkpointed)
        block._sparse_avatar_checkpointed = True
    return len(blocks)


class ExponentialMovingAverage:
    """fp32 shadow copies of the trainable parameters (sharded like them under FSDP2)."""

    def __init__(self, named_parameters: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.parameters = named_parameters
        self.shadow = {name: param.detach().clone().float() for name, param in named_parameters.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm start: early on the average follows the weights closely (decay ramps to its value).
        decay = min(self.decay, (1 + step) / (10 + step))
        names = list(self.parameters)
        params = [self.parameters[name].detach() for name in names]
        if all(type(p) is torch.Tensor and p.dtype == torch.float32 for p in params):
            # One fused kernel over every tensor instead of one launch per parameter (hundreds a
            # step: host time the GPU waits for once the step itself is a CUDA graph).
            torch._foreach_lerp_([self.shadow[name] for name in names], params, 1.0 - decay)
            return
        for name, param in zip(names, params):
            self.shadow[name].lerp_(param.float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))


def cuda_graphs_unavailable(config: TrainerConfig, context: DistributedContext, parallel_mode: str) -> str | None:
    """Why ``TrainerConfig.cuda_graphs`` cannot be used here (None: it can)."""
    if context.device.type != "cuda":
        return f"the device is {context.device.type}, not CUDA"
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} cannot register the step's generator with a graph (torch 2.5 and later can)"
    if parallel_mode != "none" or context.world_size > 1:
        return "more than one process trains (DDP/FSDP2 collectives are not captured)"
    if config.gradient_checkpointing:
        return "gradient checkpointing saves and restores the RNG state, which a capture cannot"
    return None


def _where(error: BaseException) -> str:
    """The innermost frames of ``error`` in this package: where a capture met what it cannot hold."""
    package = str(Path(__file__).resolve().parents[1])
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if str(Path(frame.filename).resolve()).startswith(package)]
    return " < ".join(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in reversed(frames[-3:])) or "outside the package"


class _CapturedStep:
    """One recorded step: its graph, the static batch it reads and the outputs it writes."""

    def __init__(self, graph, static_batch: dict, outputs):
        self.graph = graph
        self.static_batch = static_batch
        self.outputs = outputs

    def accepts(self, batch: dict) -> bool:
        if batch.keys() != self.static_batch.keys():
            return False
        for name, value in batch.items():
            recorded = self.static_batch[name]
            if isinstance(value, torch.Tensor) != isinstance(recorded, torch.Tensor):
                return False
            if isinstance(value, torch.Tensor):
                if value.shape != recorded.shape or value.dtype != recorded.dtype or value.device != recorded.device:
                    return False
            elif value != recorded:
                return False
        return True

    def replay(self, batch: dict):
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                self.static_batch[name].copy_(value)
        self.graph.replay()
        return self.outputs


class _StepGraphs:
    """The CUDA graphs of a trainer's steps, one per graph key, sharing one memory pool (they
    never run at the same time, and each one's outputs stay referenced, so none overwrites
    another's live tensors)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.stream = torch.cuda.Stream(device)
        self.captured: dict[Hashable, _CapturedStep] = {}
        self.eager_runs: collections.Counter = collections.Counter()
        self.pool = None

    def run_eager(self, work: Callable[[], tuple]):
        """A warm-up step on the stream the capture will use, so per-stream state (cuBLAS
        workspaces) is made now and not during the capture."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            result = work()
        current.wait_stream(self.stream)
        return result

    def capture(self, key: Hashable, batch: dict, work: Callable[[dict], tuple]) -> _CapturedStep:
        static_batch = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in batch.items()}
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        torch.cuda.synchronize(self.device)
        # thread_local: a batch-prefetch thread may use the GPU while the step is captured.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            outputs = work(static_batch)
        if self.pool is None:
            self.pool = graph.pool()
        entry = _CapturedStep(graph, static_batch, outputs)
        self.captured[key] = entry
        return entry


def _batch_signature(batch: dict) -> tuple:
    """What a captured step depends on in a batch: tensor shapes and dtypes, and plain host
    values (a captured step bakes them in). Lists (captions) make a batch uncapturable by key:
    their text differs every step, so a source for a graphed stage leaves them out."""
    signature = []
    for name, value in sorted(batch.items()):
        if isinstance(value, torch.Tensor):
            signature.append((name, tuple(value.shape), str(value.dtype)))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            signature.append((name, value))
        else:
            signature.append((name, repr(value)))
    return tuple(signature)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: peak resident memory of this process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _move_to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@dataclass
class TrainResult:
    step: int
    last_loss: float
    losses: list[float] = field(default_factory=list)
    checkpoint: Path | None = None


class Trainer:
    """Runs ``loss_fn`` over ``batch_source`` with the machinery in the module docstring.

    ``trainable``: which parameters to optimize (default: those with requires_grad); the others
    are frozen (LoRA fine-tuning, DPO reference copies live outside the model).
    ``sample_fn(model, step, out_dir)`` is called on rank 0 every ``sample_every`` steps with the
    EMA weights when EMA is on (periodic sample videos). ``on_step(record)`` sees every logged
    record; ``should_stop()`` ends ``fit`` early between steps (with a checkpoint, so it resumes).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch_source: BatchSource,
        config: TrainerConfig,
        out_dir: str | os.PathLike,
        *,
        context: DistributedContext | None = None,
        model_metadata: dict[str, str] | None = None,
        sample_fn: Callable[[nn.Module, int, Path], None] | None = None,
        log: Callable[[str], None] | None = None,
        on_step: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        graph_key: GraphKey | None = None,
    ):
        config.validate()
        self.config = config
        self.out_dir = Path(out_dir)
        self.context = context or DistributedContext(0, 1, 0, next(model.parameters()).device, None)
        self.loss_fn = loss_fn
        self.batch_source = batch_source
        self.model_metadata = model_metadata or {}
        self.sample_fn = sample_fn
        self.on_step = on_step  # e.g. a ComfyUI progress bar
        self.should_stop = should_stop  # e.g. ComfyUI's cancel flag; checked between steps
        self._prefetcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: tuple[int, concurrent.futures.Future] | None = None  # (step, its batch being read)
        self._print = log or (lambda line: print(line, flush=True))
        if batch_source.global_batch_size % self.context.world_size:
            raise UserFacingError(
                f"global batch {batch_source.global_batch_size} does not split evenly over {self.context.world_size} "
                f"processes; pick a batch size that is a multiple of the process count."
            )

        model.to(self.context.device)
        self.model = model  # unwrapped module: names, state dicts, EMA, export
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.parallel_mode = resolve_parallel_mode(config.parallel, self.context)
        self.train_module = wrap_model(model, self.parallel_mode, self.context)
        if config.compile:
            compile_blocks(model)
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise UserFacingError("nothing to train: every parameter of the model is frozen.")
        self.trainable = trainable
        decay_params = [p for p in trainable.values() if p.ndim >= 2]
        no_decay_params = [p for p in trainable.values() if p.ndim < 2]
        groups = [{"params": decay_params, "weight_decay": config.weight_decay}]
        if no_decay_params:
            # Norm gains and biases are not decayed (standard practice for transformers).
            groups.append({"params": no_decay_params, "weight_decay": 0.0})
        # The fused CUDA AdamW: one kernel for all parameters instead of a dozen per tensor group
        # (8 ms of a 290 ms personality step on an H200). Plain tensors only: FSDP2's DTensor
        # parameters keep the default implementation.
        fused = self.context.device.type == "cuda" and self.parallel_mode != "fsdp"
        unavailable = cuda_graphs_unavailable(config, self.context, self.parallel_mode) if config.cuda_graphs else None
        if unavailable:
            logger.warning("CUDA graphs are off: %s; training with eager steps.", unavailable)
        self.graph_key = graph_key
        self._graphs = _StepGraphs(self.context.device) if config.cuda_graphs and not unavailable else None
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), **({"fused": True} if fused else {}))
        if self._graphs is not None:
            self._prepare_optimizer_for_graphs()
        self.ema = ExponentialMovingAverage(trainable, config.ema_decay) if config.ema_decay > 0 else None
        self.step = 0
        self.samples_seen = 0
        self._tensorboard = None
        self._window = {"started": time.perf_counter(), "steps": 0, "data_time_s": 0.0}

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, extra_state: dict | None = None) -> Path:
        """Write the training state (a step folder, atomically). ``extra_state``: JSON values a
        caller keeps beside it (personality keeps its training seconds; read back with
        ``state_io.read_trainer_state``)."""
        return state_io.save_training_checkpoint(
            self.out_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            ema_state=self.ema.shadow if self.ema else None,
            trainer_state={**(extra_state or {}), "samples_seen": self.samples_seen, "config": asdict(self.config)},
            model_metadata=self.model_metadata,
            context=self.context,
            keep=self.config.keep_checkpoints,
        )

    def resume(self, checkpoint: str | os.PathLike | None = None) -> bool:
        """Resume from ``checkpoint`` (a step folder) or the newest one in out_dir. False if none."""
        path = Path(checkpoint) if checkpoint else state_io.latest_checkpoint(self.out_dir)
        if path is None:
            return False
        if not (path / "trainer_state.json").is_file():
            newest = state_io.latest_checkpoint(path)
            if newest is None:
                raise UserFacingError(f"no training checkpoint found in {path}; pass a step-XXXXXXXX folder written by the trainer.")
            path = newest
        state = state_io.load_training_checkpoint(
            path, model=self.model, optimizer=self.optimizer, ema_state=self.ema.shadow if self.ema else None, context=self.context
        )
        self.step = int(state["step"])
        self.samples_seen = int(state.get("samples_seen", 0))
        if self._graphs is not None:
            self._prepare_optimizer_for_graphs()  # the loaded param groups hold a float lr
        else:
            self._restore_optimizer_after_graphs()  # a graphed run's checkpoint marks its groups capturable
        if self.context.is_main:
            self._print(f"resumed from {path} at step {self.step}")
        return True

    # ---------------------------------------------------------------- training
    def _autocast(self):
        if self.context.device.type == "cuda" and self.config.precision == "bf16":
            # No weight-cast cache under graphs: a cache made during a capture would outlive it.
            return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=self._graphs is None)
        return contextlib.nullcontext()

    def _prepare_optimizer_for_graphs(self) -> None:
        """A captured AdamW update reads the learning rate and its step counts on the device:
        capturable, with lr a device tensor that ``_set_lr`` fills before each replay."""
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.context.device)

    def _restore_optimizer_after_graphs(self) -> None:
        """Back to the eager optimizer once graphs are given up (a failed capture): a float lr and
        no capturable bookkeeping. On the H200 a run that kept them after a failed capture stepped
        at 0.30 s instead of 0.23 s (the cause was not isolated; this removes what differed)."""
        for group in self.optimizer.param_groups:
            group["capturable"] = False
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"].item())

    def release_cuda_graphs(self) -> None:
        """Free the step graphs and their memory pool (a whole step's activations, ~17 GiB for
        ``small`` at Train Avatar's batch) once training is over, instead of whenever the garbage
        collector gets to the trainer: a ComfyUI process renders next; also what a failed capture
        does before its eager step. Later steps run eagerly."""
        if self._graphs is None:
            return
        self._graphs = None
        self.optimizer.zero_grad(set_to_none=True)  # the gradients live in the graphs' pool
        self._restore_optimizer_after_graphs()
        if self.context.device.type == "cuda":
            torch.cuda.synchronize(self.context.device)
            torch.cuda.empty_cache()

    def _set_lr(self, step: int) -> float:
        factor = learning_rate_factor(
            step, warmup_steps=self.config.warmup_steps, total_steps=self.config.total_steps, min_lr_ratio=self.config.min_lr_ratio
        )
        lr = self.config.lr * factor
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # a kernel, no host sync
            else:
                group["lr"] = lr
        return lr

    def _grad_norm_and_clip(self) -> float:
        params = list(self.trainable.values())
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return state_io.full_tensor(norm)  # a tensor: read (host sync) only when the step is logged

    def _next_batch(self) -> dict:
        """The batch of ``self.step``, read ahead: while the GPU runs a step, a host thread reads
        the next step's batch (shard reads and uint8 stacking took 0.3 s a step on the H200 box,
        as long as a whole `compact` step). Batches are pure functions of the step, so reading
        ahead changes nothing; a prefetched batch of another step (after a resume) is dropped."""
        rank, world_size = self.context.rank, self.context.world_size
        if self.config.prefetch_batches and self._prefetcher is None:
            self._prefetcher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparse-avatar-batches")
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == self.step:
            batch = pending[1].result()
        else:
            batch = self.batch_source.batch(self.step, rank, world_size)
        if self._prefetcher is not None and self.step + 1 < self.config.total_steps:
            self._pending = (self.step + 1, self._prefetcher.submit(self._read_ahead, self.step + 1, rank, world_size))
        return batch

    def _read_ahead(self, step: int, rank: int, world_size: int) -> dict:
        """A batch read on the prefetch thread, its host tensors pinned for a CUDA device: a copy
        from pageable memory waits for the GPU's queued work before it returns (the step before
        it, so the host cannot queue ahead), a copy from pinned memory is queued and returns at
        once. H200, `small` compiled and graphed, world batch 16: 0.444 -> 0.405 s a step."""
        batch = self.batch_source.batch(step, rank, world_size)
        if self.context.device.type != "cuda":
            return batch
        return {key: value.pin_memory() if isinstance(value, torch.Tensor) and value.device.type == "cpu" else value for key, value in batch.items()}

    def _step_work(self, batch: dict, generator: torch.Generator) -> tuple:
        """Loss, backward, clipping and the optimizer update: the work a CUDA graph records.
        Returns (loss, metrics, grad_norm) as device values."""
        with self._autocast():
            loss, metrics = self.loss_fn(self.train_module, batch, generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._grad_norm_and_clip()
        self.optimizer.step()
        return loss, metrics, grad_norm

    def _graphed_step_work(self, batch: dict, seed: int) -> tuple:
        """``_step_work`` through the step graphs: replayed where this step's key was captured
        (and the batch has the captured shapes), captured after its warm-up runs, else eager."""
        graphs = self._graphs
        generator = graphs.generator.manual_seed(seed)
        # One graph per (host-side decision, batch shapes): a stage whose batches take a few
        # shapes (the world stage's reference lengths) gets one graph for each.
        key = (self.graph_key(generator) if self.graph_key is not None else None, _batch_signature(batch))
        entry = graphs.captured.get(key)
        if entry is None and graphs.eager_runs[key] >= GRAPH_WARMUP_RUNS:
            try:
                entry = graphs.capture(key, batch, lambda static_batch: self._step_work(static_batch, graphs.generator))
            except Exception as error:  # noqa: BLE001 - any capture failure: the eager step still trains
                # Nothing ran during the failed capture (a capture records, it does not execute),
                # so this step is simply run eagerly, and so is every later one.
                logger.warning("CUDA graph capture of the training step failed (%s: %s, at %s); training with eager steps.",
                               type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "", _where(error))
                logger.debug("the failed capture", exc_info=error)
                self.release_cuda_graphs()
                return self._step_work(batch, torch.Generator(device=self.context.device).manual_seed(seed))
        if entry is None or not entry.accepts(batch):
            graphs.eager_runs[key] += 1
            return graphs.run_eager(lambda: self._step_work(batch, generator))
        graphs.generator.manual_seed(seed)  # the capture drew from it; each replay starts from the step's seed, as eager does
        return entry.replay(batch)

    def train_step(self) -> dict:
        """One optimizer update at ``self.step``; returns the record.

        Only every ``log_every``-th step (and the last) waits for the GPU: there the loss, the
        metrics and the gradient norm become floats, the loss is checked for NaN/inf, and the
        rates are averaged over the steps since the last such record. The steps between queue
        their work without a host sync (a `float()` of the loss every step kept the GPU idle
        while the host caught up); their records hold only ``step`` and ``synced: False``.
        """
        context = self.context
        started = time.perf_counter()
        batch = self._next_batch()
        batch = _move_to_device(batch, context.device)
        data_time = time.perf_counter() - started  # a data-bound run shows up here, not as slow compute
        seed = step_seed(self.config.seed, self.step, context.rank)
        lr = self._set_lr(self.step)
        self.train_module.train()
        if self._graphs is not None:
            loss, metrics, grad_norm = self._graphed_step_work(batch, seed)
        else:
            loss, metrics, grad_norm = self._step_work(batch, torch.Generator(device=context.device).manual_seed(seed))
        if self.ema:
            self.ema.update(self.step)
        self.step += 1
        self.samples_seen += self.batch_source.global_batch_size
        window = self._window
        window["steps"] += 1
        window["data_time_s"] += data_time
        sync = self.step % max(1, self.config.log_every) == 0 or self.step >= self.config.total_steps
        if not sync:
            return {"step": self.step, "synced": False}
        loss_value = all_reduce_mean(loss.detach().float().item(), context)  # waits for the GPU
        if not math.isfinite(loss_value):
            raise UserFacingError(
                f"loss became {loss_value} at step {self.step}; lower --lr (now {self.config.lr}) or enable gradient "
                f"clipping, then resume from the last checkpoint."
            )
        elapsed = time.perf_counter() - window["started"]
        steps = window["steps"]
        record = {
            "step": self.step,
            "synced": True,
            "loss": loss_value,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "samples_per_s": self.batch_source.global_batch_size * steps / elapsed,
            "step_time_s": elapsed / steps,
            "data_time_s": window["data_time_s"] / steps,
            "memory_mb": _memory_mb(context.device),
        }
        for key, value in metrics.items():
            record[key] = all_reduce_mean(float(value), context)
        if "tokens" in metrics:
            # "tokens" is per rank; the rate counts the whole job.
            record["tokens_per_s"] = record["tokens"] * context.world_size / record["step_time_s"]
        self._window = {"started": time.perf_counter(), "steps": 0, "data_time_s": 0.0}
        return record

    def _log(self, record: dict) -> None:
        if not self.context.is_main or not record.get("synced", True):
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / "train_log.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if record["step"] % max(1, self.config.log_every) == 0 or record["step"] == self.config.total_steps:
            shown = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in record.items()
                if k in ("step", "loss", "grad_norm", "lr", "samples_per_s", "memory_mb") or k.startswith("loss_")
            )
            self._print(shown)
        if self.config.tensorboard:
            if self._tensorboard is None:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise UserFacingError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
                self._tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def fit(self, until_step: int | None = None) -> TrainResult:
        """Train until ``until_step`` (default: total_steps), checkpointing on the way and at the end."""
        losses: list[float] = []
        last_checkpoint = None
        record = {"loss": float("nan")}
        # total_steps is read every step: a time-budgeted run (training/personality.py) sets it
        # once it knows its step rate, and the cosine schedule then ends at the budget.
        while self.step < (until := min(until_step or self.config.total_steps, self.config.total_steps)):
            if self.should_stop is not None and self.should_stop():
                break
            step_record = self.train_step()
            if step_record.get("synced", True):
                record = step_record
                losses.append(record["loss"])
            self._log(step_record)
            if self.on_step is not None:
                self.on_step(step_record)
            every = self.config.checkpoint_every
            if every and self.step % every == 0 and self.step < until:
                last_checkpoint = self.save_checkpoint()
            if self.sample_fn and self.config.sample_every and self.step % self.config.sample_every == 0:
                self._run_sample_fn()
        if self.config.final_checkpoint and self.step > 0 and (last_checkpoint is None or not last_checkpoint.name.endswith(f"{self.step:08d}")):
            last_checkpoint = self.save_checkpoint()
        if self._tensorboard is not None:
            self._tensorboard.flush()
        return TrainResult(step=self.step, last_loss=record["loss"], losses=losses, checkpoint=last_checkpoint)

    def _run_sample_fn(self) -> None:
        # Samples come from a full copy of the weights (EMA when on) on the main rank, so sampling
        # never disturbs the training state. Collective: every rank gathers.
        state = self.export_weights(use_ema=True)
        if not self.context.is_main:
            return
        import copy

        if self.parallel_mode == "fsdp":
            # A sharded module cannot be deep-copied into a plain one; rebuild is the stage's job.
            self._print("periodic samples are skipped under FSDP2 (sample from an exported checkpoint instead)")
            return
        sample_model = copy.deepcopy(self.model)
        sample_model.load_state_dict(state)
        sample_model.eval()
        with torch.no_grad():
            self.sample_fn(sample_model, self.step, self.out_dir / "samples")

    def export_weights(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """Full CPU weights (EMA applied to the trainable ones when on); collective under FSDP2."""
        state = state_io.gather_model_state(self.model)
        if use_ema and self.ema:
            for name, shadow in self.ema.shadow.items():
                full = state_io.full_tensor(shadow).detach().cpu()
                if name in state:
                    state[name] = full.to(state[name].dtype)
        return state

