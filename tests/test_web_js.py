"""The web extension (web/js/): its pure functions under `node --test`, and what ties it to the Python side.

The real-browser check against a running ComfyUI is scripts/browser_check.py (needs Chromium).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sparse_avatar import NODE_CLASS_MAPPINGS, WEB_DIRECTORY
from sparse_avatar.nodes import generation, training

REPO = Path(__file__).resolve().parent.parent
WEB = (REPO / WEB_DIRECTORY / "js").resolve()
SCRIPTS = sorted(WEB.glob("*.js"))


def test_node_runs_the_pure_function_tests():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the web extension's unit tests need it: apt-get install -y nodejs)")
    result = subprocess.run([node, "--test", str(REPO / "tests" / "test_web_util.mjs")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"^# fail 0$", result.stdout, re.M) and re.search(r"^# pass [1-9]", result.stdout, re.M)


def test_no_markup_from_strings():
    assert SCRIPTS, f"no scripts in {WEB}"
    for script in SCRIPTS:
        text = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text, f"{script.name} uses {sink}; build DOM nodes and set textContent"


def test_imports_resolve_where_comfyui_serves_the_files():
    # ComfyUI serves WEB_DIRECTORY at /extensions/<pack>/, so web/js/x.js is /extensions/<pack>/js/x.js
    # and its frontend modules (/scripts/app.js, /scripts/api.js) are three folders up.
    for script in SCRIPTS:
        for target in re.findall(r'^import .* from "([^"]+)";', script.read_text(), re.M):
            if "/scripts/" in target:
                assert target.startswith("../../../scripts/"), f"{script.name}: {target} does not reach /scripts/"
            else:
                assert (script.parent / target).resolve().is_file(), f"{script.name}: {target} is missing"


def test_the_extension_and_the_nodes_agree_on_names():
    main = (WEB / "sparse_avatar.js").read_text()
    util = (WEB / "sparse_avatar_util.js").read_text()
    for node_type in re.findall(r'"(SparseAvatar\w+)"', main):
        assert node_type in NODE_CLASS_MAPPINGS, node_type
    assert f'TRAIN_EVENT = "{training.TRAIN_EVENT}"' in util
    assert f'PAIR_ROUTE = "{training.PAIR_ROUTE}"' in util
    assert 'VIDEO_OUTPUT = "sparse_avatar_video"' in util and '"sparse_avatar_video"' in Path(generation.__file__).read_text()
    assert 'PAIR_OUTPUT = "sparse_avatar_pair"' in util and '"sparse_avatar_pair"' in Path(training.__file__).read_text()
    assert "start_seconds" in main and "start_seconds" in NODE_CLASS_MAPPINGS["SparseAvatarLoadReferenceVideo"].INPUT_TYPES()["required"]
