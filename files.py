"""Atomic file output: every file the pack writes appears whole or not at all.

    with atomic_output(path) as temporary:
        write_something(temporary)          # any writer that takes a path
    # now `path` exists, complete; on an exception nothing was replaced and no debris is left

The temporary file sits beside the final one (same folder, so ``os.replace`` is an atomic rename
on the same file system) under a hidden, unique name. The result gets the usual permissions for
a new file (0666 minus the umask) whatever the writer did: safetensors' writer, like
``tempfile.mkstemp``, creates owner-only 0600 files, which other users of a shared ComfyUI
(or a web server reading its output folder) then cannot read.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


def atomic_temp_path(final_path: Path, suffix: str | None = None) -> Path:
    """A fresh temporary path in the same folder as ``final_path``. The suffix (default: the final
    one's) matters to writers that pick a format from it (PyAV, OpenCV)."""
    final_path = Path(final_path)
    suffix = final_path.suffix if suffix is None else suffix
    return final_path.with_name(f".{final_path.stem}.partial-{os.getpid()}-{os.urandom(4).hex()}{suffix}")


@contextlib.contextmanager
def atomic_output(final_path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path; when the block ends without an exception, rename it over
    ``final_path`` (creating its folder first). The temporary file is removed in every case."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = atomic_temp_path(final_path, suffix)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, final_path)
    finally:
        if temporary.exists():
            temporary.unlink()


def _umask() -> int:
    current = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(current)
    return current


def save_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> Path:
    """torch or numpy tensors -> ``path`` (.safetensors), atomically."""
    first = next(iter(tensors.values()), None)
    if first is not None and type(first).__module__ == "numpy":
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file
    path = Path(path)
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def write_text(path, text: str) -> Path:
    path = Path(path)
    with atomic_output(path) as temporary:
        temporary.write_text(text)
    return path
