"""The training entry: ``python -m sparse_avatar.train`` or, on several GPUs / hosts,
``torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m sparse_avatar.train
--config STAGE --data SHARDS --out RUN``.

Re-running the same command resumes from the newest checkpoint in ``--out`` (on any process
count). The final weights (EMA when on) are written as a normal model checkpoint
``RUN/model.safetensors`` (LoRA stage: ``RUN/lora.safetensors``).
"""
from __future__ import annotations
# The project's heavier modules are imported inside the functions that need them: this entry point
# runs on GPU boxes without PyAV (media/) and `--help` must not load torch.compile machinery.

import argparse
import json
import sys
from pathlib import Path

import torch

from ..errors import UserFacingError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparse_avatar.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config: video, audio, personality, distill, dpo or tiny-smoke")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, train_log.jsonl, final model)")
    parser.add_argument("--data", help="shard folder from `preprocess`, or 'synthetic' for built-in procedural clips (smoke runs; the default of tiny-smoke)")
    parser.add_argument("--pairs", help="dpo: preference pairs JSONL")
    parser.add_argument("--video", help="personality: learn from this video of the person (with its sound) instead of --data shards; "
                                        "the same call as `python -m sparse_avatar personalize` and the Train Avatar node (one GPU)")
    parser.add_argument("--allow-cpu", action="store_true", help="personality --video: train on a CPU anyway (refused otherwise)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training time budget: the step count (and so the LR schedule) is fitted to it, then the final model is written; "
                             "personality --video: default 10 (0 = only --steps); on --data: default none (train --steps)")
    parser.add_argument("--init", help="starting checkpoint (.safetensors); required from the personality stage on")
    parser.add_argument("--model-config", help="model size (tiny/small/base/xl); default: the stage's")
    from .cli_commands import add_speech_features_option

    add_speech_features_option(parser)  # personality --video: what an untrained model hears
    parser.add_argument("--steps", type=int, help="total optimizer steps (sets the LR schedule length)")
    parser.add_argument("--batch-size", type=int, help="GLOBAL batch size (split over processes)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--warmup-steps", type=int)
    parser.add_argument("--ema-decay", type=float)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--sample-every", type=int, help="write RUN/samples/step-N.mp4 (target | model sample) every N steps")
    parser.add_argument("--target-frames", type=int, help="longest target window in frames (default: the stage's; lower to save memory)")
    parser.add_argument("--reference-frames", type=int, help="longest reference window in frames (default: the stage's)")
    parser.add_argument("--lora-rank", type=int, help="personality: LoRA rank (0 = full fine-tune)")
    parser.add_argument("--parallel", choices=("auto", "none", "ddp", "fsdp"), default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--precision", choices=("bf16", "fp32"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="replay each training step as a CUDA graph (default: on for the batched world stage on one GPU "
                             "without gradient checkpointing)")
    parser.add_argument("--tensorboard", action="store_true", default=None)
    parser.add_argument("--no-resume", action="store_true", help="start fresh even if --out has checkpoints")


def run(args: argparse.Namespace) -> dict:
    from ..model.checkpoint import load_checkpoint, new_model, save_checkpoint
    from ..model.flow import keeps_reference
    from .distributed import init_distributed, shutdown_distributed
    from .stages import build_objective, get_training_config, with_overrides, with_window_caps
    from .budget import TimeBudget
    from .data import TensorOnlyBatches
    from .objectives import StepModule
    from .personality import minutes_budget
    from .trainer import Trainer

    stage = get_training_config(args.config)
    stage = with_overrides(
        stage, total_steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every, sample_every=args.sample_every, parallel=args.parallel, precision=args.precision, seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing, compile=args.compile, tensorboard=args.tensorboard,
    )
    stage = with_window_caps(stage, target=args.target_frames, reference=args.reference_frames)
    if getattr(args, "video", None):
        return _personalize_from_video(args, stage)
    if getattr(args, "speech_features", None):
        raise UserFacingError("--speech-features is for --config personality --video: training shards hold the log-mel features "
                              "they were made with; leave it out.")
    if stage.needs_init and not args.init:
        raise UserFacingError(f"the {stage.stage} stage starts from a trained model: pass --init CHECKPOINT.safetensors (the previous stage's RUN/model.safetensors).")
    context = init_distributed(args.device)
    try:
        torch.manual_seed(stage.trainer.seed)
        if args.init:
            avatar = load_checkpoint(args.init, device="cpu")
        else:
            avatar = new_model(args.model_config or stage.model_config, seed=stage.trainer.seed)
        base_fingerprint = avatar.fingerprint()
        global_batch = args.batch_size or stage.global_batch_size
        source = make_batch_source(stage, avatar, args, global_batch)

        lora_rank = stage.lora_rank if args.lora_rank is None else args.lora_rank
        if stage.stage == "personality" and lora_rank > 0:
            from .lora import apply_lora

            apply_lora(avatar.dit, rank=lora_rank)
        graphed = _uses_cuda_graphs(stage, args, context)
        if graphed:
            stage = with_overrides(stage, cuda_graphs=True)
        text_conditioner = None
        if stage.stage == "video":
            from .text_encoder import TextConditioner

            text_conditioner = TextConditioner(avatar.config.hidden)
        objective, companion = build_objective(stage, avatar, text_conditioner=text_conditioner)
        if companion is not None:
            companion.to(context.device)
        step_module = StepModule(avatar, objective, text_conditioner=text_conditioner)
        metadata = {"model_config": avatar.config.to_json(), "stage": stage.stage, "training_config": stage.name}
        budget = TimeBudget(minutes_budget(args.minutes), stage.trainer.total_steps, stage.trainer)
        trainer = Trainer(
            step_module, lambda module, batch, generator: module(batch, generator), TensorOnlyBatches(source) if graphed else source, stage.trainer, args.out,
            context=context, model_metadata=metadata, sample_fn=make_sample_fn(source, stage) if stage.stage != "dpo" else None,
            on_step=lambda record: budget.on_step(record["step"]), should_stop=lambda: budget.spent(trainer.step),
            graph_key=(lambda generator: keeps_reference(avatar.config, generator)) if graphed else None,
        )
        if not args.no_resume:
            trainer.resume()
        # A resumed run starts from the stage's schedule (the killed run's fitted one is not kept
        # here), so its first fit sets the warm-up too (fitted=False), as a fresh run's does.
        budget.start(first_step=trainer.step, fitted=False)
        result = trainer.fit()
        summary = {"step": result.step, "last_loss": result.last_loss, "world_size": context.world_size, "parallel": trainer.parallel_mode}
        export_final(trainer, step_module, stage, avatar, base_fingerprint, Path(args.out), context, save_checkpoint, lora_rank)
        if stage.stage == "distill" and context.is_main:
            summary["distillation_report"] = write_distillation_report(companion, avatar, source, stage, Path(args.out), context.device)
        if context.is_main:
            print(json.dumps({"done": summary}), flush=True)
        return summary
    finally:
        shutdown_distributed(context)


def _personalize_from_video(args: argparse.Namespace, stage) -> dict:
    """--config personality --video: ``training.personality.personalize_video`` (Train Avatar's
    path: the whole clip on one device, one shared reference per step, dub samples, a time
    budget), writing RUN/model.safetensors (or RUN/lora.safetensors with --lora-rank > 0)."""
    import os

    from .personality import personalize_video, refuse_cpu_training, starting_model

    if stage.stage != "personality":
        raise UserFacingError(f"--video is for --config personality (learning one person); the {stage.stage} stage trains on --data shards.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserFacingError("personality training from a --video runs on one GPU; start it with python -m sparse_avatar.train, not torchrun.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    refuse_cpu_training(device, args.allow_cpu)
    avatar = starting_model(args.init, args.model_config or stage.model_config, device=device, seed=args.seed or 0,
                            speech_features=args.speech_features)
    lora_rank = 0 if args.lora_rank is None else args.lora_rank
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    minutes = 10.0 if args.minutes is None else args.minutes
    path = personalize_video(avatar, args.video, out / ("lora.safetensors" if lora_rank > 0 else "model.safetensors"), minutes=minutes,
                             steps=args.steps or 100_000, lr=args.lr or 1e-3, lora_rank=lora_rank, seed=args.seed or 0)
    summary = {"written": str(path)}
    print(json.dumps({"done": summary}), flush=True)
    return summary


# A batched stage's references are cut to a multiple of this many frames (training/data.py): with
# the world stage's 16-48 frames, at most six reference shapes, so six CUDA graphs or compiled shapes.
BATCHED_REFERENCE_MULTIPLE = 8


def _uses_cuda_graphs(stage, args, context) -> bool:
    """--cuda-graphs, or by default: the batched world stage on one CUDA device without gradient
    checkpointing (its step draws from the trainer's generator and makes no host sync; the
    per-sample stages read their seeds back every step, which a capture cannot hold)."""
    if getattr(args, "cuda_graphs", None) is not None:
        return args.cuda_graphs
    return (stage.batched_objective and context.device.type == "cuda" and context.world_size == 1
            and not stage.trainer.gradient_checkpointing and stage.trainer.parallel in ("auto", "none"))


def make_batch_source(stage, avatar, args, global_batch: int):
    if stage.stage == "dpo":
        from .preferences import PreferencePairs

        if not args.pairs:
            raise UserFacingError("the dpo stage needs --pairs PAIRS.jsonl (see training/preferences.py for the format).")
        return PreferencePairs(args.pairs, global_batch_size=global_batch, frame_size=avatar.config.frame_size, seed=stage.trainer.seed)
    if args.data == "synthetic" or (stage.synthetic_data and not args.data):
        from ..avatar_world.batches import WorldBatches  # the test world, drawn into batches (no files)

        return WorldBatches(
            global_batch_size=global_batch, frame_size=avatar.config.frame_size, speech_dim=avatar.config.speech_feature_dim,
            target_frames=stage.target_frames[1], reference_frames=stage.reference_frames[1], seed=stage.trainer.seed,
        )
    if not args.data:
        raise UserFacingError(f"--data SHARDS is required for the {stage.name} config (make shards with `python -m sparse_avatar preprocess`).")
    from .data import ShardedClipDataset

    dataset = ShardedClipDataset(
        args.data, global_batch_size=global_batch, target_frames=stage.target_frames, reference_frames=stage.reference_frames, seed=stage.trainer.seed,
        cut_references_to_multiple=BATCHED_REFERENCE_MULTIPLE if stage.batched_objective else 0,
    )
    dataset.require_model(avatar.config)
    return dataset


def make_sample_fn(source, stage):
    """Periodic sample video: the first sample of step 0's batch, target | model (Euler, 8 steps)."""

    def sample(step_module, step: int, folder: Path) -> None:
        from ..media import write_video
        from . import objectives

        batch = {k: (v[:1] if isinstance(v, (torch.Tensor, list)) else v) for k, v in source.batch(0, 0, 1).items()}
        device = next(step_module.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        dit = step_module.dit
        data = objectives.frames_to_latents(dit, batch["target_frames"])
        noise = objectives.per_sample_noise(batch["sample_seeds"], tuple(data.shape[1:]), data.device)
        caches = objectives.reference_caches(dit, batch) if stage.stage != "video" else None
        steps = 8
        latents = objectives.euler_trajectory(lambda x, t: objectives.velocity(step_module, batch, x, t, caches), noise, [i / steps for i in range(steps + 1)])[-1]
        frames = step_module.avatar.codec.decode(latents.float())[0]
        target = batch["target_frames"][0].float() / 255.0
        side_by_side = (torch.cat([target.to(frames.device), frames], dim=2).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        folder.mkdir(parents=True, exist_ok=True)
        write_video(folder / f"step-{step:08d}.mp4", side_by_side, 25.0)

    return sample


def write_distillation_report(teacher, student, source, stage, out_dir: Path, device) -> dict:
    """Teacher (many steps) vs student (few steps) vs teacher (few steps) on 4 held batches."""
    from . import objectives

    batches = []
    for step in range(4):
        batch = source.batch(10_000_000 + step, 0, 1)  # far beyond training steps: not the ones trained on
        batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    student.eval()
    report = objectives.distillation_report(
        teacher, student, batches, student_steps=stage.student_steps, teacher_steps=stage.student_steps * stage.teacher_substeps * 2
    )
    (out_dir / "distillation_report.json").write_text(json.dumps(report, indent=1))
    print(
        f"distillation: student {report['student_steps']} steps MSE {report['student_mse_vs_teacher']:.4g} vs teacher "
        f"{report['teacher_few_steps_mse_vs_teacher']:.4g} at the same step count (reference: teacher {report['teacher_steps']} steps)",
        flush=True,
    )
    return report


def export_final(trainer, step_module, stage, avatar, base_fingerprint, out_dir: Path, context, save_checkpoint, lora_rank: int) -> None:
    """Final weights as a normal model checkpoint (EMA applied), or the LoRA file."""
    weights = trainer.export_weights(use_ema=True)  # collective under FSDP2
    if not context.is_main:
        return
    avatar_state = step_module.avatar_state_dict(weights)
    if stage.stage == "personality" and lora_rank > 0:
        from .lora import save_lora

        export = avatar if trainer.parallel_mode != "fsdp" else None
        if export is None:
            raise UserFacingError("LoRA export under FSDP2 is not supported; train the personality stage with --parallel ddp.")
        avatar.load_state_dict(avatar_state)
        save_lora(avatar.dit, out_dir / "lora.safetensors", base_fingerprint=base_fingerprint, extra_metadata={"steps": str(trainer.step)})
        return
    from ..model.checkpoint import new_model

    fresh = new_model(avatar.config)
    fresh.dit.load_state_dict({k[len("dit."):]: v for k, v in avatar_state.items() if k.startswith("dit.")})
    save_checkpoint(fresh, out_dir / "model.safetensors", training_stage=stage.stage, extra_metadata={"steps": str(trainer.step)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UserFacingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
