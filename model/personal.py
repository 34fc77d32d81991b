"""Learning one person from their own reference: what Train Avatar and Preference Pair need from a
``PreparedReference``, without ComfyUI (the nodes in ``nodes/training.py`` only adapt inputs).

The training calls themselves (``training.personality.finetune_personality``,
``training.preferences.append_pair``) stay in ``training/``: ``model/`` is below ``training/`` and
does not import it.
"""
from __future__ import annotations

import os

import numpy as np

from .. import media
from ..errors import UserFacingError
from .pipeline import PreparedReference

SPEECH_SAMPLE_RATE = media.SPEECH_SAMPLE_RATE


def check_own_audio(reference_video, *, advice: str = "Use a video file with its sound (a batch of images has none).") -> None:
    """Personality fine-tuning learns how the person moves while talking: the reference must carry its own audio."""
    if not reference_video.has_audio or reference_video.audio is None:
        raise UserFacingError(
            "personality fine-tuning learns how the person moves while talking, so the reference needs its own audio "
            f"track, and this one has none. {advice}")


def personality_data(prepared: PreparedReference, model) -> tuple[np.ndarray, np.ndarray]:
    """(face crops uint8 [T, S, S, 3], own speech features float32 [T, F] in ``model``'s feature
    definition): what ``finetune_personality`` learns from."""
    if prepared.speech is None:
        raise UserFacingError("personality fine-tuning learns how the person moves while talking, so the reference needs its own "
                              "audio track, and this one has none. Use a video file with its sound.")
    return prepared.crops, prepared.speech_for(model)


def check_preference_pair(frames_a: np.ndarray, fps_a: float, audio_a, frames_b: np.ndarray, fps_b: float, audio_b) -> None:
    """A preference pair is two renderings of the same speech: same frame count and size, square face
    crops (what preference training scores), one frame rate, and the same driving audio (A's is needed)."""
    if frames_a.shape != frames_b.shape:
        raise UserFacingError(f"video A is {frames_a.shape[0]} frames of {frames_a.shape[2]}x{frames_a.shape[1]} but B is "
                              f"{frames_b.shape[0]} of {frames_b.shape[2]}x{frames_b.shape[1]}; a pair must be two renderings "
                              "of the same speech at the same size.")
    if frames_a.shape[1] != frames_a.shape[2]:
        raise UserFacingError(f"the videos are {frames_a.shape[2]}x{frames_a.shape[1]}; preference training needs the "
                              "square face crops the model renders: render with paste-back off (Decode Avatar Video's paste_back, "
                              "the CLI's --crop-only).")
    if abs(fps_a - fps_b) > 1e-3:
        raise UserFacingError(f"video A is {fps_a:g} fps but B is {fps_b:g} fps; render both at the same frame rate.")
    if audio_a is None:
        raise UserFacingError("video A has no audio; pass the rendering with the driving speech both were made from "
                              "(Decode Avatar Video's 'video' output carries it).")
    if audio_b is not None:
        length = min(len(audio_a), len(audio_b))
        if abs(len(audio_a) - len(audio_b)) > SPEECH_SAMPLE_RATE / fps_a or (
                length and float(np.mean(np.abs(audio_a[:length] - audio_b[:length]))) > 0.01):
            raise UserFacingError("videos A and B carry different audio; a preference pair compares two renderings "
                                  "of the same speech.")


def reference_crops_video(prepared: PreparedReference, folder) -> str:
    """The prepared reference's face crops with its own audio as an mp4 in ``folder``, written once
    per clip and crop size (the reference of preference pairs)."""
    name = f"reference_{prepared.key}_{prepared.n_frames}_{prepared.frame_size}.mp4"
    path = os.path.join(str(folder), name)
    if not os.path.isfile(path):
        media.write_video(path, prepared.crops, prepared.fps, audio=prepared.audio)
    return path
