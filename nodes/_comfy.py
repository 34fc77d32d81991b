"""The few ComfyUI hooks the nodes use, imported lazily and degrading to no-ops outside ComfyUI.

Nodes call these instead of importing ``comfy`` / ``folder_paths`` themselves, so every node class
runs in plain tests, and a ComfyUI API change is fixed in one place.
"""
from __future__ import annotations

import os
import re

from ..errors import UserFacingError


class _NoProgress:
    def update(self, value: int = 1) -> None:
        pass

    def update_absolute(self, value: int, total: int | None = None, preview=None) -> None:
        pass


def progress_bar(total: int):
    """``comfy.utils.ProgressBar(total)`` in ComfyUI (drawn on the node), else an object that ignores updates."""
    try:
        import comfy.utils
    except ImportError:
        return _NoProgress()
    return comfy.utils.ProgressBar(max(1, int(total)))


def check_interrupted() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op outside ComfyUI)."""
    try:
        import comfy.model_management
    except ImportError:
        return
    comfy.model_management.throw_exception_if_processing_interrupted()


def interrupt_requested() -> bool:
    """True once the user pressed Cancel, without clearing the flag (False outside ComfyUI).

    For work that must stop cleanly between steps and save what it has (training) before
    ``check_interrupted`` re-raises ComfyUI's interrupt."""
    try:
        import comfy.model_management
    except ImportError:
        return False
    return bool(comfy.model_management.processing_interrupted())


def is_interrupt(error: BaseException) -> bool:
    """True for ComfyUI's interrupt exception (raised by ``check_interrupted`` and by ComfyUI's progress
    hook inside ``ProgressBar.update``, which also clears the flag); False outside ComfyUI."""
    try:
        import comfy.model_management
    except ImportError:
        return False
    return isinstance(error, getattr(comfy.model_management, "InterruptProcessingException", ()))


def input_directory() -> str | None:
    """ComfyUI's input folder, or None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths.get_input_directory()


def output_directory() -> str:
    """ComfyUI's output folder (created when missing); ./output outside ComfyUI."""
    return _comfy_folder("get_output_directory", "output")


def temp_directory() -> str:
    """ComfyUI's temp folder (emptied when ComfyUI starts; for previews), created when missing;
    ./temp outside ComfyUI."""
    return _comfy_folder("get_temp_directory", "temp")


def _comfy_folder(getter: str, fallback: str) -> str:
    try:
        import folder_paths
    except ImportError:
        path = os.path.join(os.getcwd(), fallback)
    else:
        path = getattr(folder_paths, getter)()
    os.makedirs(path, exist_ok=True)
    return path


def _prompt_server():
    """ComfyUI's running ``PromptServer``, or None (outside ComfyUI, or another module named ``server``)."""
    try:
        import server
    except ImportError:
        return None
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def send_event(event: str, data: dict) -> None:
    """Send a custom websocket event to the browser that queued the running prompt (the web extension
    listens with ``api.addEventListener(event)``); a no-op outside ComfyUI."""
    instance = _prompt_server()
    if instance is None:
        return
    instance.send_sync(event, data, getattr(instance, "client_id", None))


def add_routes(register) -> bool:
    """Call ``register(routes)`` with ComfyUI's aiohttp route table (``PromptServer.instance.routes``)
    so a node module can add a small HTTP route; False (nothing registered) outside ComfyUI."""
    instance = _prompt_server()
    routes = getattr(instance, "routes", None)
    if routes is None:
        return False
    register(routes)
    return True


def view_entry(path: str) -> dict | None:
    """The ``/view`` query of a file inside ComfyUI's output or temp folder ({filename, subfolder,
    type}), the shape ComfyUI's own UI outputs use; None when it lies outside both."""
    try:
        import folder_paths
    except ImportError:
        roots = (("temp", temp_directory()), ("output", os.path.join(os.getcwd(), "output")))
    else:
        roots = (("output", folder_paths.get_output_directory()), ("temp", folder_paths.get_temp_directory()))
    real = os.path.realpath(path)
    for kind, root in roots:
        real_root = os.path.realpath(root)
        try:
            inside = os.path.commonpath([real_root, real]) == real_root
        except ValueError:
            inside = False
        if inside and real != real_root:
            subfolder = os.path.relpath(os.path.dirname(real), real_root)
            return {"filename": os.path.basename(real), "subfolder": "" if subfolder == "." else subfolder.replace(os.sep, "/"),
                    "type": kind}
    return None


def media_roots() -> list[str] | None:
    """Folders a node may read user media from (input, output, temp); None outside ComfyUI."""
    try:
        import folder_paths
    except ImportError:
        return None
    return [folder_paths.get_input_directory(), folder_paths.get_output_directory(), folder_paths.get_temp_directory()]


def annotated_path(name: str) -> str:
    """Full path of a file widget value such as ``clip.mp4`` or ``clip.mp4 [output]``."""
    try:
        import folder_paths
    except ImportError:
        return name
    return folder_paths.get_annotated_filepath(name)


def annotated_path_exists(name: str) -> bool:
    try:
        import folder_paths
    except ImportError:
        return os.path.isfile(name)
    return folder_paths.exists_annotated_filepath(name)


def _annotation(name: str) -> str:
    """ComfyUI folder named by a file widget value: ``clip.mp4 [output]`` -> output; plain -> input."""
    for tag in ("output", "temp", "input"):
        if name.endswith(f" [{tag}]"):
            return tag
    return "input"


def annotated_root(name: str) -> str | None:
    """The ComfyUI folder a file widget value lives in (None outside ComfyUI). The value must stay
    inside it once symlinks and ``..`` are followed."""
    try:
        import folder_paths
    except ImportError:
        return None
    return getattr(folder_paths, f"get_{_annotation(name)}_directory")()


def input_file_problem(name, what: str = "file") -> str | None:
    """Why the file widget value ``name`` cannot be used (one line for ComfyUI's validation), or None.

    Missing, a folder, empty, unreadable, or outside its ComfyUI folder (``../``, an absolute path,
    a symlink leading out) - checked without decoding, so it is cheap enough for every queue."""
    if not isinstance(name, str) or not name.strip():
        return f"no {what} chosen; upload one or pick a file"
    root, path, folder = annotated_root(name), annotated_path(name), _annotation(name)
    if root is not None:
        real_root, real = os.path.realpath(root), os.path.realpath(path)
        try:
            inside = os.path.commonpath([real_root, real]) == real_root
        except ValueError:  # another drive (Windows)
            inside = False
        if not inside:
            return (f"{what} '{name}' is outside ComfyUI's {folder} folder; only files inside it can be used - "
                    f"copy the file into {root} and pick it")
    if not os.path.exists(path):
        return f"{what} '{name}' not found in ComfyUI's {folder} folder; upload it or pick another file"
    if not os.path.isfile(path):
        return f"{what} '{name}' is a folder, not a file; pick a file"
    try:
        with open(path, "rb") as handle:
            first = handle.read(1)
    except OSError as error:
        return f"{what} '{name}' cannot be read ({error.strerror or error}); check its permissions"
    if not first:
        return f"{what} '{name}' is empty (0 bytes); the upload probably failed - upload it again"
    return None


def input_files(extensions: tuple[str, ...]) -> list[str]:
    """Sorted names of files in ComfyUI's input folder with one of ``extensions`` (empty outside ComfyUI)."""
    folder = input_directory()
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(
        name for name in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, name)) and name.lower().endswith(extensions)
    )


def make_video(images, fps: float, audio: dict | None):
    """A core VIDEO (``VideoFromComponents``) from an IMAGE batch, frame rate and AUDIO; outside ComfyUI
    a plain dict with the same parts, so nodes stay testable."""
    from fractions import Fraction

    frame_rate = Fraction(float(fps)).limit_denominator(1001)
    try:
        from comfy_api.input_impl import VideoFromComponents
        from comfy_api.util import VideoComponents
    except ImportError:
        return {"images": images, "frame_rate": frame_rate, "audio": audio}
    return VideoFromComponents(VideoComponents(images=images, frame_rate=frame_rate, audio=audio))


def video_parts(video) -> tuple:
    """(IMAGE, fps, AUDIO or None) of a core VIDEO, or of the plain dict ``make_video`` returns outside ComfyUI."""
    if isinstance(video, dict) and "images" in video and "frame_rate" in video:
        return video["images"], float(video["frame_rate"]), video.get("audio")
    if not callable(getattr(video, "get_components", None)):
        raise UserFacingError(f"expected a VIDEO (e.g. Decode Avatar Video's 'video' output), got a {type(video).__name__}.")
    components = video.get_components()
    return components.images, float(components.frame_rate), components.audio


_SAFE_NAME = re.compile(r"^[\w\-. ]{1,100}$")


def check_file_name(name: str, what: str = "filename prefix") -> str:
    """``name`` if it is a plain file name start (letters, digits, '-', '_', '.', spaces; no folders), else a clear error."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name.startswith("."):
        raise UserFacingError(f"{what} {name!r} is not allowed; use letters, digits, '-', '_', '.' and spaces "
                              "(no folders, not starting with '.').")
    return name


def file_name_problem(name, what: str = "filename prefix") -> str | None:
    """``check_file_name``'s message for VALIDATE_INPUTS (refused before anything runs), or None."""
    try:
        check_file_name(name, what)
    except UserFacingError as error:
        return str(error)
    return None


def numbered_path(folder: str, prefix: str, suffix: str) -> str:
    """``folder/<prefix>_<counter>suffix`` with the first counter (00001, 00002, ...) not taken yet."""
    check_file_name(prefix)
    counter = 1
    while os.path.exists(os.path.join(folder, f"{prefix}_{counter:05d}{suffix}")):
        counter += 1
    return os.path.join(folder, f"{prefix}_{counter:05d}{suffix}")
