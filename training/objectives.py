"""Training objectives on the AvatarDiT: flow matching (stages 1-3), trajectory distillation
(stage 4) and Diffusion-DPO (stage 5), all built on one ``velocity`` call.

Flow convention (model/dit.py): x_t = t·x_data + (1 - t)·noise, t = 0 noise … 1 data, and the
network predicts the velocity x_data - noise.

Randomness is per SAMPLE: each sample's noise, flow time and condition dropout come from its own
``sample_seeds`` entry (set by the batch source from the global sample index). A sample therefore
trains identically whichever rank and position it lands on, which is what makes a 2-process run
match a 1-process run on the same global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.codecs import codec_for_config
from ..model.flow import flow_errors, flow_loss, model_output, training_step


class StepModule(nn.Module):
    """The module the trainer wraps in DDP / FSDP2: its ``forward(batch)`` is one whole loss.

    DDP only synchronises what runs inside the wrapped ``forward``, and the DiT's reference pass
    and denoising pass are separate methods, so the entire objective must live in one forward.
    ``avatar`` is the model.AvatarModel being trained (parameter names get an ``avatar.`` prefix,
    stripped on export); ``blocks`` exposes the DiT's blocks so FSDP2 shards them one by one.
    """

    def __init__(self, avatar: nn.Module, objective, *, text_conditioner: nn.Module | None = None):
        super().__init__()
        self.avatar = avatar
        self.objective = objective
        self.text_conditioner = text_conditioner

    @property
    def dit(self) -> nn.Module:
        return self.avatar.dit

    @property
    def blocks(self) -> nn.ModuleList:
        return self.avatar.dit.blocks

    def avatar_state_dict(self, state: dict) -> dict:
        """Trainer weights (``avatar.*``, ``text_conditioner.*``) -> AvatarModel state dict."""
        return {name[len("avatar."):]: value for name, value in state.items() if name.startswith("avatar.")}

    def forward(self, batch: dict, generator: torch.Generator | None = None):
        """One loss; ``generator`` is the trainer's per-step one (objectives that draw per-sample
        seeds from the batch ignore it)."""
        return self.objective(self, batch, generator)

    def block_entry_methods(self) -> list[tuple[nn.Module, str]]:
        """Block methods the DiT calls from outside a block's forward (reference pass, static
        resampler): FSDP2 must gather the block's parameters around them too, and the trainer
        compiles them with the blocks (the reference pass runs every block over three times the
        clip's tokens at the world trainer's settings; left eager, its norms, modulation, RoPE
        and casts ran as separate kernels over the step's most tokens)."""
        return [(block, name) for block in self.dit.blocks for name in ("forward_reference", "static_tokens_from_reference") if hasattr(block, name)]


# ----------------------------------------------------------------------------- batch -> latents

def frames_to_latents(dit: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """uint8 or 0..1 float frames [B, T, H, W, 3] -> codec latents [B, C, T, h, w]."""
    if frames.dtype == torch.uint8:
        frames = frames.float() / 255.0
    return codec_for_config(dit.config).encode(frames.float())


def per_sample_generators(seeds: torch.Tensor, device: torch.device, salt: int) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed((int(seed) * 31 + salt) % (2**63 - 1)) for seed in seeds.tolist()]


def per_sample_noise(seeds: torch.Tensor, shape: tuple[int, ...], device: torch.device, salt: int = 0) -> torch.Tensor:
    generators = per_sample_generators(seeds, device, salt)
    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


def per_sample_uniform(seeds: torch.Tensor, device: torch.device, salt: int) -> torch.Tensor:
    generators = per_sample_generators(seeds, device, salt)
    return torch.cat([torch.rand(1, generator=g, device=device) for g in generators])


def logit_normal_time(seeds: torch.Tensor, device: torch.device, mean: float, std: float) -> torch.Tensor:
    normal = per_sample_noise(seeds, (1,), device, salt=11)[:, 0]
    return torch.sigmoid(mean + std * normal)


def reference_caches(dit: nn.Module, batch: dict):
    """Per-layer caches from the batch's reference (None when the batch has no reference)."""
    if "reference_frames" not in batch:
        return None
    reference_latents = frames_to_latents(dit, batch["reference_frames"])
    grid = dit.token_grid(reference_latents.shape)
    tokens_per_frame = grid[1] * grid[2]
    frame_lengths = batch["reference_lengths"].to(reference_latents.device)
    token_frames = (frame_lengths + dit.config.patch_size[0] - 1) // dit.config.patch_size[0]
    reference_kv = dit.encode_reference(reference_latents, batch.get("reference_speech"), token_frames)
    return dit.layer_caches(reference_kv, token_frames * tokens_per_frame)


def velocity(step_module: StepModule, batch: dict, noisy: torch.Tensor, t: torch.Tensor, caches, *, audio_keep=None, output: str = "velocity") -> torch.Tensor:
    """The one denoising call every objective uses (text conditioning applied when present).
    output="velocity" (what trajectories integrate) or "data" (see AvatarDiT.forward)."""
    dit = step_module.dit
    speech = batch.get("target_speech")
    if speech is None:
        speech = torch.zeros(noisy.shape[0], noisy.shape[2], dit.config.speech_feature_dim, device=noisy.device)
        audio_keep = torch.zeros(noisy.shape[0], dtype=torch.bool, device=noisy.device)
    if step_module.text_conditioner is not None and "captions" in batch:
        with step_module.text_conditioner.conditioning(dit, batch["captions"], noisy.device):
            return dit(noisy, t, speech, caches, audio_keep=audio_keep, output=output)
    return dit(noisy, t, speech, caches, audio_keep=audio_keep, output=output)


# ----------------------------------------------------------------------------- flow matching

def model_flow_objective(*, per_sample: bool = True):
    """Stages 2 and 3: the model's own ``model.flow.training_step`` (flow loss, motion-frame
    context, condition dropout, static-consistency loss).

    ``per_sample=True`` (default): once PER SAMPLE with a generator seeded by that sample's seed,
    averaged. The result is then independent of how the global batch is split over ranks (the
    2-process == 1-process guarantee), and each reference keeps its own length (no padding); the
    price is B small forward passes. ``per_sample=False``: one batched call (GPU throughput),
    every reference cut to the shortest valid length in the batch (``shortest_reference``, a host
    int the batch source writes, so the step reads nothing back from the GPU), with the trainer's
    generator (seeded from (seed, step, rank); on CUDA the step then makes no host sync and can be
    captured as a CUDA graph), or without one a CPU generator seeded by the first sample's seed.
    """
    def sample_inputs(batch, rows, reference_length):
        return {
            "target_frames": _as_unit_float(batch["target_frames"][rows]),
            "target_audio": batch["target_speech"][rows],
            "reference_frames": _as_unit_float(batch["reference_frames"][rows, :reference_length]),
            "reference_audio": batch["reference_speech"][rows, :reference_length],
        }

    def objective(step_module: StepModule, batch: dict, generator: torch.Generator | None = None):
        avatar = step_module.avatar
        size = batch["target_frames"].shape[0]
        if per_sample:
            losses, metrics = [], {}
            for i in range(size):
                generator = torch.Generator().manual_seed(int(batch["sample_seeds"][i]))
                loss, sample_metrics = training_step(avatar, sample_inputs(batch, slice(i, i + 1), int(batch["reference_lengths"][i])), generator=generator)
                losses.append(loss)
                for key, value in sample_metrics.items():
                    metrics[key] = metrics.get(key, 0.0) + float(value) / size
            loss = torch.stack(losses).mean()
        else:
            if generator is None:
                generator = torch.Generator().manual_seed(int(batch["sample_seeds"][0]))
            shortest = batch.get("shortest_reference")
            shortest = int(batch["reference_lengths"].min()) if shortest is None else shortest
            # metrics stay 0-dim tensors: the trainer reads them (a host sync) only on logged steps.
            loss, metrics = training_step(avatar, sample_inputs(batch, slice(None), shortest), generator=generator)
        frames, height, width = batch["target_frames"].shape[1:4]
        grid = avatar.dit.token_grid(avatar.codec.latent_shape(frames, height, width))
        metrics["tokens"] = float(size * grid[0] * grid[1] * grid[2])
        return loss, metrics

    return objective


def _as_unit_float(frames: torch.Tensor) -> torch.Tensor:
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def flow_matching_objective(*, use_audio: bool = True, use_reference: bool = True):
    """The model's flow loss (``model.flow.flow_loss``, config.prediction / loss_space) with
    logit-normal t and per-sample condition dropout (for CFG).

    Stage 1 (video pretraining) runs it with ``use_audio=False`` (scene text conditions instead);
    stage 2 and 3 with audio and reference.
    """

    def objective(step_module: StepModule, batch: dict, generator: torch.Generator | None = None):
        dit = step_module.dit
        config = dit.config
        data = frames_to_latents(dit, batch["target_frames"])
        seeds = batch["sample_seeds"]
        noise = per_sample_noise(seeds, tuple(data.shape[1:]), data.device)
        t = logit_normal_time(seeds, data.device, config.timestep_mean, config.timestep_std)
        t_b = t.view(-1, 1, 1, 1, 1)
        noisy = t_b * data + (1 - t_b) * noise
        if use_audio:
            audio_keep = per_sample_uniform(seeds, data.device, salt=21) >= config.audio_dropout
        else:
            audio_keep = torch.zeros(data.shape[0], dtype=torch.bool, device=data.device)
        local_batch = {key: value for key, value in batch.items() if use_audio or key != "target_speech"}
        caches = reference_caches(dit, batch) if use_reference else None
        predicted = velocity(step_module, local_batch, noisy, t, caches, audio_keep=audio_keep if use_audio else None, output=model_output(config))
        loss = flow_loss(config, predicted, data, noise, noisy, t)
        tokens = data.shape[0] * dit.token_grid(data.shape)[0] * dit.token_grid(data.shape)[1] * dit.token_grid(data.shape)[2]
        return loss, {"tokens": float(tokens), "t_mean": float(t.mean())}

    return objective


# ----------------------------------------------------------------------------- distillation

def euler_trajectory(velocity_fn, noise: torch.Tensor, times: list[float]) -> list[torch.Tensor]:
    """States of an Euler ODE solve from t=times[0] to times[-1] (inclusive of both ends)."""
    states = [noise]
    x = noise
    for t0, t1 in zip(times[:-1], times[1:]):
        t = torch.full((x.shape[0],), t0, device=x.device)
        x = x + (t1 - t0) * velocity_fn(x, t)
        states.append(x)
    return states


def distillation_objective(teacher: nn.Module, *, student_steps: int = 4, teacher_substeps: int = 4):
    """Trajectory-segment distillation (progressive-distillation style, in one stage).

    For each sample pick one of the student's ``student_steps`` uniform segments [t_i, t_{i+1}];
    the frozen teacher walks the segment with ``teacher_substeps`` Euler steps from the teacher's
    own state at t_i (reached from the same noise); the student is trained so that ONE Euler
    step of its velocity lands where the teacher landed. The student then needs ``student_steps``
    steps in total where the teacher needs ``student_steps * teacher_substeps``.
    """
    teacher.requires_grad_(False)
    teacher.eval()

    def objective(step_module: StepModule, batch: dict, generator: torch.Generator | None = None):
        dit = step_module.dit
        data = frames_to_latents(dit, batch["target_frames"])
        seeds = batch["sample_seeds"]
        noise = per_sample_noise(seeds, tuple(data.shape[1:]), data.device)
        segment = (per_sample_uniform(seeds, data.device, salt=31) * student_steps).long().clamp(max=student_steps - 1)
        with torch.no_grad():
            teacher_module = StepModule(teacher, None, text_conditioner=step_module.text_conditioner)
            teacher_caches = reference_caches(teacher.dit, batch)
            fine = teacher_substeps * student_steps
            times = [i / fine for i in range(fine + 1)]
            states = euler_trajectory(lambda x, t: velocity(teacher_module, batch, x, t, teacher_caches), noise, times)
            index = torch.arange(data.shape[0], device=data.device)
            stacked = torch.stack(states)  # [fine+1, B, ...]
            start = stacked[segment * teacher_substeps, index]
            end = stacked[(segment + 1) * teacher_substeps, index]
        t_start = segment.float() / student_steps
        target_velocity = (end - start) * student_steps  # one Euler step of size 1/student_steps
        predicted = velocity(step_module, batch, start, t_start, reference_caches(dit, batch))
        loss = F.mse_loss(predicted.float(), target_velocity.float())
        return loss, {"segment_mean": float(segment.float().mean())}

    return objective


@torch.no_grad()
def distillation_report(teacher: nn.Module, student: nn.Module, batches: list[dict], *, student_steps: int = 4, teacher_steps: int = 16) -> dict:
    """Teacher-vs-student: latent MSE against the teacher's many-step result, from the same noise.

    ``teacher_few_steps`` (the teacher run with the student's step count) is the baseline the
    student must beat to show the distillation bought something.
    """
    errors = {"student": [], "teacher_few_steps": []}
    for batch in batches:
        data = frames_to_latents(teacher, batch["target_frames"])
        noise = per_sample_noise(batch["sample_seeds"], tuple(data.shape[1:]), data.device)
        teacher_module, student_module = StepModule(teacher, None), StepModule(student, None)
        teacher_caches, student_caches = reference_caches(teacher.dit, batch), reference_caches(student.dit, batch)

        def solve(module, caches, steps):
            return euler_trajectory(lambda x, t: velocity(module, batch, x, t, caches), noise, [i / steps for i in range(steps + 1)])[-1]

        target = solve(teacher_module, teacher_caches, teacher_steps)
        errors["student"].append(float(F.mse_loss(solve(student_module, student_caches, student_steps), target)))
        errors["teacher_few_steps"].append(float(F.mse_loss(solve(teacher_module, teacher_caches, student_steps), target)))
    return {
        "student_steps": student_steps,
        "teacher_steps": teacher_steps,
        "student_mse_vs_teacher": sum(errors["student"]) / len(errors["student"]),
        "teacher_few_steps_mse_vs_teacher": sum(errors["teacher_few_steps"]) / len(errors["teacher_few_steps"]),
    }


# ----------------------------------------------------------------------------- Diffusion-DPO

def diffusion_dpo_loss(policy_winner_error, policy_loser_error, reference_winner_error, reference_loser_error, beta: float):
    """Diffusion-DPO (Wallace et al. 2023) on per-sample denoising errors.

    The policy is rewarded for lowering its error on the winner MORE than the frozen reference
    does, relative to the loser: loss = -log σ(-β·[(e_w - e_w^ref) - (e_l - e_l^ref)]).
    Returns (loss, implicit reward margin) — the margin is positive when the winner is preferred.
    """
    margin = -((policy_winner_error - reference_winner_error) - (policy_loser_error - reference_loser_error))
    return -F.logsigmoid(beta * margin).mean(), margin.detach()


def dpo_objective(reference_model: nn.Module, *, beta: float = 500.0):
    """Stage 5. Batch: ``winner_frames``, ``loser_frames`` [B, T, H, W, 3] for the same inputs
    (speech, reference); both are noised with the SAME noise and t, as in Diffusion-DPO."""
    reference_model.requires_grad_(False)
    reference_model.eval()

    def per_sample_error(module, batch, data, noise, t, caches):
        t_b = t.view(-1, 1, 1, 1, 1)
        noisy = t_b * data + (1 - t_b) * noise
        config = module.dit.config
        predicted = velocity(module, batch, noisy, t, caches, output=model_output(config))
        return flow_errors(config, predicted, data, noise, noisy, t)  # the stage-2 loss, per sample

    def objective(step_module: StepModule, batch: dict, generator: torch.Generator | None = None):
        dit = step_module.dit
        winner = frames_to_latents(dit, batch["winner_frames"])
        loser = frames_to_latents(dit, batch["loser_frames"])
        seeds = batch["sample_seeds"]
        noise = per_sample_noise(seeds, tuple(winner.shape[1:]), winner.device)
        t = logit_normal_time(seeds, winner.device, dit.config.timestep_mean, dit.config.timestep_std)
        caches = reference_caches(dit, batch)
        policy_w = per_sample_error(step_module, batch, winner, noise, t, caches)
        policy_l = per_sample_error(step_module, batch, loser, noise, t, caches)
        with torch.no_grad():
            reference_module = StepModule(reference_model, None, text_conditioner=step_module.text_conditioner)
            reference_caches_ = reference_caches(reference_model.dit, batch)
            reference_w = per_sample_error(reference_module, batch, winner, noise, t, reference_caches_)
            reference_l = per_sample_error(reference_module, batch, loser, noise, t, reference_caches_)
        loss, margin = diffusion_dpo_loss(policy_w, policy_l, reference_w, reference_l, beta)
        return loss, {"reward_margin": float(margin.mean()), "winner_error": float(policy_w.detach().mean()), "loser_error": float(policy_l.detach().mean())}

    return objective
