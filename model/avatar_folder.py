"""The avatar folder: one person learned from their own video, in one place.

``python -m sparse_avatar personalize --video me.mp4 --out me/`` writes it, ``render --avatar me/``
reads it::

    me/avatar.json            what is here: the source video (path, sha256, fps, frames), the
                              training (steps, seconds, finished or stopped early), the files
    me/model.safetensors      the fine-tuned model (a full checkpoint)
    me/identity.safetensors   the person's identity, extracted with that model from the video
                              (render skips the reference pass)
    me/training/              while training only: resumable trainer checkpoints and the job
                              (job.json); removed once the training has finished

Every file is written atomically (temporary name, then rename) and ``avatar.json`` last, so a
folder is either usable or says it is not. A kill during training leaves ``training/``, and the
same command resumes from its newest checkpoint.

The reading side lives in ``model/`` because rendering needs it; the writing side is
``training.personality.personalize_video``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserFacingError
from ..files import write_text

AVATAR_FORMAT = "sparse-avatar-avatar"
AVATAR_VERSION = 1
MANIFEST_FILE = "avatar.json"
MODEL_FILE = "model.safetensors"
IDENTITY_FILE = "identity.safetensors"
TRAINING_DIR = "training"

FINISHED = "finished"  # the training ran its whole budget
STOPPED = "stopped"  # cancelled (Ctrl-C, Cancel) before that: usable, and the same command continues it


def is_avatar_folder_path(path) -> bool:
    """An ``--out`` that names a folder (anything but a .safetensors file)."""
    return Path(path).suffix.lower() != ".safetensors"


@dataclass(frozen=True)
class AvatarFolder:
    path: Path
    manifest: dict

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def video_path(self) -> Path:
        return Path(self.manifest["video"]["path"])

    @property
    def training(self) -> dict:
        return self.manifest.get("training", {})

    @property
    def finished(self) -> bool:
        return self.training.get("status") == FINISHED

    def summary(self) -> str:
        training = self.training
        state = "trained" if self.finished else "stopped early"
        return (f"{self.path}: {state} for {training.get('steps', '?')} steps ({float(training.get('train_seconds', 0)) / 60:.1f} min) "
                f"on {self.video_path.name}")


def write_avatar_manifest(folder, manifest: dict) -> Path:
    """``folder/avatar.json``, atomically (the last file personalize writes)."""
    manifest = {"format": AVATAR_FORMAT, "version": AVATAR_VERSION, **manifest}
    return write_text(Path(folder) / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))


def read_avatar_manifest(folder) -> dict | None:
    """The manifest of ``folder``, or None when it has none yet (a new or unfinished folder)."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserFacingError(f"{path} is damaged ({type(error).__name__}); run personalize again with the same --out "
                              "(it resumes or rewrites it).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != AVATAR_FORMAT:
        raise UserFacingError(f"{path} is not a sparse-avatar avatar manifest; pass a folder written by "
                              "python -m sparse_avatar personalize --out FOLDER.")
    if int(manifest.get("version", 0)) > AVATAR_VERSION:
        raise UserFacingError(f"{path} was written by a newer sparse-avatar (avatar format {manifest.get('version')}); "
                              "update sparse-avatar to render it.")
    return manifest


def read_avatar_folder(folder) -> AvatarFolder:
    """A usable avatar folder, or a UserFacingError saying what is missing and what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserFacingError(f"avatar folder {folder} does not exist; make one with "
                              f"python -m sparse_avatar personalize --video YOUR_VIDEO --out {folder}")
    manifest = read_avatar_manifest(folder)
    if manifest is None:
        unfinished = (folder / TRAINING_DIR).is_dir()
        raise UserFacingError(f"{folder} holds no finished avatar (no {MANIFEST_FILE})"
                              + ("; its training was interrupted: run the same personalize command again to resume it."
                                 if unfinished else f"; make one with python -m sparse_avatar personalize --video YOUR_VIDEO --out {folder}"))
    avatar = AvatarFolder(folder, manifest)
    for path in (avatar.model_path, avatar.identity_path):
        if not path.is_file():
            raise UserFacingError(f"{path} is missing from the avatar folder; run personalize again with --out {folder} "
                                  "(the training is kept; only the missing files are written again).")
    return avatar
