"""The one exception type for problems the user can fix (bad file, wrong setting, missing face).

Its message says what was wrong and what to do. The CLI prints it as one line; ComfyUI shows it in
the node's error box. Library code converts low-level failures (PyAV, torch, safetensors) into
this type at the boundary where the user's input is read, so no traceback from deep inside a
library reaches the user.

ComfyUI titles a node's error box with ``type(error).__module__ + "." + type(error).__qualname__``
(``execution.full_type_name``), and it imports a custom node under its folder's full path, so the
title would read ``/home/.../custom_nodes/sparse-avatar.errors.UserFacingError``. The class
therefore says its module is ``sparse-avatar`` (title: ``sparse-avatar.UserFacingError``). An
alias module of that name in ``sys.modules`` lets pickle find the class by reference, and
instances pickle through ``_rebuild`` (a real module-level function), so they also cross into a
fresh (spawned) process that never imported this file under the alias.
"""
from __future__ import annotations

import sys
import types

DISPLAY_MODULE = "sparse-avatar"


def _rebuild(args: tuple, state: dict | None = None) -> "UserFacingError":
    error = UserFacingError(*args)
    if state:
        error.__dict__.update(state)
    return error


class UserFacingError(ValueError):
    """Bad input or settings; the message tells the user what is wrong and what to do."""

    def __reduce__(self):
        if type(self) is not UserFacingError:  # a subclass pickles the usual way
            return super().__reduce__()
        return _rebuild, (self.args, self.__dict__ or None)


UserFacingError.__module__ = DISPLAY_MODULE

_alias = sys.modules.get(DISPLAY_MODULE)
if _alias is None:
    _alias = types.ModuleType(DISPLAY_MODULE, "Alias so pickle finds sparse-avatar's error class by its display name.")
    sys.modules[DISPLAY_MODULE] = _alias
if not hasattr(_alias, "UserFacingError"):
    _alias.UserFacingError = UserFacingError
