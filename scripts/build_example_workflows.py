"""Build the UI-format workflows in example_workflows/ from their API-format twins (*.api.json).

    python scripts/build_example_workflows.py          # (re)write example_workflows/<name>.json
    python scripts/build_example_workflows.py --check  # exit 1 if a UI file is missing or stale

The API format (what /prompt takes, what batch users script) is the source of truth; the UI format
(what ComfyUI lists under Templates and opens on the canvas) is derived from it: our nodes' widget
order comes from their INPUT_TYPES, the few core nodes used are described below. A test runs
--check so the two never drift apart.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDER = REPO / "example_workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}

# Core ComfyUI nodes used by the examples: (inputs as (name, type) in order, outputs as (name, type)).
CORE_NODES = {
    "LoadAudio": ([("audio", "COMBO")], [("AUDIO", "AUDIO")]),
    "SaveVideo": ([("video", "VIDEO"), ("filename_prefix", "STRING"), ("format", "COMBO"), ("codec", "COMBO")], []),
}


def node_spec(class_type: str):
    """(inputs [(name, type, options)], outputs [(name, type)]) of a node type."""
    if class_type in CORE_NODES:
        inputs, outputs = CORE_NODES[class_type]
        return [(name, kind, {}) for name, kind in inputs], outputs
    sys.path.insert(0, str(REPO.parent))
    import importlib

    package = importlib.import_module("sparse_avatar")
    cls = package.NODE_CLASS_MAPPINGS[class_type]
    declared = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            kind = "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]
            inputs.append((name, kind, spec[1] if len(spec) > 1 else {}))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return inputs, list(zip(names, cls.RETURN_TYPES))


def to_ui(api: dict) -> dict:
    ids = {key: index + 1 for index, key in enumerate(api)}
    specs = {key: node_spec(node["class_type"]) for key, node in api.items()}

    # Columns by dependency depth, so the graph reads left to right.
    depth: dict[str, int] = {}

    def depth_of(key: str) -> int:
        if key not in depth:
            sources = [value[0] for value in api[key]["inputs"].values() if isinstance(value, list)]
            depth[key] = 1 + max((depth_of(source) for source in sources), default=-1)
        return depth[key]

    rows: dict[int, int] = {}
    links, nodes = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for key, node in api.items():
        inputs_ui, widgets = [], []
        inputs, _ = specs[key]
        for name, kind, options in inputs:
            value = node["inputs"].get(name)
            is_widget = kind in WIDGET_TYPES or kind == "COMBO"
            if isinstance(value, list):  # a link
                source, slot = value[0], int(value[1])
                link_id = len(links) + 1
                source_type = specs[source][1][slot][1]
                links.append([link_id, ids[source], slot, ids[key], len(inputs_ui), source_type])
                outgoing.setdefault((source, slot), []).append(link_id)
                entry = {"name": name, "type": kind, "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": name}
                    widgets.append(options.get("default"))
                inputs_ui.append(entry)
            elif is_widget:
                widgets.append(value if name in node["inputs"] else options.get("default"))
                if options.get("control_after_generate"):
                    widgets.append("fixed")
            else:
                inputs_ui.append({"name": name, "type": kind, "link": None})
        column = depth_of(key)
        row = rows.get(column, 0)
        rows[column] = row + 1
        nodes.append({
            "id": ids[key], "type": node["class_type"], "pos": [60 + 360 * column, 60 + 330 * row], "size": [320, 260],
            "flags": {}, "order": 0, "mode": 0, "inputs": inputs_ui, "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })
    for key, node in zip(api, nodes):
        node["outputs"] = [
            {"name": name, "type": kind, "links": outgoing.get((key, slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(specs[key][1])
        ]
        node["order"] = depth_of(key)
    return {
        "last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
        "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    for api_path in sorted(FOLDER.glob("*.api.json")):
        ui_path = api_path.with_name(api_path.name.replace(".api.json", ".json"))
        text = json.dumps(to_ui(json.loads(api_path.read_text())), indent=1) + "\n"
        if args.check:
            if not ui_path.exists() or ui_path.read_text() != text:
                stale.append(ui_path.name)
        else:
            ui_path.write_text(text)
            print(f"wrote {ui_path.relative_to(REPO)}")
    if stale:
        print("stale UI workflows (run scripts/build_example_workflows.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
