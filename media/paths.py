"""Turning a user-supplied path into a safe, existing file path.

Every media entry point goes through ``resolve_input_path`` so a missing file, a folder, or a path
that escapes the allowed folders (``..``, symlinks) becomes one actionable ``UserFacingError``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import UserFacingError


def resolve_input_path(path: str | os.PathLike, allowed_roots: Iterable[str | os.PathLike] | None = None) -> Path:
    """The absolute, symlink-free path of an existing file, optionally confined to ``allowed_roots``.

    The check is made on the fully resolved path (symlinks and ``..`` followed), so a link inside
    an allowed folder that points outside it is refused, as is ``input/../../etc/passwd``.
    """
    if path is None or str(path).strip() == "":
        raise UserFacingError("no file was given; pass the path of a video or audio file")
    raw = Path(os.path.expanduser(str(path)))
    try:
        resolved = raw.resolve(strict=True)
    except FileNotFoundError:
        raise UserFacingError(f"file not found: {raw}; check the path (relative paths start at {Path.cwd()})") from None
    except (OSError, RuntimeError) as error:  # RuntimeError: symlink loop on older Pythons
        raise UserFacingError(f"cannot open {raw}: {error}; check the path and its permissions") from None
    if allowed_roots is not None:
        roots = [Path(os.path.expanduser(str(root))).resolve() for root in allowed_roots]
        if not any(resolved == root or root in resolved.parents for root in roots):
            allowed = ", ".join(str(root) for root in roots) or "(none)"
            raise UserFacingError(
                f"{raw} is outside the allowed folders ({allowed}); copy the file into one of them"
            )
    if resolved.is_dir():
        raise UserFacingError(f"{raw} is a folder, not a file; pass the path of a video or audio file")
    if not os.access(resolved, os.R_OK):
        raise UserFacingError(f"{raw} is not readable; check its permissions")
    if resolved.stat().st_size == 0:
        raise UserFacingError(f"{raw} is empty (0 bytes); the copy or download probably failed, fetch it again")
    return resolved
