"""Example workflows stay in step with the nodes: every node and widget they name exists, links
connect matching types, the UI-format files and thumbnails in example_workflows/ are exactly what
the API-format files in workflows_api/ build, and example_workflows/ (which ComfyUI lists as
templates) holds nothing else."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sparse_avatar

ROOT = Path(sparse_avatar.__file__).parent
FOLDER = ROOT / "example_workflows"
SCRIPT = ROOT / "scripts" / "build_example_workflows.py"
API_WORKFLOWS = sorted((ROOT / "workflows_api").glob("*.api.json"))
CORE = {"LoadAudio", "SaveVideo"}
# Combos listing files of a ComfyUI folder: their choices depend on the machine, not the pack.
FILE_PICKERS = {"video", "checkpoint", "identity_file"}


def test_there_are_example_workflows():
    assert len(API_WORKFLOWS) >= 2


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.name)
def test_api_workflow_names_real_nodes_inputs_and_types(path):
    prompt = json.loads(path.read_text())
    for key, node in prompt.items():
        class_type = node["class_type"]
        if class_type in CORE:
            continue
        cls = sparse_avatar.NODE_CLASS_MAPPINGS[class_type]
        declared = cls.INPUT_TYPES()
        known = {**declared.get("required", {}), **declared.get("optional", {})}
        assert set(declared.get("required", {})) <= set(node["inputs"]), (key, class_type)
        for name, value in node["inputs"].items():
            assert name in known, (key, class_type, name)
            spec = known[name]
            if isinstance(value, list):
                source = prompt[value[0]]
                if source["class_type"] in CORE:
                    continue
                source_cls = sparse_avatar.NODE_CLASS_MAPPINGS[source["class_type"]]
                assert source_cls.RETURN_TYPES[value[1]] == spec[0], (key, name)
            elif isinstance(spec[0], (list, tuple)) and name not in FILE_PICKERS:
                assert value in spec[0], (key, name, value)


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.name)
def test_workflows_load_the_model_a_fresh_install_has(path, tmp_path, monkeypatch):
    """A new user opens a template and queues it: the checkpoint it names must be in Load Avatar
    Model's list with an empty models/avatar (the shipped model), not a file they do not have."""
    from sparse_avatar.nodes.avatar_model import LoadAvatarModel

    monkeypatch.chdir(tmp_path)  # outside ComfyUI the nodes read ./models/avatar: empty here
    choices = LoadAvatarModel.INPUT_TYPES()["required"]["checkpoint"][0]
    for node in json.loads(path.read_text()).values():
        if node["class_type"] == "SparseAvatarLoadModel":
            assert node["inputs"]["checkpoint"] in choices, (node["inputs"]["checkpoint"], choices)
            assert LoadAvatarModel.VALIDATE_INPUTS(node["inputs"]["checkpoint"]) is True


def test_ui_workflows_are_built_from_the_api_workflows():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_template_folder_holds_ui_workflows_each_with_its_thumbnail():
    # ComfyUI lists every example_workflows/*.json as a template; its front end loads <name>.jpg as the card.
    workflows = sorted(FOLDER.glob("*.json"))
    assert [path.stem for path in workflows] == [path.name[: -len(".api.json")] for path in API_WORKFLOWS]
    for path in workflows:
        ui = json.loads(path.read_text())
        assert {"nodes", "links", "version"} <= set(ui), path.name
        assert (FOLDER / f"{path.stem}.jpg").read_bytes()[:3] == b"\xff\xd8\xff", path.name
    assert sorted(p.name for p in FOLDER.iterdir()) == sorted([p.name for p in workflows] + [f"{p.stem}.jpg" for p in workflows])
