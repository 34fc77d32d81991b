"""Atomic file output: every file the pack writes appears whole or not at all.

    with atomic_output(path) as temporary:
        write_something(temporary)          # any writer that takes a path
    # now `path` exists, complete; on an exception nothing was replaced and no debris is left

The temporary file sits beside the final one (same folder, so ``os.replace`` is an atomic rename
on the same file system) under a hidden, unique name. The result gets the usual permissions for
a new file (0666 minus the umask) whatever the writer did: safetensors' writer, like
``tempfile.mkstemp``, creates owner-only 0600 files, which other users of a shared ComfyUI
(or a web server reading its output folder) then cannot read.

Reading goes through one door as well: ``open_safetensors`` validates a .safetensors file's
header itself (bounded size, every tensor's bytes inside the file) before safetensors maps it, and
turns every failure into a ``UserFacingError`` that names the file, says what is wrong and what to
do, so a damaged or crafted file never reaches the user as a traceback or a huge allocation.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UserFacingError


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
    except Exception as error:
        if temporary.exists():
            temporary.unlink()  # first, so the message counts the space it took as free
        if is_disk_full(error):
            raise disk_full_error(final_path) from None
        raise
    finally:
        if temporary.exists():
            temporary.unlink()


def is_disk_full(error: BaseException) -> bool:
    """A write failed for want of space: OSError ENOSPC/EDQUOT, or a writer's own error type that
    only says so in its message (safetensors' SafetensorError, PyAV's)."""
    if getattr(error, "disk_full", False) or getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text


def disk_full_error(path) -> UserFacingError:
    """The one message for a full disk: where, how much is free, that nothing half-written was
    left, and what to do. Marked ``disk_full`` (``is_disk_full`` recognises it)."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    error = UserFacingError(f"the disk holding {folder} is full ({free}) while writing {path.name}; nothing half-written was "
                           "left. Free some space or write to another folder, then run the same command again (finished "
                           "work is kept).")
    error.disk_full = True  # outer writers (a checkpoint folder) re-word it for what they write
    return error


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


# ---- reading .safetensors ------------------------------------------------------------------------

# Bytes per element of each safetensors dtype name (the ones torch and numpy can load).
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
# The JSON header of a .safetensors file; ours hold at most a few thousand tensor entries (~100 B
# each). A larger claim is refused before it is read.
MAX_SAFETENSORS_HEADER_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


class _Damaged(Exception):
    """A header fault found by ``read_safetensors_header``; the caller words the user's message."""


def read_safetensors_header(path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """(metadata, {name: TensorInfo}) of a .safetensors file, from its header alone: no tensor
    data is read. Raises ``_Damaged`` (reason as its message) unless the header is well formed:
    at most MAX_SAFETENSORS_HEADER_BYTES of JSON, known dtypes, and every tensor's declared size
    (shape x dtype) equal to its byte range, which lies inside the file. So a header that claims
    terabytes is refused here, before anything is allocated for it."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _Damaged(f"the file is {file_size} bytes, too short for a header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > MAX_SAFETENSORS_HEADER_BYTES:
            raise _Damaged(f"its header claims {header_size} bytes (at most {MAX_SAFETENSORS_HEADER_BYTES} accepted)")
        if 8 + header_size > file_size:
            raise _Damaged(f"its header claims {header_size} bytes but the file has only {file_size - 8} after the size field (truncated)")
        raw = handle.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Damaged(f"its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _Damaged("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _Damaged("its metadata is not a map of strings")
    data_size = file_size - 8 - header_size
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _Damaged(f"tensor {name!r} has no description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise _Damaged(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise _Damaged(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise _Damaged(f"tensor {name!r} has invalid data offsets {offsets!r}")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if nbytes != offsets[1] - offsets[0]:
            raise _Damaged(f"tensor {name!r} claims shape {tuple(shape)} ({nbytes} bytes) but holds {offsets[1] - offsets[0]} bytes")
        if offsets[1] > data_size:
            raise _Damaged(f"tensor {name!r} ends at byte {offsets[1]} of a {data_size}-byte data section (truncated)")
        tensors[name] = TensorInfo(dtype, tuple(shape), nbytes)
    return metadata, tensors


class SafetensorsReader:
    """An open, header-validated .safetensors file (see ``open_safetensors``). ``metadata`` and
    ``tensors`` (name -> TensorInfo) come from the header; ``get`` and ``rows`` read data and turn
    any read failure into the file's UserFacingError."""

    def __init__(self, path: Path, handle, metadata: dict[str, str], tensors: dict[str, TensorInfo], damaged):
        self.path, self._handle, self.metadata, self.tensors, self._damaged = path, handle, metadata, tensors, damaged

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str):
        """The whole tensor ``name``."""
        try:
            return self._handle.get_tensor(name)
        except Exception as error:  # safetensors' own error types for unreadable data
            raise self._damaged(f"tensor {name!r} could not be read ({error})") from None

    def get_all(self) -> dict:
        return {name: self.get(name) for name in self.tensors}

    def rows(self, name: str, start: int, stop: int):
        """Rows start:stop of tensor ``name`` (only those bytes are read)."""
        try:
            return self._handle.get_slice(name)[start:stop]
        except Exception as error:
            raise self._damaged(f"rows {start}:{stop} of tensor {name!r} could not be read ({error})") from None


@contextlib.contextmanager
def open_safetensors(path, *, what: str, if_missing: str, if_damaged: str, framework: str = "pt",
                     device: str = "cpu") -> Iterator[SafetensorsReader]:
    """Open ``path`` for reading; every failure is a UserFacingError that names the file:

        "<what> not found: <path>. <if_missing>"
        "<what> <path> is not a readable .safetensors file: <reason>. <if_damaged>"

    ``what`` names the kind of file ("checkpoint", "LoRA file"), ``if_missing``/``if_damaged`` say
    what to do. The header is validated (``read_safetensors_header``) before safetensors opens it.
    UserFacingErrors raised by the caller inside the block pass through unchanged."""
    path = Path(path)

    def damaged(reason: str) -> UserFacingError:
        return UserFacingError(f"{what} {path} is not a readable .safetensors file: {reason}. {if_damaged}")

    if not path.is_file():
        raise UserFacingError(f"{what} not found: {path}. {if_missing}")
    try:
        metadata, tensors = read_safetensors_header(path)
    except _Damaged as error:
        raise damaged(str(error)) from None
    except OSError as error:
        raise damaged(f"it cannot be opened ({error.strerror or error})") from None
    try:
        from safetensors import safe_open

        context = safe_open(str(path), framework=framework, device=device)
        handle = context.__enter__()
    except Exception as error:  # safetensors' own error types: what our header check does not cover
        raise damaged(str(error)) from None
    try:
        yield SafetensorsReader(path, handle, metadata, tensors, damaged)
    finally:
        context.__exit__(None, None, None)
