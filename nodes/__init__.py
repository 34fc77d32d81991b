"""ComfyUI adapters: the ONLY place that touches ComfyUI, and only lazily inside functions.

Each stage lives in its own module with its own NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS; this file merges them. Node classes are plain classes (classic API),
so tests call them without ComfyUI.
"""
import importlib

# One module per stage of the pipeline.
_NODE_MODULES: tuple[str, ...] = (
    "reference_video",
    "speech",
    "avatar_model",
    "identity",
    "generation",
    "training",
)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _name in _NODE_MODULES:
    _module = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
