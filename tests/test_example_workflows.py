"""Example workflows stay in step with the nodes: every node and widget they name exists, links
connect matching types, and the UI-format files are exactly what the API-format files build."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sparse_avatar

FOLDER = Path(sparse_avatar.__file__).parent / "example_workflows"
SCRIPT = Path(sparse_avatar.__file__).parent / "scripts" / "build_example_workflows.py"
API_WORKFLOWS = sorted(FOLDER.glob("*.api.json"))
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


def test_ui_workflows_are_built_from_the_api_workflows():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
