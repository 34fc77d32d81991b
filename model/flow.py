"""Flow matching (rectified flow): the training objective and the samplers.

Convention: flow time t runs from 0 (pure noise x0) to 1 (data x1); x_t = t·x1 + (1 - t)·x0 and
the network predicts the velocity v = x1 - x0. Noise level sigma = 1 - t.

- Training times are logit-normal (t = sigmoid(N(mean, std)): most effort on middle noise
  levels), then resolution-shifted (SD3): more tokens per frame need more time at high noise.
- Samplers integrate dx/dt = v from t=0 to 1 on the same shifted grid: ``euler`` (1 evaluation
  per step), ``heun`` (2, second order) and ``dpmpp_2m`` (DPM-Solver++(2M) written for the flow
  schedule alpha=t, sigma=1-t: second order from the previous step's prediction, so 1 evaluation
  per step; best at few steps).
- Guidance has two scales: reference (identity) and audio (lip sync), combined as
  v = v(∅,∅) + g_ref·(v(ref,∅) - v(∅,∅)) + g_audio·(v(ref,audio) - v(ref,∅)).
"""
from __future__ import annotations

import functools
import random
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserFacingError
from .dit import LayerCache
from .masks import dub_mask, jittered_dub_masks, known_cells, person_training_masks

SAMPLERS = ("euler", "heun", "dpmpp_2m")
MAX_STEPS = 50


class SamplingCancelled(Exception):
    """Raised between sampler steps when should_cancel() returns True."""


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift on flow time: sigma' = shift·sigma / (1 + (shift - 1)·sigma), sigma = 1 - t."""
    if shift == 1.0:
        return t
    sigma = 1.0 - t
    return 1.0 - shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_training_times(batch: int, *, mean: float, std: float, shift: float, generator=None) -> torch.Tensor:
    """Logit-normal, resolution-shifted flow times [batch], drawn on the generator's device."""
    device = generator.device if generator is not None else None
    normal = torch.randn(batch, generator=generator, device=device) * std + mean
    return shift_time(torch.sigmoid(normal), shift)


def sampling_times(steps: int, shift: float) -> torch.Tensor:
    """Grid of steps+1 flow times from 0 to 1 (float64 for exact solver coefficients)."""
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift)


def _as_known(known, x):
    if known is None:
        return None
    latents, mask = known
    return latents.to(x.dtype), mask.to(x.dtype)


def _impose_known(x, t, known, noise):
    """Known content (motion frames, dub source outside the mask) follows its exact noising path."""
    if known is None:
        return x
    latents, mask = known
    return mask * (t * latents + (1.0 - t) * noise) + (1.0 - mask) * x


def check_sampler(sampler: str, steps: int) -> None:
    if sampler not in SAMPLERS:
        raise UserFacingError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}.")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UserFacingError(f"steps must be an integer from 1 to {MAX_STEPS}; got {steps!r}.")


def sample_flow(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    *,
    steps: int,
    sampler: str = "euler",
    shift: float = 1.0,
    known=None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Integrate velocity(x, t[B]) from noise (t=0) to data (t=1).

    known: optional (latents, mask) — where mask is 1 the result is the known latents, and during
    sampling those cells follow their exact noising path (RePaint-style replacement).
    on_step(step_index, steps, x) after every step; should_cancel() checked before every step.
    """
    check_sampler(sampler, steps)
    times = sampling_times(steps, shift)
    known = _as_known(known, noise)
    batch = noise.shape[0]
    x = noise
    previous_denoised = None
    previous_h = None

    def evaluate(x_now, t_now):
        x_now = _impose_known(x_now, t_now, known, noise)
        return x_now, velocity(x_now, torch.full((batch,), float(t_now), device=noise.device, dtype=torch.float32)).to(x_now.dtype)

    for i in range(steps):
        if should_cancel is not None and should_cancel():
            raise SamplingCancelled(f"cancelled before step {i + 1} of {steps}")
        t, t_next = float(times[i]), float(times[i + 1])
        x, v = evaluate(x, t)
        if sampler == "euler":
            x = x + (t_next - t) * v
        elif sampler == "heun":
            x_euler = x + (t_next - t) * v
            x_euler, v_next = evaluate(x_euler, t_next)
            x = x + (t_next - t) * 0.5 * (v + v_next)
        else:  # dpmpp_2m in data prediction: alpha = t, sigma = 1 - t
            denoised = x + (1.0 - t) * v
            sigma, sigma_next = 1.0 - t, 1.0 - t_next
            if sigma_next <= 0.0:
                x = denoised  # final step: the data prediction itself
                h = None
            else:
                # exp(-h) = (alpha_t·sigma_next) / (sigma_t·alpha_next), h = lambda_next - lambda_t
                ratio = (t * sigma_next) / (sigma * t_next)
                h = None if ratio <= 0.0 else -torch.log(torch.tensor(ratio, dtype=torch.float64)).item()
                blended = denoised
                if previous_denoised is not None and previous_h is not None and h is not None and h > 0:
                    r = previous_h / h
                    blended = (1.0 + 1.0 / (2.0 * r)) * denoised - (1.0 / (2.0 * r)) * previous_denoised
                x = (sigma_next / sigma) * x + t_next * (1.0 - ratio) * blended
            previous_denoised, previous_h = denoised, h
        if on_step is not None:
            on_step(i, steps, x)
    return _impose_known(x, 1.0, known, noise)


def guided_velocity(model, caches, speech_features, *, audio_guidance: float = 1.0, reference_guidance: float = 1.0, context_latents=None, context_mask=None, forced_blocks=None):
    """velocity(x, t) for the sampler, with separate reference and audio guidance (see module doc).
    forced_blocks: reference blocks every layer must attend to ([1, 1, nQ, F], -1 = none)."""
    dit = model.dit
    batch = speech_features.shape[0]
    keep = torch.ones(batch, dtype=torch.bool, device=speech_features.device)
    drop = torch.zeros_like(keep)

    def call(x, t, with_reference, with_audio):
        return dit(
            x, t, speech_features, caches if with_reference else None, context_latents=context_latents, context_mask=context_mask,
            audio_keep=keep if with_audio else drop, forced_blocks=forced_blocks if with_reference else None,
        )

    def velocity(x, t):
        full = call(x, t, True, True)
        if audio_guidance == 1.0 and reference_guidance == 1.0:
            return full
        reference_only = call(x, t, True, False)
        if reference_guidance == 1.0:
            return reference_only + audio_guidance * (full - reference_only)
        unconditional = call(x, t, False, False)
        return unconditional + reference_guidance * (reference_only - unconditional) + audio_guidance * (full - reference_only)

    return velocity


#################################################################################
#                               Training objective                              #
#################################################################################

def _latents(model, batch, latents_key, frames_key, required=True):
    if batch.get(latents_key) is not None:
        return batch[latents_key].to(model.device, model.dtype)
    if batch.get(frames_key) is not None:
        return model.encode_frames(batch[frames_key].to(model.device))
    if required:
        raise UserFacingError(f"the training batch needs {latents_key!r} or {frames_key!r}.")
    return None


def _split_reference_halves(reference_kv, frames: int, tokens_per_frame: int, generator):
    """Two disjoint, time-shuffled halves of the reference frames (as token subsets of each
    layer's K/V): the reference pass is frame-local, so a subset of frames' K/V is exactly what
    the pass would give for that subset alone."""
    order = torch.randperm(frames, generator=generator, device=generator.device if generator is not None else None)
    halves = order[: frames // 2].sort().values, order[frames // 2 :].sort().values
    result = []
    for half in halves:
        token_index = (half[:, None] * tokens_per_frame + torch.arange(tokens_per_frame, device=half.device)[None]).reshape(-1)
        result.append([(k[:, :, token_index.to(k.device)], v[:, :, token_index.to(v.device)]) for k, v in reference_kv])
    return result


def _expand_caches(caches, batch: int):
    """Caches of one shared reference (batch 1) -> the batch's size. The reference PASS ran once;
    the copies are made contiguous because every attention backend indexes the batch by stride."""
    if caches is None or batch == 1 or caches[0].ref_k.shape[0] == batch:
        return caches
    def grow(tensor):
        return None if tensor is None else tensor.expand(batch, *tensor.shape[1:]).contiguous()
    return [LayerCache(grow(c.static_k), grow(c.static_v), grow(c.ref_k), grow(c.ref_v), grow(c.centroids), grow(c.ref_lengths)) for c in caches]


def dub_context(model, target: torch.Tensor, generator=None, region: torch.Tensor | None = None) -> torch.Tensor:
    """Known-cell mask [B, 1, T, h, w] of dub samples: everything but the lower face. ``region``
    (the clip's own dub mask [S, S] / [1 or B, S, S], 1 = re-render; ``model.masks.person_dub_mask``)
    is filled grown or shrunk a little, or in a share of samples the box; None: the jittered box.
    A latent cell is known only if none of its pixels is to be re-rendered, as in dub rendering."""
    batch, _, time, rows, cols = target.shape
    pixel_masks = jittered_dub_masks(batch, model.config.frame_size, generator=generator).to(target.device)
    if region is not None:
        pixel_masks = person_training_masks(region, pixel_masks, model.codec.spatial_factor, generator)
    known = known_cells(pixel_masks, model.codec.spatial_factor)  # [B, h, w]
    return known[:, None, None].expand(batch, 1, time, rows, cols).to(target.dtype)


def mouth_cell_weights(model, device=None, weight: float | None = None) -> torch.Tensor | None:
    """Loss weights [1, 1, 1, h, w] of the latent cells: ``weight`` (default
    config.mouth_loss_weight) on the cells the dub mask touches, 1 elsewhere; None when the
    weight is 1 (a plain mean)."""
    weight = float(model.config.mouth_loss_weight if weight is None else weight)
    if weight <= 0:
        raise UserFacingError(f"the mouth loss weight must be positive; got {weight}.")
    if weight == 1.0:
        return None
    return _mouth_cell_weights(model.config.frame_size, model.codec.spatial_factor, weight, str(torch.device(device or "cpu")))


@functools.lru_cache(maxsize=8)
def _mouth_cell_weights(size: int, factor: int, weight: float, device: str) -> torch.Tensor:
    # Cached: built on the host once, not copied to the GPU every training step.
    region = 1.0 - known_cells(torch.from_numpy(dub_mask(size)), factor)
    return (1.0 + (weight - 1.0) * region).to(device)[None, None, None]


def flow_errors(config, predicted: torch.Tensor, target: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor,
                cell_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample training error [B] in config.loss_space. ``predicted`` is what the network
    predicts (config.prediction; ``model_output(config)`` names the forward's output for it):
    the velocity for "v", the clean latents for "x". x-prediction with loss "v": velocity MSE
    with 1 - t clamped at 0.05, as in JiT (an almost clean sample's velocity would otherwise
    weigh hundreds of times more); loss "x": clean-data MSE. The one flow loss of every stage."""
    predicted, target, noise, noisy = predicted.float(), target.float(), noise.float(), noisy.float()
    sigma = (1.0 - t.float()).view(-1, *([1] * (target.dim() - 1)))
    if config.prediction == "v":
        difference = predicted - (target - noise) if config.loss_space == "v" else noisy + sigma * predicted - target
    elif config.loss_space == "x":
        difference = predicted - target
    else:
        difference = (predicted - target) / sigma.clamp_min(0.05)
    if cell_weights is None:
        return difference.pow(2).flatten(1).mean(1)
    cell_weights = cell_weights.float().expand_as(difference)
    return (difference.pow(2) * cell_weights).flatten(1).mean(1) / cell_weights.flatten(1).mean(1)


def flow_loss(config, predicted, target, noise, noisy, t, cell_weights=None) -> torch.Tensor:
    """``flow_errors`` averaged over the batch."""
    return flow_errors(config, predicted, target, noise, noisy, t, cell_weights).mean()


def model_output(config) -> str:
    """The AvatarDiT.forward output that config.prediction learns: "velocity" or "data"."""
    return "data" if config.prediction == "x" else "velocity"


def keeps_reference(config, generator: torch.Generator | None) -> bool:
    """Whether ``training_step`` trains this batch with its reference (else: reference dropout,
    for guidance). The one decision the host makes about which code runs: from a CUDA generator
    it comes from the generator's seed, not its stream, because reading a device number back
    would wait for the GPU; so it is known before the step runs (the trainer's CUDA graphs keep
    one graph per answer). A CPU generator (or none) draws it from its stream."""
    if generator is None or generator.device.type == "cpu":
        return float(torch.rand((), generator=generator)) >= config.reference_dropout
    return random.Random(generator.initial_seed() ^ 0x5DEECE66D).random() >= config.reference_dropout


def training_step(model, batch: dict, *, generator: torch.Generator | None = None, dub_context_prob: float | None = None,
                  mouth_loss_weight: float | None = None):
    """One flow-matching loss on a batch; the trainer calls this for every stage.

    batch keys (tensors, batch size B, T target frames, Tr reference frames):
      target_frames [B, T, H, W, 3] float 0..1  or  target_latents [B, C, T, h, w]
      target_audio [B, T, F]            speech features, one per target frame
      reference_frames [B or 1, Tr, H, W, 3]  or  reference_latents [B or 1, C, Tr, h, w]
                                        (batch 1: one reference shared by every sample, as in
                                        personality fine-tuning on one video: the reference
                                        pass then runs once, not B times)
      reference_audio [B or 1, Tr, F]   optional: the reference's own speech features
      context_frames / context_latents + context_mask [B, 1, T, h, w]   optional (dub mode:
                                        the masked source; 1 = visible/known)
      dub_region [1 or B, S, S]         optional: the clip's own dub mask (1 = re-render) that
                                        dub samples hide (model.masks.person_dub_mask); else the box
    Condition dropout for guidance (config.audio_dropout per sample, config.reference_dropout
    per batch), dub samples (config.dub_context_prob per sample: the target with the lower face
    hidden as context) and motion-frame conditioning (config.motion_frames_prob: the first
    1..max frames are given as known context, as the long-video pipeline does) happen here.
    dub_context_prob and mouth_loss_weight override the config's (personality fine-tuning trains
    dub, and weights the mouth, on any base).
    Randomness comes from ``generator`` on ITS device: a CPU generator reproduces across
    devices; a CUDA generator (the personality path) keeps the step free of host syncs.
    Returns (loss, metrics): metrics are 0-dim tensors (no host sync here; the trainer reads
    them when it logs): loss, flow_loss, static_consistency, t_mean.
    """
    config = model.config
    dit = model.dit
    target = _latents(model, batch, "target_latents", "target_frames")
    reference = _latents(model, batch, "reference_latents", "reference_frames")
    device, dtype = target.device, target.dtype
    size, time_len = target.shape[0], target.shape[2]
    audio = batch["target_audio"].to(device, torch.float32)
    reference_audio = batch.get("reference_audio")
    reference_audio = reference_audio.to(device, torch.float32) if reference_audio is not None else None

    random_device = generator.device if generator is not None else torch.device("cpu")

    def uniform(count: int) -> torch.Tensor:
        return torch.rand(count, generator=generator, device=random_device).to(device)

    context = _latents(model, batch, "context_latents", "context_frames", required=False)
    if context is None:
        context = torch.zeros_like(target)
        mask = torch.zeros_like(target[:, :1])
    else:
        mask = batch["context_mask"].to(device, dtype)
    dub_context_prob = config.dub_context_prob if dub_context_prob is None else dub_context_prob
    if dub_context_prob > 0:
        is_dub = (uniform(size) < dub_context_prob).to(dtype)[:, None, None, None, None]
        dub_known = dub_context(model, target, generator, region=batch.get("dub_region")) * is_dub
        context = dub_known * target + (1 - dub_known) * context
        mask = torch.maximum(mask, dub_known)
    if config.motion_frames_prob > 0 and time_len > 1:
        use_motion = uniform(size) < config.motion_frames_prob
        counts = torch.randint(1, max(2, min(config.max_motion_frames, time_len - 1) + 1), (size,), generator=generator, device=random_device).to(device)
        counts = torch.where(use_motion, counts, torch.zeros_like(counts))
        motion = (torch.arange(time_len, device=device)[None] < counts[:, None]).to(dtype)[:, None, :, None, None]
        context = motion * target + (1 - motion) * context
        mask = torch.maximum(mask, motion.expand_as(mask))

    tokens_per_frame = dit.token_grid(target.shape)[1] * dit.token_grid(target.shape)[2]
    shift = model.resolution_shift(tokens_per_frame)
    t = sample_training_times(size, mean=config.timestep_mean, std=config.timestep_std, shift=shift, generator=generator).to(device)
    if random_device.type != "cpu" or device.type == "cpu":
        noise = torch.randn(target.shape, generator=generator, device=random_device).to(device, dtype)
    else:
        # Drawing the noise on the host and copying it cost ~60 ms a step on an H100 (batch 4,
        # 16 frames at 256²); a device generator seeded from the host one stays reproducible.
        noise_generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        noise = torch.randn(target.shape, generator=noise_generator, device=device, dtype=dtype)
    t_b = t.to(dtype)[:, None, None, None, None]
    noisy = t_b * target + (1 - t_b) * noise
    audio_keep = uniform(size) >= config.audio_dropout
    use_reference = keeps_reference(config, generator)

    consistency = torch.zeros((), device=device)
    caches = None
    if use_reference:
        reference_kv = dit.encode_reference(reference, reference_audio)
        reference_frames = dit.token_grid(reference.shape)[0]
        if reference_frames >= 2 and config.static_tokens > 0:
            half_a, half_b = _split_reference_halves(reference_kv, reference_frames, tokens_per_frame, generator)
            caches = dit.layer_caches(reference_kv, static_from=half_a)
            for block, cache, (k_b, v_b) in zip(dit.blocks, caches, half_b):
                static_k_b, static_v_b = block.static_tokens_from_reference(k_b, v_b)
                consistency = consistency + F.mse_loss(cache.static_k.float(), static_k_b.float()) + F.mse_loss(cache.static_v.float(), static_v_b.float())
            consistency = consistency / len(caches)
        else:
            caches = dit.layer_caches(reference_kv)
        caches = _expand_caches(caches, size)

    predicted = dit(noisy, t, audio, caches, context_latents=context, context_mask=mask, audio_keep=audio_keep, output=model_output(config))
    main_loss = flow_loss(config, predicted, target, noise, noisy, t, mouth_cell_weights(model, device, mouth_loss_weight))
    loss = main_loss + config.static_consistency_weight * consistency
    metrics = {"loss": loss.detach(), "flow_loss": main_loss.detach(), "static_consistency": consistency.detach(), "t_mean": t.mean()}
    return loss, metrics
