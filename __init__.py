"""sparse-avatar: a ComfyUI node pack (and a plain Python library + CLI under it) that turns a
reference video of a person plus driving speech into a lip-synced talking-head video.

ComfyUI imports this folder as a package and reads the classic node API below. Outside ComfyUI
the same folder imports as ``sparse_avatar`` (``pip install -e .``); the library folders
(``media``, ``model``, ``sparse_attention``, ``training``) never import ComfyUI, and ``nodes``
only touches ComfyUI modules lazily, inside functions, so importing this package is safe anywhere.
"""

__version__ = "0.1.0"

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY", "__version__"]
