"""Stage 3 as one call: fine-tune a LoRA on one person's video (what a "Train Avatar" node runs).

    lora_path = finetune_personality(model, crops, speech, out_path, steps=1500)

``crops``: uint8 [T, S, S, 3] face crops at the model's frame size (``media.crop_faces``),
``speech``: float32 [T, F] speech features of the same video (``media.speech_features``). The
video becomes a one-clip shard in a temporary folder, so sampling is exactly the dataset's:
target windows and references from other times of the same video, varied lengths. Progress and
cancellation hooks are plain callables (the node passes ComfyUI's progress bar and interrupt
flag); on cancel the LoRA trained so far is still written.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserFacingError


def finetune_personality(
    model,
    crops: np.ndarray,
    speech: np.ndarray,
    out_path,
    *,
    steps: int = 1500,
    lora_rank: int = 16,
    lr: float = 5e-4,
    batch_size: int = 4,
    target_frames: tuple[int, int] = (8, 16),
    reference_frames: tuple[int, int] = (16, 64),
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> Path:
    """Train a LoRA on ``model`` (an AvatarModel, changed in place: LoRA layers are added) and
    write it to ``out_path`` (.safetensors, tied to the model's fingerprint). Returns the path."""
    from safetensors.numpy import save_file

    from .data import SHARD_FORMAT, ShardedClipDataset
    from .lora import apply_lora, save_lora
    from .objectives import StepModule, model_flow_objective
    from .preprocess import write_index
    from .trainer import Trainer, TrainerConfig

    crops = np.ascontiguousarray(crops, dtype=np.uint8)
    speech = np.ascontiguousarray(speech, dtype=np.float32)
    size = model.config.frame_size
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise UserFacingError(f"personality fine-tuning needs face crops [T, {size}, {size}, 3] at the model's frame size; got {crops.shape}. Crop with media.crop_faces.")
    if speech.shape != (crops.shape[0], model.config.speech_feature_dim):
        raise UserFacingError(
            f"speech features must be [{crops.shape[0]}, {model.config.speech_feature_dim}] (one per frame); got {speech.shape}. Compute them with media.speech_features."
        )
    shortest = target_frames[0] + reference_frames[0]
    if crops.shape[0] < shortest:
        raise UserFacingError(f"the video has {crops.shape[0]} frames; personality fine-tuning needs at least {shortest} (a few seconds of the person talking).")
    base_fingerprint = model.fingerprint()
    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="sparse-avatar-personality-") as workdir:
        shards = Path(workdir) / "shards"
        (shards / "clips").mkdir(parents=True)
        metadata = {"format": SHARD_FORMAT, "version": "1", "person": "person", "caption": "", "fps": "25.0"}
        save_file({"frames": crops, "speech": speech}, str(shards / "clips" / "person.safetensors"), metadata=metadata)
        write_index(shards)
        dataset = ShardedClipDataset(
            shards, global_batch_size=batch_size, target_frames=target_frames,
            reference_frames=(reference_frames[0], min(reference_frames[1], crops.shape[0] - target_frames[0])), seed=seed,
        )
        apply_lora(model.dit, rank=lora_rank)
        config = TrainerConfig(total_steps=steps, lr=lr, warmup_steps=min(50, steps // 10), weight_decay=0.0, ema_decay=0.0, seed=seed, parallel="none")
        from .distributed import DistributedContext

        trainer = Trainer(
            StepModule(model, model_flow_objective(per_sample=False)), lambda m, b, g: m(b), dataset, config, Path(workdir) / "run",
            context=DistributedContext(0, 1, 0, device, None), log=lambda line: None,
            on_step=(lambda record: progress(record["step"], steps, record["loss"])) if progress else None,
            should_stop=should_cancel,
        )
        result = trainer.fit()
    model.forget_fingerprint()
    if result.step == 0:
        raise UserFacingError("personality fine-tuning was cancelled before the first step; nothing was written.")
    return save_lora(model.dit, out_path, base_fingerprint=base_fingerprint, extra_metadata={"steps": str(result.step), "lora_rank": str(lora_rank)})


def lora_parameter_count(model) -> int:
    from .lora import lora_layers

    return sum(layer.down.numel() + layer.up.numel() for layer in lora_layers(model.dit).values())

