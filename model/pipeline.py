"""Long-video generation: reference + speech -> frames, for any audio length.

``render`` cuts the output into chunks of ``chunk_frames`` frames. Every chunk after the first
starts with ``overlap_frames`` frames already made by the previous chunk: they enter as known
context (context channels + exact replacement during sampling), so motion continues across the
border instead of restarting. Every chunk attends to the SAME full-reference identity, which is
what keeps identity and colour from drifting over minutes. Exactly one frame per speech-feature
frame comes out.

Dub mode keeps the source video's pixels outside the mouth mask: the visible source is known
context for the model, and after decoding the output is composited so pixels outside the mask
are the source's, byte for byte.

One orchestration for the CLI, the ComfyUI nodes, Train Avatar and the benchmarks:

    prepared = prepare_reference_video(model, media.load_reference_video(path))   # track + crop, once
    identity = extract_reference_identity(model, prepared)                        # Extract Identity
    latents = render(model, identity, features, mode=mode, output="latents",
                     **prepared.render_inputs(mode, identity, len(features)))     # Sparse Reference Sampler
    frames = composite_frames(prepared, decode_frames(model, latents), mode=mode) # Decode Avatar Video

``render_files`` (the CLI) is exactly these steps plus reading the files and muxing the driving
audio into an mp4. ``composite_frames`` is the one place where rendered crops meet the source
(dub: the source outside the mouth mask; full frames: the crop pasted back into the reference's
own framing, looped ping-pong, in both modes).
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserFacingError
from .flow import check_sampler, guided_velocity, sample_flow
from .identity import Identity, extract_identity
from .masks import dub_mask, dub_mask_for_crops, known_cells


logger = logging.getLogger(__name__.rsplit(".", 2)[0])


class _MediaOnFirstUse:
    """``media`` (PyAV, librosa, OpenCV) loads when a function first needs it, not at import:
    training and rendering from arrays run on GPU boxes that have only torch and numpy
    (bench/person.py's run phase, bench/README.md)."""

    def __getattr__(self, name):
        return getattr(importlib.import_module(__name__.rsplit(".", 2)[0] + ".media"), name)


media = _MediaOnFirstUse()

MODES = ("generate", "dub")
DEFAULT_FPS = 25.0
SPEECH_SAMPLE_RATE = 16000


@dataclass
class RenderProgress:
    """Passed to the progress callback after every sampler step."""

    chunk: int  # 0-based
    chunks: int
    step: int  # 1-based, within the chunk
    steps: int
    latents: torch.Tensor  # current latents of the chunk [1, C, T, h, w] (for previews)

    @property
    def fraction(self) -> float:
        return (self.chunk * self.steps + self.step) / (self.chunks * self.steps)


def default_dub_mask(size: int) -> np.ndarray:
    """float32 [size, size] in {0, 1}: the fixed lower-face box of a face crop (media.crop_faces
    framing), what dub mode re-renders where no face mesh is at hand; by default it re-renders the
    person's own lower face (``PreparedReference.dub_mask``, model/masks.py)."""
    return dub_mask(size)


def chunk_plan(total_frames: int, chunk_frames: int, overlap_frames: int) -> list[tuple[int, int, int]]:
    """[(start, end, known)]: chunk i covers frames [start, end); its first `known` frames were
    made by the previous chunk. Every frame is produced exactly once."""
    if chunk_frames < 1:
        raise UserFacingError(f"chunk length must be at least 1 frame; got {chunk_frames}.")
    if not 0 <= overlap_frames < chunk_frames:
        raise UserFacingError(f"overlap ({overlap_frames} frames) must be at least 0 and smaller than the chunk length ({chunk_frames}).")
    plan, made = [], 0
    while made < total_frames:
        known = min(overlap_frames, made)
        start = made - known
        end = min(start + chunk_frames, total_frames)
        plan.append((start, end, known))
        made = end
    return plan


def aligned_reference_blocks(reference_frames: np.ndarray, tokens_per_frame: int, block_size: int, reference_tokens: int) -> torch.Tensor:
    """Dub mode when the source IS the reference: query block q of a chunk must see the reference
    blocks holding the source frames it re-renders. reference_frames [T_chunk] gives the
    reference frame index of each chunk frame. Returns forced block ids [1, 1, nQ, F] (-1 = none)."""
    frames = len(reference_frames)
    query_blocks = -(-frames * tokens_per_frame // block_size)
    reference_blocks = -(-reference_tokens // block_size)
    per_block = []
    for q in range(query_blocks):
        first_token, last_token = q * block_size, min((q + 1) * block_size, frames * tokens_per_frame) - 1
        needed = set()
        for frame in range(first_token // tokens_per_frame, last_token // tokens_per_frame + 1):
            start = int(reference_frames[frame]) * tokens_per_frame
            for block in range(start // block_size, (start + tokens_per_frame - 1) // block_size + 1):
                if block < reference_blocks:
                    needed.add(block)
        per_block.append(sorted(needed))
    width = max(1, max(len(blocks) for blocks in per_block))
    forced = torch.full((1, 1, query_blocks, width), -1, dtype=torch.long)
    for q, blocks in enumerate(per_block):
        forced[0, 0, q, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    return forced


def _ping_pong(frames: np.ndarray, length: int) -> np.ndarray:
    """Loop a source clip forwards and backwards to cover `length` frames without a jump."""
    if len(frames) >= length:
        return frames[:length]
    cycle = np.concatenate([frames, frames[-2:0:-1]]) if len(frames) > 2 else frames
    repeats = -(-length // len(cycle))
    return np.concatenate([cycle] * repeats)[:length]


def ping_pong_order(count: int, length: int) -> np.ndarray:
    """Indices into a source clip of `count` frames that loop it forwards and backwards over `length`."""
    return _ping_pong(np.arange(count), length)


def keep_source_outside_mask(frames: np.ndarray, source: np.ndarray, pixel_mask: np.ndarray) -> np.ndarray:
    """Dub compositing of face crops: ``frames`` inside ``pixel_mask`` (float [S, S], > 0.5 = re-rendered),
    ``source`` (the source crops of the same frames) everywhere else, byte for byte."""
    inside = np.asarray(pixel_mask)[None, :, :, None] > 0.5
    return np.where(inside, frames, source)


def decode_frames(model, latents: torch.Tensor, *, batch_frames: int = 16, on_batch: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Latents [1, C, T, h, w] -> uint8 frames [T, S, S, 3], ``batch_frames`` latent frames at a time
    (on_batch(done, total) after each). The one latent -> pixel conversion (render, the CLI, the decode node)."""
    total = latents.shape[2]
    size = model.config.frame_size
    out = np.empty((total, size, size, 3), np.uint8)
    with torch.no_grad():
        for start in range(0, total, batch_frames):
            chunk = latents[:, :, start:start + batch_frames].to(model.device, model.dtype)
            out[start:start + chunk.shape[2]] = model.decode_latents(chunk)[0].clamp(0, 1).mul(255).round().byte().cpu().numpy()
            if on_batch is not None:
                on_batch(min(start + batch_frames, total), total)
    return out


def speech_features_for(audio_or_features, fps: float, config) -> np.ndarray:
    """Per-frame speech features from features [T, F], a 16 kHz mono waveform, a file path or a
    ComfyUI AUDIO dict."""
    if isinstance(audio_or_features, np.ndarray) and audio_or_features.ndim == 2:
        return audio_or_features.astype(np.float32, copy=False)
    if isinstance(audio_or_features, torch.Tensor) and audio_or_features.dim() == 2:
        return audio_or_features.detach().cpu().float().numpy()
    if isinstance(audio_or_features, np.ndarray) and audio_or_features.ndim == 1:
        wave = audio_or_features.astype(np.float32, copy=False)
    else:
        wave = media.load_audio(audio_or_features, sample_rate=SPEECH_SAMPLE_RATE)
    return media.frame_speech_features(wave, SPEECH_SAMPLE_RATE, fps, feature_id=config.speech_feature_id)


def features_for_model(features: np.ndarray, feature_id: str, wave, fps: float, config) -> np.ndarray:
    """Speech features in the definition the model was trained on.

    Features made in another definition (Encode Speech and Load Reference Video compute log-mel,
    which most models use) are computed again from their audio; without the audio that is not
    possible and the mismatch is refused with what to do.
    """
    if feature_id == config.speech_feature_id:
        return features
    if wave is None:
        raise UserFacingError(
            f"this model expects {config.speech_feature_id} speech features but got {feature_id} ones, and there is no audio "
            "to compute them again from; feed the speech through Encode Speech (or the clip's own audio)")
    # An audio encoder's output the user connected on purpose is being set aside: say so louder
    # than the routine log-mel -> Whisper case.
    say = logger.warning if str(feature_id).startswith("audio_encoder:") else logger.info
    say("speech features are %s, the model expects %s: computing them again from the audio", feature_id, config.speech_feature_id)
    return media.frame_speech_features(wave, SPEECH_SAMPLE_RATE, fps, n_frames=len(features), feature_id=config.speech_feature_id)


UNTRAINED_STAGES = ("init",)
_warned_untrained: set[str] = set()


def warn_if_untrained(model) -> bool:
    """One line (once per model) when a model that was never trained renders: its output is noise
    by construction, and a user should hear that from us, not find it in the video."""
    if getattr(model, "training_stage", None) not in UNTRAINED_STAGES:
        return False
    key = model.fingerprint()
    if key not in _warned_untrained:
        _warned_untrained.add(key)
        logger.warning("this model was never trained (random initial weights): it renders noise. Train it on the person's "
                       "video first (Train Avatar / python -m sparse_avatar.train --config personality).")
    return True


@torch.no_grad()
def render(
    model,
    reference,
    audio_or_features,
    *,
    mode: str = "generate",
    steps: int = 20,
    sampler: str = "euler",
    audio_guidance: float = 1.0,
    reference_guidance: float = 1.0,
    seed: int = 0,
    chunk_frames: int | None = None,
    overlap_frames: int | None = None,
    fps: float | None = None,
    dub_frames: np.ndarray | None = None,
    dub_mask: np.ndarray | None = None,
    dub_reference_frames: np.ndarray | None = None,
    progress: Callable[[RenderProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    output: str = "frames",
):
    """Frames np.uint8 [T, S, S, 3] (S = model frame size), one per speech-feature frame.

    reference: an Identity, or face-crop frames np.uint8 [Tr, S, S, 3] (extracted here, silent).
    audio_or_features: speech features [T, F] at `fps`, or audio (see speech_features_for).
    dub mode: dub_frames np.uint8 [Td, S, S, 3] face crops of the source (looped ping-pong when
    shorter than the audio); dub_mask float [S, S] (1 = re-render; default: the lower face of the
    dub frames, ``model.masks.dub_mask_for_crops``);
    dub_reference_frames [T] (optional): the reference frame each output frame re-renders, when
    the source is the reference itself — those reference blocks are then always attended to.
    progress(RenderProgress) after every step; should_cancel() before every step
    (raises model.flow.SamplingCancelled).
    output="latents" returns the latents instead, float32 [1, C, T, h, w] on the CPU (the ComfyUI
    sampler node hands them to a separate decode node); dub compositing is then the decoder's job.
    """
    if output not in ("frames", "latents"):
        raise UserFacingError(f"output must be 'frames' or 'latents'; got {output!r}.")
    config = model.config
    if mode not in MODES:
        raise UserFacingError(f"unknown mode {mode!r}; choose 'generate' or 'dub'.")
    check_sampler(sampler, steps)
    if model.codec.temporal_factor != 1:
        raise UserFacingError(f"chunked rendering needs a per-frame latent codec; {model.codec.id} compresses time by {model.codec.temporal_factor}.")
    warn_if_untrained(model)
    identity = reference if isinstance(reference, Identity) else extract_identity(model, reference, None, fps=fps)
    if identity.metadata.get("model_fingerprint") not in (None, model.fingerprint()):
        raise UserFacingError("this identity was extracted with a different model; extract it again with the loaded checkpoint.")
    fps = float(fps or identity.fps or DEFAULT_FPS)
    features = speech_features_for(audio_or_features, fps, config)
    total = features.shape[0]
    if total < 1:
        raise UserFacingError("the driving audio is shorter than one video frame; pass at least a fraction of a second of speech.")
    features_tensor = model.features_to_tensor(features, total)
    chunk_frames = int(chunk_frames or config.default_chunk_frames)
    overlap_frames = int(config.default_overlap_frames if overlap_frames is None else overlap_frames)
    plan = chunk_plan(total, chunk_frames, min(overlap_frames, chunk_frames - 1))

    size = config.frame_size
    pixel_mask = None
    source = None
    if mode == "dub":
        if dub_frames is None or len(dub_frames) == 0:
            raise UserFacingError("dub mode needs the source frames to re-render (dub_frames).")
        source = _ping_pong(np.asarray(dub_frames), total)
        pixel_mask = dub_mask_for_crops(dub_frames)[0] if dub_mask is None else np.asarray(dub_mask, np.float32)
        if pixel_mask.shape != (size, size):
            raise UserFacingError(f"the dub mask must be {size}x{size} (the model's frame size); got {pixel_mask.shape}.")
        pixel_mask = (pixel_mask > 0.5).astype(np.float32)

    device, dtype = model.device, model.dtype
    caches = identity.layer_caches(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(int(seed))
    channels, _, rows, cols = model.codec.latent_shape(1, size, size)
    if mode == "dub":
        source_known = known_cells(torch.from_numpy(pixel_mask), model.codec.spatial_factor).to(device, dtype)[None, None, None]  # [1, 1, 1, h, w]
    frames_out = np.empty((total, size, size, 3), np.uint8) if output == "frames" else None
    latents_out = []
    made_latents = None  # latents of all frames made so far, on device (only the tail is reused)
    for chunk_index, (start, end, known) in enumerate(plan):
        length = end - start
        context = torch.zeros(1, channels, length, rows, cols, device=device, dtype=dtype)
        mask = torch.zeros(1, 1, length, rows, cols, device=device, dtype=dtype)
        if mode == "dub":
            source_frames = model.frames_to_tensor(source[start:end])[None]
            context = model.encode_frames(source_frames)
            mask = source_known.expand(1, 1, length, rows, cols).clone()
        if known:
            context[:, :, :known] = made_latents[:, :, -known:]
            mask[:, :, :known] = 1.0
        noise = torch.randn((1, channels, length, rows, cols), generator=generator).to(device, dtype)
        forced = None
        if mode == "dub" and dub_reference_frames is not None:
            forced = aligned_reference_blocks(
                np.asarray(dub_reference_frames)[start:end], rows * cols // (config.patch_size[1] * config.patch_size[2]),
                config.block_size, int(identity.ref_k.shape[3]),
            ).to(device)
        velocity = guided_velocity(
            model, caches, features_tensor[start:end][None], audio_guidance=audio_guidance, reference_guidance=reference_guidance,
            context_latents=context, context_mask=mask, forced_blocks=forced,
        )

        def on_step(step, total_steps, latents, _chunk=chunk_index):
            if progress is not None:
                progress(RenderProgress(_chunk, len(plan), step + 1, total_steps, latents))

        latents = sample_flow(
            velocity, noise, steps=steps, sampler=sampler, shift=model.resolution_shift(rows * cols // (config.patch_size[1] * config.patch_size[2])),
            known=(context, mask), on_step=on_step, should_cancel=should_cancel,
        )
        new_latents = latents[:, :, known:]
        made_latents = new_latents if made_latents is None else torch.cat([made_latents[:, :, -max(overlap_frames, 1):], new_latents], dim=2)
        if frames_out is None:
            latents_out.append(new_latents.float().cpu())
            continue
        frames = decode_frames(model, new_latents, batch_frames=max(1, new_latents.shape[2]))
        if mode == "dub":
            frames = keep_source_outside_mask(frames, source[start + known:end], pixel_mask)
        frames_out[start + known:end] = frames
    return frames_out if frames_out is not None else torch.cat(latents_out, dim=2)


#################################################################################
#                  The prepared reference: tracked and cropped once             #
#################################################################################

@dataclass(eq=False)
class PreparedReference:
    """A reference video made ready for everything downstream, by ``prepare_reference_video`` only.

    Identity extraction, dub (source crops, forced reference blocks), compositing into full frames
    (generate and dub), personality fine-tuning and preference pairs all read this one value, so the
    CLI, the nodes and the benchmarks see the same crops of the same track at the same fps.
    """

    frames: np.ndarray  # uint8 [T, H, W, 3]: the full source frames, at the reference's own resolution
    crops: np.ndarray  # uint8 [T, S, S, 3]: face crops (S = the model's frame size)
    transforms: list[media.CropTransform]  # one per frame: source pixels <-> crop pixels
    track: media.FaceTrack  # the face track the crops follow
    fps: float
    speech: np.ndarray | None  # float32 [T, F]: the reference's own speech features; None when silent
    audio: np.ndarray | None  # float32 mono 16 kHz, exactly T / fps seconds; None when silent
    source_hash: str
    start_s: float = 0.0
    face: str = "largest"  # which face the track follows (media.FACE_CHOICES)
    _speech_by_definition: dict = field(default_factory=dict, init=False, repr=False)  # speech_for's, by feature id
    _dub_mask: tuple | None = field(default=None, init=False, repr=False)  # dub_mask()'s, computed once

    @property
    def n_frames(self) -> int:
        return int(self.crops.shape[0])

    @property
    def frame_size(self) -> int:
        return int(self.crops.shape[1])

    @property
    def key(self) -> str:
        """Names the clip (file, start, fps, resolution), not how many of its frames were used:
        an identity extracted from the first N frames still matches the whole clip."""
        text = f"{self.source_hash}|{float(self.start_s)!r}|{float(self.fps)!r}|{self.frames.shape[1]}x{self.frames.shape[2]}"
        if self.face != "largest":  # another person in the same clip (keys of the default stay as they were)
            text += f"|{self.face}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def speech_for(self, model) -> np.ndarray | None:
        """The reference's own speech features in ``model``'s definition (``speech`` is log-mel;
        a model trained on another definition gets them computed again from ``audio``, once)."""
        if self.speech is None:
            return None
        feature_id = model.config.speech_feature_id
        if feature_id not in self._speech_by_definition:
            self._speech_by_definition[feature_id] = features_for_model(self.speech, media.SPEECH_FEATURE_ID, self.audio, self.fps, model.config)
        return self._speech_by_definition[feature_id]

    def dub_mask(self) -> np.ndarray:
        """float32 [S, S], 1 = re-rendered in dub mode: the person's lower face from the crops' face
        mesh, or the box without one (``model.masks.dub_mask_for_crops``; ``dub_mask_source`` says
        which). Render, compositing and personal training of this clip all use this one mask."""
        if self._dub_mask is None:
            self._dub_mask = dub_mask_for_crops(self.crops)
        return self._dub_mask[0]

    @property
    def dub_mask_source(self) -> str:
        self.dub_mask()
        return self._dub_mask[1]

    def personal_dub_region(self) -> np.ndarray | None:
        """What personal training of this clip hides in dub samples (``finetune_personality``'s
        dub_region): ``dub_mask()`` when it is the person's own, None for the box."""
        return self.dub_mask() if self.dub_mask_source == "landmarks" else None

    def frame_order(self, length: int) -> np.ndarray:
        """The reference frame behind each of ``length`` output frames: the clip looped ping-pong
        (dub re-renders these frames; full-frame output takes its background from them)."""
        return ping_pong_order(self.n_frames, int(length))

    def identity_metadata(self) -> dict:
        boxes = getattr(self.track, "boxes", None)
        return {
            "source_hash": str(self.source_hash or ""),
            "reference_key": self.key,
            "crop_track": json.dumps(np.asarray(boxes).round(2).tolist()) if boxes is not None else "",
        }

    def is_reference_of(self, identity: Identity) -> bool:
        """True when ``identity`` was extracted from this clip (its reference frame i is frame i here)."""
        return identity.metadata.get("reference_key") == self.key

    def render_inputs(self, mode: str, identity: Identity, length: int) -> dict:
        """The keyword arguments of ``render`` this reference supplies: in dub mode the source crops
        and, when the identity is this clip's own, the reference frame each output frame re-renders
        (so those reference blocks are always attended to), and the clip's dub mask."""
        if mode != "dub":
            return {}
        aligned = self.is_reference_of(identity)
        return {"dub_frames": self.crops, "dub_mask": self.dub_mask(), "dub_reference_frames": self.frame_order(length) if aligned else None}


def reference_speech_features(reference_video, n_frames: int) -> np.ndarray | None:
    """Speech features of the reference's own audio, one per frame (first ``n_frames``); None without audio."""
    if not reference_video.has_audio or reference_video.audio is None:
        return None
    return media.speech_features(reference_video.audio, SPEECH_SAMPLE_RATE, reference_video.fps, n_frames=n_frames)


def prepare_reference_video(model_or_frame_size, reference_video, *, max_frames: int | None = None,
                            face: str | None = None) -> PreparedReference:
    """ReferenceVideo (``media.load_reference_video``) -> PreparedReference: face track (at the
    clip's fps), crops at the model's frame size (or at ``model_or_frame_size`` pixels), transforms
    and the clip's own speech features. ``max_frames``: only the first frames. ``face``: which face
    to follow (media.FACE_CHOICES); default the one chosen with the clip (Load Reference Video)."""
    face = media.check_face_choice(face or getattr(reference_video, "face", "largest"))
    size = model_or_frame_size if isinstance(model_or_frame_size, (int, np.integer)) else model_or_frame_size.config.frame_size
    frames = reference_video.frames if not max_frames else reference_video.frames[:max_frames]
    fps = float(reference_video.fps)
    track = media.track_face(frames, fps=fps, face=face)
    for warning in track.warnings:  # two faces, a sideways clip, gaps: the CLI and ComfyUI's log show them
        logger.warning(warning)
    crops, transforms = media.crop_faces(frames, track, size=int(size))
    audio = None
    if reference_video.has_audio and reference_video.audio is not None:
        audio = np.asarray(reference_video.audio, np.float32)[: int(round(len(crops) / fps * SPEECH_SAMPLE_RATE))]
    return PreparedReference(
        frames=frames, crops=crops, transforms=list(transforms), track=track, fps=fps,
        speech=reference_speech_features(reference_video, len(crops)), audio=audio,
        source_hash=str(reference_video.source_hash or ""), start_s=float(getattr(reference_video, "start_s", 0.0) or 0.0),
        face=face,
    )


def extract_reference_identity(model, prepared: PreparedReference) -> Identity:
    """The identity of a prepared reference: its crops with its own speech, at its fps, tagged with
    the clip it came from (so dub mode on the same clip can align reference blocks)."""
    return extract_identity(model, prepared.crops, prepared.speech_for(model), fps=prepared.fps, metadata=prepared.identity_metadata())


def reference_face_crops(reference_video, size: int, *, max_frames: int | None = None):
    """(crops, crop transforms, track) of ``prepare_reference_video(size, reference_video)``."""
    prepared = prepare_reference_video(int(size), reference_video, max_frames=max_frames)
    return prepared.crops, prepared.transforms, prepared.track


def prepare_reference(model, reference_video, *, max_frames: int | None = None):
    """ReferenceVideo (media.load_reference_video) -> (Identity, face crops, crop transforms)."""
    prepared = prepare_reference_video(model, reference_video, max_frames=max_frames)
    return extract_reference_identity(model, prepared), prepared.crops, prepared.transforms


def composite_frames(prepared: PreparedReference, frames: np.ndarray, *, mode: str, full_frame: bool = True,
                     color_match: bool = True, dub_mask: np.ndarray | None = None) -> np.ndarray:
    """Rendered face crops uint8 [T, S, S, 3] -> what is shown, for the CLI and the decode node alike.

    Output frame i stands on reference frame ``prepared.frame_order(T)[i]``. dub: outside the dub
    mask (default ``prepared.dub_mask()``, the one render used) the pixels are the source crop's.
    full_frame: the crop is pasted back (feathered, colour matched) into that reference frame at the
    reference's resolution, in generate mode too (the background then loops the reference
    ping-pong); in dub mode only the mask's part of it (``media.soft_region``). Otherwise crops.
    """
    if mode not in MODES:
        raise UserFacingError(f"unknown mode {mode!r}; choose 'generate' or 'dub'.")
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[1:] != (prepared.frame_size, prepared.frame_size, 3):
        raise UserFacingError(f"rendered frames are {frames.shape[1:3]} but the reference was cropped to {prepared.frame_size}²; "
                              "prepare the reference at the model's frame size.")
    order = prepared.frame_order(len(frames))
    region = None
    if mode == "dub":
        mask = prepared.dub_mask() if dub_mask is None else dub_mask
        frames = keep_source_outside_mask(frames, prepared.crops[order], mask)
        # Only the re-rendered part goes back into the full frame: the rest of the face stays the
        # source's own pixels at its own resolution, not their round trip through the model's crop.
        region = media.soft_region(mask)
    if full_frame:
        frames = media.paste_back(prepared.frames[order], frames, [prepared.transforms[i] for i in order], color_match=color_match,
                                  region=region)
        if getattr(prepared.track, "rotation", 0):  # a sideways clip comes out upright, as its crops are
            frames = prepared.track.upright(frames)
    return frames


#################################################################################
#                           End to end: files in, mp4 out                       #
#################################################################################

def render_files(model, reference_path, audio_path, out_path, *, mode: str = "generate", steps: int = 20, sampler: str = "euler",
                 seed: int = 0, audio_guidance: float = 1.0, reference_guidance: float = 1.0, chunk_frames=None, overlap_frames=None,
                 full_frame: bool = True, progress=None, should_cancel=None, identity: Identity | None = None,
                 face: str = "largest", log: Callable[[str], None] | None = None) -> Path:
    """Reference video + driving audio files -> mp4 exactly as long as the audio, audio muxed.

    The nodes' path step for step (prepare, extract, sample latents, decode, composite).
    full_frame (default): the face placed back into the reference's framing at its resolution,
    the background looped ping-pong (dub: only the lower face re-rendered); False: the face crops.
    identity: one extracted before (an avatar folder's), instead of a reference pass over the video.
    face: which face to follow when several are in view (media.FACE_CHOICES). log(line): a line
    per phase before sampling (decoding, tracking, the reference pass), which can take minutes on a CPU."""
    say = log or (lambda line: None)
    if mode not in MODES:
        raise UserFacingError(f"unknown mode {mode!r}; choose 'generate' or 'dub'.")
    say(f"decoding {Path(str(reference_path)).name} ...")
    reference_video = media.load_reference_video(str(reference_path))
    say(f"tracking the face in {reference_video.n_frames} frames ...")
    prepared = prepare_reference_video(model, reference_video, face=face)
    if identity is None:
        say(f"reference pass over {prepared.n_frames} face crops (the identity) ...")
        identity = extract_reference_identity(model, prepared)
    if mode == "dub":
        say(f"dub mask: {prepared.dub_mask_source} ...")
    say("rendering ...")
    wave = media.load_audio(str(audio_path), sample_rate=SPEECH_SAMPLE_RATE)
    features = media.frame_speech_features(wave, SPEECH_SAMPLE_RATE, prepared.fps, feature_id=model.config.speech_feature_id)
    latents = render(
        model, identity, features, mode=mode, steps=steps, sampler=sampler, seed=seed, audio_guidance=audio_guidance,
        reference_guidance=reference_guidance, chunk_frames=chunk_frames, overlap_frames=overlap_frames, fps=prepared.fps,
        progress=progress, should_cancel=should_cancel, output="latents", **prepared.render_inputs(mode, identity, len(features)),
    )
    frames = composite_frames(prepared, decode_frames(model, latents), mode=mode, full_frame=full_frame)
    return Path(media.write_video(out_path, frames, prepared.fps, audio=wave, sample_rate=SPEECH_SAMPLE_RATE))
