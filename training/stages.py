"""The five curriculum stages as configurations of the one trainer (sizes and settings as data).

| stage        | objective                                   | starts from         | trains             |
|--------------|---------------------------------------------|---------------------|--------------------|
| video        | flow matching, scene-text conditioned, no audio | random init      | DiT + text encoder |
| audio        | model.flow.training_step (audio + reference)| stage-1 checkpoint  | DiT                |
| personality  | same, on one person's shards                | stage-2 checkpoint  | LoRA (or full)     |
| distill      | trajectory-segment distillation to 4 steps | stage-2/3 checkpoint| student DiT        |
| dpo          | Diffusion-DPO on preference pairs           | stage-2/3/4 checkpoint | DiT (ref frozen)|

``tiny-smoke`` is stage ``audio`` on the ``tiny`` model with built-in synthetic batches: what
``torchrun --nproc-per-node 2 -m sparse_avatar.train --config tiny-smoke --steps 3 --out DIR``
runs in seconds on a CPU.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from torch import nn

from ..errors import UserFacingError
from . import objectives
from .trainer import TrainerConfig


@dataclass(frozen=True)
class StageConfig:
    name: str
    stage: str  # video | audio | personality | distill | dpo
    model_config: str  # default model size (tiny / small / base / xl)
    trainer: TrainerConfig
    global_batch_size: int = 8
    target_frames: tuple[int, int] = (8, 16)
    reference_frames: tuple[int, int] = (16, 64)
    needs_init: bool = False  # needs --init CHECKPOINT (a previous stage's output)
    lora_rank: int = 0  # personality: 0 = full fine-tune
    student_steps: int = 4
    teacher_substeps: int = 4
    dpo_beta: float = 500.0
    synthetic_data: bool = False
    # One batched flow loss per step instead of one per sample (model_flow_objective(per_sample=
    # False)): a step's result then depends on how the batch is split over processes, and every
    # reference is cut to the batch's shortest; the per-sample loop cost the H200 ~8x its speed
    # (19 M-parameter `compact`, batch 8: 2-3.5 s a step with 0.3 s of it data loading).
    batched_objective: bool = False
    notes: dict = field(default_factory=dict)


STAGE_NAMES = ("video", "audio", "personality", "distill", "dpo")

TRAINING_CONFIGS: dict[str, StageConfig] = {
    "video": StageConfig("video", "video", "small", TrainerConfig(total_steps=100_000, lr=1e-4, warmup_steps=1000, ema_decay=0.9999, checkpoint_every=2000, gradient_checkpointing=True)),
    "audio": StageConfig("audio", "audio", "small", TrainerConfig(total_steps=200_000, lr=1e-4, warmup_steps=1000, ema_decay=0.9999, checkpoint_every=2000, gradient_checkpointing=True), needs_init=False),
    # Personality: a 2-minute reference at 256² is ~3000 frames; 1500 LoRA steps of 16-frame
    # clips see every frame ~8 times, the budget for "≤ 15 min on one H100".
    # The shipped default model (models/avatar/): stage "audio" of the `compact` size on Avatar World
    # shards only (`python -m sparse_avatar world --n 400 --shards --out W`), then
    # `python -m sparse_avatar.train --config world --data W --out RUN [--minutes M]`; a rerun of
    # the same command resumes from RUN's newest checkpoint. The model card (models/avatar/) says
    # how it was run.
    "world": StageConfig("world", "audio", "compact", TrainerConfig(total_steps=20_000, lr=1e-3, warmup_steps=100, ema_decay=0.999, checkpoint_every=500, log_every=25, prefetch_batches=True), global_batch_size=8, target_frames=(16, 16), reference_frames=(16, 48), batched_objective=True),
    "personality": StageConfig("personality", "personality", "small", TrainerConfig(total_steps=1500, lr=5e-4, warmup_steps=50, weight_decay=0.0, ema_decay=0.0, checkpoint_every=500), global_batch_size=4, needs_init=True, lora_rank=16),
    "distill": StageConfig("distill", "distill", "small", TrainerConfig(total_steps=20_000, lr=2e-5, warmup_steps=200, ema_decay=0.999, checkpoint_every=2000), needs_init=True),
    "dpo": StageConfig("dpo", "dpo", "small", TrainerConfig(total_steps=2000, lr=5e-6, warmup_steps=50, weight_decay=0.0, ema_decay=0.0, checkpoint_every=500), global_batch_size=4, needs_init=True),
    "tiny-smoke": StageConfig(
        "tiny-smoke", "audio", "tiny",
        TrainerConfig(total_steps=3, lr=1e-3, warmup_steps=0, ema_decay=0.99, parallel="auto", log_every=1),
        global_batch_size=2, target_frames=(4, 4), reference_frames=(4, 4), synthetic_data=True,
    ),
}


def get_training_config(name: str) -> StageConfig:
    try:
        return TRAINING_CONFIGS[name]
    except KeyError:
        raise UserFacingError(f"unknown training config {name!r}; choose one of: {', '.join(TRAINING_CONFIGS)}.") from None


def with_overrides(config: StageConfig, **trainer_changes) -> StageConfig:
    changes = {k: v for k, v in trainer_changes.items() if v is not None}
    return replace(config, trainer=replace(config.trainer, **changes))


def with_window_caps(config: StageConfig, *, target: int | None = None, reference: int | None = None) -> StageConfig:
    """Cap the longest target / reference window (frames); the shortest follows when above it."""
    changes = {}
    for name, cap in (("target_frames", target), ("reference_frames", reference)):
        if cap is None:
            continue
        if cap < 1:
            raise UserFacingError(f"--{name.replace('_', '-')} must be at least 1 (got {cap}).")
        low, _ = getattr(config, name)
        changes[name] = (min(low, cap), cap)
    return replace(config, **changes)


def build_objective(stage: StageConfig, avatar: nn.Module, *, text_conditioner=None):
    """(objective, frozen companion model or None) for a stage; the companion is the teacher
    (distill) or the DPO reference: a frozen copy of the starting weights."""

    if stage.stage == "video":
        return objectives.flow_matching_objective(use_audio=False, use_reference=False), None
    if stage.stage in ("audio", "personality"):
        return objectives.model_flow_objective(per_sample=not stage.batched_objective), None
    if stage.stage == "distill":
        teacher = copy.deepcopy(avatar)
        return objectives.distillation_objective(teacher, student_steps=stage.student_steps, teacher_substeps=stage.teacher_substeps), teacher
    if stage.stage == "dpo":
        reference = copy.deepcopy(avatar)
        return objectives.dpo_objective(reference, beta=stage.dpo_beta), reference
    raise UserFacingError(f"unknown stage {stage.stage!r}; choose one of: {', '.join(STAGE_NAMES)}.")
