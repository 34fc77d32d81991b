"""pyproject.toml is ready for ComfyUI Manager and `comfy node publish`: the fields the Comfy
Registry reads are filled and in the forms comfy-cli accepts (its config_parser: SPDX license
string, requires-comfyui as [op]X.Y.Z, OS / accelerator classifiers from its lists), and the icon
the Icon URL names ships in the repository."""
import re
from pathlib import Path

import pytest
import sparse_avatar
from PIL import Image

tomllib = pytest.importorskip("tomllib")
ROOT = Path(sparse_avatar.__file__).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend", "GPU :: Apple Metal"}


def test_project_fields_the_registry_reads():
    project = PYPROJECT["project"]
    assert re.fullmatch(r"[a-z][a-z0-9]*(?:[-_.][a-z0-9]+)*", project["name"]) and "comfyui" not in project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]) and project["version"] == sparse_avatar.__version__
    assert project["license"] == "Apache-2.0" and project["description"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", project["urls"]["Repository"])
    systems = [c.split(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Operating System :: ")]
    accelerators = [c.split(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Environment :: ")]
    assert systems and all(s.startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")) for s in systems)
    assert accelerators and set(accelerators) <= ACCELERATORS
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # setuptools >= 77 refuses both


def test_tool_comfy_and_the_shipped_icon():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Sparse Avatar"
    assert re.fullmatch(r"(==|>=|<=|~=|>|<)?\d+\.\d+\.\d+", comfy["requires-comfyui"])
    repository = PYPROJECT["project"]["urls"]["Repository"]
    owner_repo = repository.removeprefix("https://github.com/")
    assert comfy["Icon"] == f"https://raw.githubusercontent.com/{owner_repo}/main/icon.png"
    with Image.open(ROOT / "icon.png") as icon:
        assert icon.format == "PNG" and icon.width == icon.height <= 400
    data = PYPROJECT["tool"]["setuptools"]["package-data"]["sparse_avatar"]
    assert {"icon.png", "example_workflows/*.json", "example_workflows/*.jpg", "workflows_api/*.api.json"} <= set(data)
