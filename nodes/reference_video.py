"""Load Reference Video: a file from ComfyUI's input folder, or a VIDEO / IMAGE input, decoded by
``media.load_reference_video`` into a REFERENCE_VIDEO (frames + fps + the clip's own audio).

``prepared_reference`` is how every node downstream (Extract Identity, the sampler's source,
Train Avatar, Preference Pair) gets the face track and crops of a REFERENCE_VIDEO: made by the
library's ``prepare_reference_video``, once per reference and crop size while the graph holds it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import threading
import weakref

import numpy as np

from ..errors import UserFacingError
from ..media import FACE_CHOICES, check_face_choice, load_reference_video, reference_from_frames
from ..media.video_io import VIDEO_EXTENSIONS, ReferenceVideo
from ..model.pipeline import PreparedReference, prepare_reference_video
from . import _comfy
from .comfy_types import audio_to_comfy, comfy_audio_to_wave, comfy_image_to_frames, frames_to_comfy_image, is_comfy_video

# id(reference) -> (weak reference to it, {(crop size, max_frames): PreparedReference}). An entry
# goes when ComfyUI drops the REFERENCE_VIDEO (a new clip loaded), so nothing outlives its video.
_PREPARED: dict[int, tuple[weakref.ref, dict]] = {}
_PREPARED_LOCK = threading.Lock()


def prepared_reference(model_or_frame_size, reference, *, max_frames: int | None = None) -> PreparedReference:
    """The PreparedReference of a REFERENCE_VIDEO (``model.pipeline.prepare_reference_video``),
    tracked and cropped once: Extract Identity, the sampler and Train Avatar share it."""
    if not isinstance(reference, ReferenceVideo):
        raise UserFacingError("'reference' / 'source' must come from Load Reference Video.")
    size = model_or_frame_size if isinstance(model_or_frame_size, (int, np.integer)) else model_or_frame_size.config.frame_size
    key = (int(size), int(max_frames) if max_frames and max_frames < reference.n_frames else None)
    with _PREPARED_LOCK:
        entry = _PREPARED.get(id(reference))
        if entry is not None and entry[0]() is reference and key in entry[1]:
            return entry[1][key]
    prepared = prepare_reference_video(int(size), reference, max_frames=key[1])
    with _PREPARED_LOCK:
        entry = _PREPARED.get(id(reference))
        if entry is None or entry[0]() is not reference:
            ident = id(reference)
            entry = (weakref.ref(reference, lambda _, ident=ident: _PREPARED.pop(ident, None)), {})
            _PREPARED[ident] = entry
        entry[1][key] = prepared
    return prepared

CATEGORY = "sparse-avatar"
_MAX_SECONDS = 36000.0


class LoadReferenceVideo:
    """Decode the reference clip of the person; everything downstream reads it once from here."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("REFERENCE_VIDEO", "IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("reference", "frames", "audio", "fps")
    OUTPUT_TOOLTIPS = (
        "The decoded reference (frames, fps, own audio aligned to frame 0) for Extract Identity.",
        "The same frames as an IMAGE batch, for preview or other nodes.",
        "The clip's own audio (16 kHz mono, exactly as long as the frames; silence when it has none).",
        "Frame rate of the decoded frames.",
    )
    FUNCTION = "load"
    DESCRIPTION = ("Loads the reference video of the person: constant frame rate, rotation applied, optional time "
                   "range and downscale. The whole clip becomes the identity reference.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": (_comfy.input_files(VIDEO_EXTENSIONS), {
                    "video_upload": True,
                    "tooltip": "Video file in ComfyUI's input folder (mp4/mov/mkv/webm). Ignored when a VIDEO or "
                               "IMAGE input is connected.",
                }),
                "fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 120.0, "step": 0.01,
                                  "tooltip": "Frame rate to decode at; 0 keeps the source's rate. Variable-rate "
                                             "clips are resampled to a constant rate."}),
                "start_seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": _MAX_SECONDS, "step": 0.1,
                                            "tooltip": "Where the reference starts, in seconds from the first frame."}),
                "end_seconds": ("FLOAT", {"default": 0.0, "min": 0.0, "max": _MAX_SECONDS, "step": 0.1,
                                          "tooltip": "Where it ends; 0 = the end of the clip."}),
                "max_side": ("INT", {"default": 1024, "min": 0, "max": 8192, "step": 8,
                                     "tooltip": "Downscale so the longer side is at most this many pixels (saves "
                                                "memory on 4K clips); 0 = full size."}),
            },
            "optional": {
                "video_input": ("VIDEO", {"tooltip": "A VIDEO from another node (e.g. core Load Video); used "
                                                     "instead of the file."}),
                "images": ("IMAGE", {"tooltip": "An IMAGE batch used as the reference instead of the file; its "
                                                "frame rate is 'fps' (25 when fps is 0)."}),
                "face": (list(FACE_CHOICES), {"default": "largest",
                                              "tooltip": "Which face to follow when several are in view: the largest, or "
                                                         "the one on the left or right. Everything downstream (identity, "
                                                         "dub, Train Avatar) uses this person."}),
            },
        }

    def load(self, video, fps=0.0, start_seconds=0.0, end_seconds=0.0, max_side=1024, video_input=None, images=None, face="largest"):
        check_face_choice(face)
        options = {
            "fps": fps or None,
            "start_s": start_seconds or None,
            "end_s": end_seconds or None,
            "max_side": max_side or None,
        }
        in_memory = None  # (frames, their fps, own audio as (samples, rate) or None)
        source = allowed = None
        if video_input is not None:
            stream_source = getattr(video_input, "get_stream_source", lambda: None)() if is_comfy_video(video_input) else None
            if isinstance(stream_source, (str, os.PathLike)):
                source = stream_source  # a file-backed VIDEO: decoded like a file
            elif is_comfy_video(video_input):
                components = video_input.get_components()
                in_memory = (comfy_image_to_frames(components.images), float(components.frame_rate),
                             None if components.audio is None else comfy_audio_to_wave(components.audio))
            else:
                raise UserFacingError(f"'video_input' must be a ComfyUI VIDEO, got {type(video_input).__name__}")
        elif images is not None:
            in_memory = (comfy_image_to_frames(images), 25.0 if options["fps"] is None else float(options["fps"]), None)
        else:
            if not video:
                raise UserFacingError("no reference video chosen; upload one with the 'video' widget or connect a VIDEO")
            root = _comfy.annotated_root(video)
            source, allowed = _comfy.annotated_path(video), None if root is None else [root]

        progress = None

        def on_frame(done: int, total: int) -> None:
            nonlocal progress
            _comfy.check_interrupted()
            if progress is None:
                progress = _comfy.progress_bar(total)
            # About 100 updates per clip: each one is a websocket message to the browser.
            if done == total or done % max(1, total // 100) == 0:
                progress.update_absolute(done, total)

        _comfy.check_interrupted()
        if in_memory is not None:
            frames, frames_fps, own_audio = in_memory
            reference = reference_from_frames(frames, frames_fps, audio=own_audio, **options)
        else:
            reference = load_reference_video(source, allowed_roots=allowed, on_frame=on_frame, **options)
        reference = dataclasses.replace(reference, face=face)
        audio = reference.audio if reference.audio is not None else np.zeros(
            int(round(reference.duration_s * reference.sample_rate)), np.float32)
        return (reference, frames_to_comfy_image(reference.frames), audio_to_comfy(audio, reference.sample_rate),
                float(reference.fps))

    @classmethod
    def IS_CHANGED(cls, video, **_):
        # Modification time + size instead of hashing: re-hashing a long clip on every queue is slow.
        path = _comfy.annotated_path(video) if video else ""
        try:
            stat = os.stat(path)
        except OSError:
            return ""
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    # ComfyUI skips its own checks (combo list, min/max) for every input VALIDATE_INPUTS names, and
    # for all inputs when it takes **kwargs; it reports a returned message once per named input.
    # So it names only what needs more than the built-ins: the file (annotated values such as
    # 'clip.mp4 [output]' are not in the combo list; missing, empty, unreadable, outside input/, not
    # a video FFmpeg opens) and the time range (end after start). fps and max_side keep ComfyUI's
    # min/max from INPUT_TYPES.
    @classmethod
    def VALIDATE_INPUTS(cls, video, start_seconds=0.0, end_seconds=0.0):
        # No file chosen is fine here: a connected VIDEO / IMAGE input replaces it (load says so otherwise).
        file_problem = (_comfy.input_file_problem(video, "reference video") or _container_problem(video)) if video else None
        problems = [problem for problem in (_time_range_problem(start_seconds, end_seconds), file_problem) if problem]
        return "; ".join(problems) if problems else True


def _container_problem(video: str) -> str | None:
    """Why FFmpeg cannot open ``video`` as a video (random bytes, a truncated header, audio only), or
    None. Reads the container's header only, so it is cheap enough for every queue; a damaged stream
    past the header is still found when the node decodes it."""
    import av

    try:
        with av.open(_comfy.annotated_path(video)) as container:
            has_video = bool(container.streams.video)
    except (av.error.FFmpegError, OSError, EOFError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        return (f"reference video '{video}' is not a readable video ({reason}); it may be truncated, random data or an "
                "unsupported format - re-export it as mp4 (H.264)")
    if not has_video:
        return f"reference video '{video}' has no video stream (an audio file?); pick a video of the person"
    return None


def _time_range_problem(start_seconds, end_seconds) -> str | None:
    """What is wrong with a start/end pair (seconds; end 0 = the end of the clip), or None."""
    try:
        start, end = float(start_seconds), float(end_seconds)
    except (TypeError, ValueError):
        return f"start and end must be numbers of seconds, got {start_seconds!r} and {end_seconds!r}"
    for label, value in (("start", start), ("end", end)):
        if not (math.isfinite(value) and 0.0 <= value <= _MAX_SECONDS):
            return f"{label} must be between 0 and {_MAX_SECONDS:g} seconds, got {value:g}"
    if end and end <= start:
        return f"end ({end:g} s) must be after start ({start:g} s), or 0 for the end of the clip"
    return None


NODE_CLASS_MAPPINGS = {"SparseAvatarLoadReferenceVideo": LoadReferenceVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"SparseAvatarLoadReferenceVideo": "Load Reference Video"}
