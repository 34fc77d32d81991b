"""Training nodes: Train Avatar (stage 3: the person), Load Avatar LoRA, Preference Pair (stage 5 data).

Train Avatar runs ``training.personality.finetune_personality`` on a copy of the loaded model
(ComfyUI caches the loaded model; it is never changed) for a time budget, writes the result (a
full model to models/avatar with lora_rank 0, the default while no trained base ships, else a
LoRA to models/avatar_loras) and returns the trained model, so a graph renders with it right away. Load Avatar LoRA
applies a saved one. A killed or cancelled Train Avatar run continues when the same inputs are queued
again (``finetune_personality``'s resume_root, under ComfyUI's output folder). Preference Pair records a human A/B choice between two renderings in the
JSONL format of ``training/preferences.py`` for the Diffusion-DPO stage.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import UserFacingError
from ..files import write_text
from ..media import write_video
from ..media.audio import SPEECH_SAMPLE_RATE, resample_audio, write_wav
from .comfy_types import comfy_audio_to_wave, comfy_image_to_frames
from ..media.video_io import ReferenceVideo
from ..model.personal import check_own_audio, check_preference_pair, personality_data, reference_crops_video
from ..training.lora import load_lora
from ..training.personality import finetune_personality, minutes_budget, refuse_cpu_training
from ..training.preferences import append_pair
from . import _comfy, _models
from .reference_video import prepared_reference

CATEGORY = "sparse-avatar/training"
MODEL_CATEGORY = "sparse-avatar"
PREFERENCES_FOLDER = os.path.join("sparse-avatar", "preferences")
# Under ComfyUI's output folder: Train Avatar's resumable training state, one folder per job,
# removed when the job finishes (not under models/: ComfyUI would list its .safetensors as models).
TRAINING_STATE_FOLDER = "sparse_avatar_training"
TRAIN_EVENT = "sparse_avatar.train"  # websocket event: Train Avatar's progress and loss, for the web extension
PAIR_ROUTE = "/sparse_avatar/preference_pair"  # POST {pairs_name, pair, winner}: the A/B widget's click
CHOOSE = "choose"
WINNERS = (CHOOSE, "A", "B")
PENDING_SUFFIX = ".pending.json"
_PAIR = re.compile(r"^pair_\d{5,}$")

logger = logging.getLogger(__name__)


def _check_model(model) -> None:
    if not isinstance(model, _models.AvatarModelHandle):
        raise UserFacingError("'model' must come from Load Avatar Model (or Train Avatar / Load Avatar LoRA).")


def model_with_lora(handle: _models.AvatarModelHandle, lora_path) -> _models.AvatarModelHandle:
    """A new AVATAR_MODEL: a copy of ``handle``'s model with the LoRA at ``lora_path`` merged in.

    The input handle and its model stay untouched (ComfyUI may reuse them from its cache). The
    copy starts on the CPU; ComfyUI's memory manager moves it when a node needs it."""
    base = handle.model
    tuned = copy.deepcopy(base).to("cpu")
    load_lora(tuned.dit, lora_path, base_fingerprint=base.fingerprint(), merge=True)
    tuned.forget_fingerprint()
    tuned.eval()
    return _models.AvatarModelHandle(tuned, f"{handle.name} + {Path(lora_path).name}")


class TrainAvatar:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("AVATAR_MODEL", "STRING")
    RETURN_NAMES = ("model", "lora_path")
    OUTPUT_TOOLTIPS = ("The model with the new LoRA merged in, ready for Extract Identity and the sampler.",
                       "Full path of the LoRA file written to models/avatar_loras.")
    OUTPUT_NODE = True
    FUNCTION = "train"
    DESCRIPTION = ("Personality fine-tuning: learns a small LoRA of how this person looks, moves and talks from the "
                   "reference video and its own audio, saves it in models/avatar_loras and returns the model with "
                   "it applied. Cancel stops after the current step and still saves the LoRA trained so far. The "
                   "training state is kept in output/sparse_avatar_training while it runs (a checkpoint a minute), so "
                   "after a crash, a restart or a Cancel the same inputs queued again continue where it stopped.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("AVATAR_MODEL", {"tooltip": "From Load Avatar Model: the base the LoRA is trained on (not changed)."}),
            "reference": ("REFERENCE_VIDEO", {"tooltip": "From Load Reference Video: the person talking, with the "
                                              "clip's own audio (at least about a second; minutes are better)."}),
            "steps": ("INT", {"default": 100_000, "min": 1, "max": 1_000_000,
                              "tooltip": "The most training steps (batches of 8 windows of 16 frames); 'minutes' usually ends "
                                         "training first."}),
            "lora_rank": ("INT", {"default": 0, "min": 0, "max": 256,
                                  "tooltip": "0: train every weight and save a full model in models/avatar (needed while the base "
                                             "is untrained: a low-rank change of random weights cannot learn a face). Above 0: a "
                                             "LoRA of that rank on a trained base, saved in models/avatar_loras."}),
            "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-6, "max": 1e-1, "step": 1e-5, "round": False,
                                        "tooltip": "AdamW learning rate (1e-3 for full training from an untrained base, what the "
                                                   "person benchmark measured best; LoRAs on a trained base take about 5e-4)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Same seed and inputs = the same LoRA (on the same device)."}),
            "filename_prefix": ("STRING", {"default": "avatar_lora", "tooltip": "File name start in "
                                "models/avatar (full) or models/avatar_loras (LoRA); a counter is appended. Letters, digits, '-', "
                                "'_', '.' and spaces only."}),
        }, "optional": {
            "minutes": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 24 * 60.0, "step": 0.5,
                                  "tooltip": "Training time; the learning-rate schedule is fitted to it. 0 = no limit (only "
                                             "'steps'). About 10 minutes on one H200-class GPU learn a person from 15-20 s of video."}),
            "allow_cpu": ("BOOLEAN", {"default": False,
                                      "tooltip": "Train even when ComfyUI runs on a CPU (refused otherwise: learning a person is "
                                                 "minutes on a GPU and orders of magnitude slower on a CPU). For a smoke test with "
                                                 "a few 'steps'."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    # Names only filename_prefix: every other input keeps ComfyUI's own min/max checks.
    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix="avatar_lora"):
        return _comfy.file_name_problem(filename_prefix) or True

    def train(self, model, reference, steps=100_000, lora_rank=0, learning_rate=1e-3, seed=0, filename_prefix="avatar_lora", minutes=10.0,
              allow_cpu=False, unique_id=None):
        _check_model(model)
        if not isinstance(reference, ReferenceVideo):
            raise UserFacingError("'reference' must come from Load Reference Video.")
        _comfy.check_file_name(filename_prefix)
        # The commands' refusal, before any work (face tracking, the model on the device): at
        # run time, not in VALIDATE_INPUTS, which does not see allow_cpu when it is linked.
        refuse_cpu_training(_models.compute_device(), bool(allow_cpu), allow="set Train Avatar's allow_cpu to true",
                            steps="a few 'steps' and minutes 0")
        check_own_audio(reference, advice="Load a video file with its sound in Load Reference Video (not an IMAGE "
                                          "batch), or a VIDEO input that carries audio.")
        _comfy.check_interrupted()
        avatar = model.ready()
        prepared = prepared_reference(avatar, reference)
        crops, speech = personality_data(prepared, avatar)
        full = int(lora_rank) == 0
        out_path = _comfy.numbered_path(_models.folder(_models.AVATAR_FOLDER if full else _models.LORA_FOLDER), filename_prefix, ".safetensors")
        steps = int(steps)
        budget = minutes_budget(minutes)

        progress = _comfy.progress_bar(steps)
        done = 0
        planned = steps  # a time-budgeted run learns its step count after its first steps
        interrupt = None  # ComfyUI's interrupt, when its progress hook raised it
        last_loss = None
        started = time.monotonic()
        # Where this run's reports started (time, fraction) and the fractions last shown and logged:
        # step / total is the job's progress (the library's planned steps), and a resumed job
        # starts part-way, so the time left is estimated from this run's own pace.
        first: tuple[float, float] | None = None
        shown = logged = -1.0

        def remaining_s(fraction: float) -> float | None:
            if first is None or fraction <= first[1]:
                return None
            return round((time.monotonic() - first[0]) / (fraction - first[1]) * (1.0 - fraction), 1)

        def report(state: str, **extra) -> None:
            # The web extension draws these on the node (progress, loss curve, what was saved).
            fraction = min(1.0, done / max(1, planned))
            _comfy.send_event(TRAIN_EVENT, {"node": None if unique_id is None else str(unique_id), "state": state,
                                            "step": done, "total": planned, "loss": last_loss,
                                            "elapsed_s": round(time.monotonic() - started, 2),
                                            "remaining_s": remaining_s(fraction) if state == "running" else None, **extra})

        def on_step(step: int, total: int, loss: float | None) -> None:
            nonlocal done, interrupt, planned, last_loss, first, shown, logged
            done, planned = step, total
            fraction = min(1.0, step / max(1, total))
            if first is None:
                first = (time.monotonic(), fraction)
            if loss is not None:
                last_loss = float(loss)
            if loss is not None and (step >= total or fraction - logged >= 0.1):
                logged = fraction
                logger.info("Train Avatar: step %d/%d, loss %.4f", step, total, loss)
            # About 100 updates per run (each one is a websocket message to the browser), the first
            # at once: by the fraction done (either way), since a time-budgeted run's total moves as it learns its pace.
            if interrupt is None and (step >= total or abs(fraction - shown) >= 0.01):
                shown = fraction
                report("running")
                try:
                    progress.update_absolute(step, total)
                except Exception as error:
                    # ComfyUI's progress hook raises the interrupt (and clears the flag): keep it for
                    # after the LoRA is saved, and let the trainer stop between steps.
                    if not _comfy.is_interrupt(error):
                        raise
                    interrupt = error

        def should_cancel() -> bool:
            return interrupt is not None or _comfy.interrupt_requested()

        base_fingerprint = avatar.fingerprint()
        # ComfyUI runs nodes under torch.inference_mode(): training needs autograd, and tensors
        # made in inference mode cannot be saved for backward, so the copy is made outside it.
        # The copy trains in fp32 (the trainer keeps fp32 master weights, bf16 autocast on CUDA).
        with torch.inference_mode(False), torch.enable_grad():
            trainee = copy.deepcopy(avatar).float()
            try:
                path = finetune_personality(
                    trainee, crops, speech, out_path, steps=steps, time_budget_s=budget, lora_rank=int(lora_rank), lr=float(learning_rate),
                    fps=float(reference.fps), seed=int(seed), progress=on_step, should_cancel=should_cancel,
                    resume_root=Path(_comfy.output_directory()) / TRAINING_STATE_FOLDER, dub_region=prepared.personal_dub_region())
                if full:
                    trained = trainee.to(avatar.dtype).eval().requires_grad_(False)
                    trained.training_stage = "personality"
                    trained.forget_fingerprint()
            except UserFacingError:
                _comfy.check_interrupted()  # cancelled before the first step: ComfyUI's interrupt, not an error
                raise
            finally:
                if not full:
                    del trainee
        if done < planned and (interrupt is not None or _comfy.interrupt_requested()):
            report("cancelled", file=Path(path).name)
            logger.warning("Train Avatar cancelled after %d of %d steps; what was trained so far is saved as %s "
                           "(%s).", done, planned, path, "load it with Load Avatar Model" if full else "apply it with Load Avatar LoRA")
            # Re-raise ComfyUI's interrupt, as the sampler does on Cancel: the prompt ends as interrupted and
            # ComfyUI does not cache this partial result as the finished training of these inputs.
            if interrupt is not None:
                raise interrupt
            _comfy.check_interrupted()
        planned = done  # finished (the steps or the time): what was done is the whole run
        report("saved", file=Path(path).name)
        logger.info("Train Avatar: %s for base %s written to %s", "model" if full else "LoRA", base_fingerprint, path)
        tuned = _models.AvatarModelHandle(trained.to("cpu"), Path(path).name) if full else model_with_lora(model, path)
        return {"ui": {"text": [f"{Path(path).name} ({done} steps)"]}, "result": (tuned, str(path))}


class LoadAvatarLoRA:
    CATEGORY = MODEL_CATEGORY
    RETURN_TYPES = ("AVATAR_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model with the LoRA merged in (the input model is unchanged).",)
    FUNCTION = "load"
    DESCRIPTION = ("Applies a personality LoRA from models/avatar_loras (made by Train Avatar) to the base model it "
                   "was trained on; a LoRA of another base model is refused.")

    @classmethod
    def INPUT_TYPES(cls):
        _models.register_folders()
        return {"required": {
            "model": ("AVATAR_MODEL", {"tooltip": "From Load Avatar Model: the base checkpoint the LoRA was trained on."}),
            "lora": (_models.list_files(_models.LORA_FOLDER) or ["(train one with Train Avatar first)"], {
                "tooltip": "A LoRA in ComfyUI/models/avatar_loras."}),
        }}

    def load(self, model, lora):
        _check_model(model)
        _comfy.check_interrupted()
        path = _models.full_path(_models.LORA_FOLDER, lora)
        if path is None:
            raise UserFacingError(f"LoRA {lora!r} not found in models/avatar_loras; train one with Train Avatar "
                                  "or copy a sparse-avatar LoRA .safetensors there.")
        return (model_with_lora(model, path),)


def _video_frames_and_audio(video, which: str):
    """uint8 frames, fps and the 16 kHz mono audio (or None) of a VIDEO input."""
    images, fps, audio = _comfy.video_parts(video)
    frames = comfy_image_to_frames(images)
    wave = None
    if audio is not None:
        samples, rate = comfy_audio_to_wave(audio)
        wave = resample_audio(samples, rate, SPEECH_SAMPLE_RATE)
    if not np.isfinite(fps) or fps <= 0:
        raise UserFacingError(f"video {which} has no usable frame rate ({fps}).")
    return frames, fps, wave


class RecordPreferencePair:
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("pairs_file",)
    OUTPUT_TOOLTIPS = ("Full path of the preference JSONL (the --pairs file of the dpo training stage).",)
    OUTPUT_NODE = True
    FUNCTION = "record"
    DESCRIPTION = ("Records which of two renderings of the same reference and speech is better, for preference "
                   "training (Diffusion-DPO). Saves both clips, the driving audio and the reference's face crops under "
                   "output/sparse-avatar/preferences/<pairs name>/ and appends one line to <pairs name>.jsonl.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "video_a": ("VIDEO", {"tooltip": "Rendering A: Decode Avatar Video's 'video' output (face crops: turn "
                                  "paste_back off when the sampler has a source). Its audio is the driving speech."}),
            "video_b": ("VIDEO", {"tooltip": "Rendering B of the same reference and speech (e.g. another seed or "
                                  "step count): same length and size as A."}),
            "reference": ("REFERENCE_VIDEO", {"tooltip": "From Load Reference Video: the reference both were rendered from."}),
            "winner": (WINNERS, {"default": CHOOSE, "tooltip": "The better rendering; 'choose' plays both side by "
                                 "side on the node and records the pair when you click the better one."}),
            "pairs_name": ("STRING", {"default": "pairs", "tooltip": "Name of the pairs file in "
                                      "output/sparse-avatar/preferences (.jsonl is added). Letters, digits, '-', '_', "
                                      "'.' and spaces only."}),
        }}

    def record(self, video_a, video_b, reference, winner=CHOOSE, pairs_name="pairs"):
        name = _pairs_name(pairs_name)
        if winner not in WINNERS:
            raise UserFacingError(f"winner must be A, B or {CHOOSE!r}, got {winner!r}.")
        if not isinstance(reference, ReferenceVideo):
            raise UserFacingError("'reference' must come from Load Reference Video.")
        frames_a, fps_a, audio_a = _video_frames_and_audio(video_a, "A")
        frames_b, fps_b, audio_b = _video_frames_and_audio(video_b, "B")
        check_preference_pair(frames_a, fps_a, audio_a, frames_b, fps_b, audio_b)
        _comfy.check_interrupted()
        root = os.path.join(_comfy.output_directory(), PREFERENCES_FOLDER)
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        reference_path = reference_crops_video(prepared_reference(frames_a.shape[1], reference), folder)
        stem = _comfy.numbered_path(folder, "pair", "_a.mp4")[: -len("_a.mp4")]
        path_a = write_video(f"{stem}_a.mp4", frames_a, fps_a, audio=audio_a)
        path_b = write_video(f"{stem}_b.mp4", frames_b, fps_a, audio=audio_a)
        audio_path = write_wav(f"{stem}_audio.wav", audio_a)
        pairs_path = Path(root) / f"{name}.jsonl"
        files = {"reference": reference_path, "audio": audio_path, "video_a": path_a, "video_b": path_b}
        pair = Path(stem).name
        if winner == CHOOSE:
            # Nothing is appended yet: the web extension plays both clips and posts the click to
            # PAIR_ROUTE, which appends the pair from this note (record_pending_choice).
            write_text(os.path.join(folder, f"{pair}{PENDING_SUFFIX}"),
                       json.dumps({key: Path(file).name for key, file in files.items()} | {"fps": fps_a}))
            clips = {side: _comfy.view_entry(str(path)) for side, path in (("a", path_a), ("b", path_b))}
            return {"ui": {"text": [f"{pair}: play both and click the better one"],
                           "sparse_avatar_pair": [{"pairs_name": name, "pair": pair, **clips}]},
                    "result": (str(pairs_path),)}
        append_pair(pairs_path, **files, winner=winner.lower(), fps=fps_a)
        return {"ui": {"text": [f"{pair}: {winner} preferred; {_count_pairs(pairs_path)} pairs in {pairs_path.name}"]},
                "result": (str(pairs_path),)}


def _pairs_name(pairs_name) -> str:
    name = pairs_name[: -len(".jsonl")] if isinstance(pairs_name, str) and pairs_name.endswith(".jsonl") else pairs_name
    return _comfy.check_file_name(name, "pairs name")


def _count_pairs(pairs_path) -> int:
    with open(pairs_path, "rb") as stream:
        return sum(1 for line in stream if line.strip())


def record_pending_choice(pairs_name, pair, winner) -> dict:
    """Append the pair a Preference Pair node left for a click (winner 'choose') with ``winner``.

    Everything comes from the browser, so everything is checked: plain names only, the pair's note
    and its files inside output/sparse-avatar/preferences/<pairs name>/. A pair is appended once:
    the note is taken by an atomic rename, so a second click gets a clear error instead of a second line."""
    name = _pairs_name(pairs_name)
    if not isinstance(pair, str) or not _PAIR.match(pair):
        raise UserFacingError(f"unknown pair {pair!r}; run the Preference Pair node again.")
    if not isinstance(winner, str) or winner.upper() not in ("A", "B"):
        raise UserFacingError(f"winner must be A or B, got {winner!r}.")
    root = os.path.join(_comfy.output_directory(), PREFERENCES_FOLDER)
    folder = os.path.join(root, name)
    note = os.path.join(folder, f"{pair}{PENDING_SUFFIX}")
    taken = f"{note}.taken"
    try:
        os.rename(note, taken)
    except FileNotFoundError:
        raise UserFacingError(f"{pair} of '{name}' was already recorded (or never made); run the Preference Pair "
                              "node again for a new pair.") from None
    try:
        with open(taken, encoding="utf-8") as stream:
            row = json.load(stream)
        files = {}
        for key in ("reference", "audio", "video_a", "video_b"):
            file = row.get(key)
            if not isinstance(file, str) or os.path.basename(file) != file or file.startswith("."):
                raise UserFacingError(f"the note of {pair} is damaged ({key}); run the Preference Pair node again.")
            files[key] = os.path.join(folder, file)
        pairs_path = append_pair(os.path.join(root, f"{name}.jsonl"), **files, winner=winner.lower(), fps=row.get("fps"))
    except BaseException:
        os.replace(taken, note)  # not recorded: the pair can still be chosen
        raise
    os.remove(taken)
    return {"pairs_file": pairs_path.name, "pair": pair, "winner": winner.upper(), "count": _count_pairs(pairs_path)}


def _register_routes(routes) -> None:
    from aiohttp import web

    @routes.post(PAIR_ROUTE)
    async def choose_pair(request):
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "send a JSON object with pairs_name, pair and winner"}, status=400)
        try:
            return web.json_response(record_pending_choice(body.get("pairs_name"), body.get("pair"), body.get("winner")))
        except UserFacingError as error:
            return web.json_response({"error": str(error)}, status=400)


_comfy.add_routes(_register_routes)


NODE_CLASS_MAPPINGS = {
    "SparseAvatarTrain": TrainAvatar,
    "SparseAvatarLoadLoRA": LoadAvatarLoRA,
    "SparseAvatarPreferencePair": RecordPreferencePair,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SparseAvatarTrain": "Train Avatar",
    "SparseAvatarLoadLoRA": "Load Avatar LoRA",
    "SparseAvatarPreferencePair": "Preference Pair",
}
