"""The pack imports outside ComfyUI, exposes the classic node API, and the CLI answers."""
import subprocess
import sys

import sparse_avatar


def test_classic_node_api_is_exposed():
    assert isinstance(sparse_avatar.NODE_CLASS_MAPPINGS, dict)
    assert set(sparse_avatar.NODE_CLASS_MAPPINGS) == set(sparse_avatar.NODE_DISPLAY_NAME_MAPPINGS)
    assert sparse_avatar.WEB_DIRECTORY == "./web"
    for name, cls in sparse_avatar.NODE_CLASS_MAPPINGS.items():
        assert callable(getattr(cls, "INPUT_TYPES", None)), name
        assert getattr(cls, "CATEGORY", "").startswith("sparse-avatar"), name
        assert hasattr(cls, getattr(cls, "FUNCTION", "")), name


def test_cli_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "sparse_avatar", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "COMMAND" in result.stdout


def test_library_folders_never_import_comfyui():
    import re
    from pathlib import Path

    root = Path(sparse_avatar.__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|comfy_api|comfy_extras|folder_paths|server|execution)\b", re.M)
    for folder in ("model", "media", "sparse_attention", "training"):
        for path in (root / folder).rglob("*.py"):
            assert not pattern.search(path.read_text()), f"{path} imports ComfyUI"
