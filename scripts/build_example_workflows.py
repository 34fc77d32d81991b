"""Build example_workflows/ (UI format + a thumbnail each) from the API-format workflows in workflows_api/.

    python scripts/build_example_workflows.py          # (re)write example_workflows/<name>.json and <name>.jpg
    python scripts/build_example_workflows.py --check  # exit 1 if a UI file or thumbnail is missing or stale

The API format (what /prompt takes, what `python -m sparse_avatar batch` sends) is the source of
truth, in workflows_api/<name>.api.json; the UI format (what ComfyUI lists under Templates and
opens on the canvas) is derived from it: our nodes' widget order comes from their INPUT_TYPES, the
few core nodes used are described below. ComfyUI lists every *.json of example_workflows/ as a
template (app/custom_node_manager.py) and its front end shows <name>.jpg beside each as the
thumbnail, so that folder holds exactly the UI workflows and their thumbnails. A thumbnail this
script drew carries a comment with the hash of its workflow and is redrawn when the workflow
changes; a thumbnail put there by hand (a screenshot) has no such comment and is left alone.
A test runs --check so none of it drifts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
API_FOLDER = REPO / "workflows_api"
FOLDER = REPO / "example_workflows"
THUMBNAIL_SIZE = (640, 480)
THUMBNAIL_MARK = "sparse-avatar build_example_workflows "  # + the hash of the UI workflow it shows
# What each workflow is for, on its thumbnail.
PURPOSE = {
    "avatar_dub": ("Dub", "re-voice the reference video with new speech"),
    "avatar_generate": ("Generate + Mix Identity", "A's looks, B's way of talking, new speech"),
    "avatar_personalize": ("Personalize, then dub", "Train Avatar on the person, then re-voice the clip"),
}
CORE_TITLES = {"LoadAudio": "Load Audio", "SaveVideo": "Save Video"}
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


def node_title(class_type: str) -> str:
    if class_type in CORE_TITLES:
        return CORE_TITLES[class_type]
    sys.path.insert(0, str(REPO.parent))
    import importlib

    return importlib.import_module("sparse_avatar").NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type)


def draw_thumbnail(name: str, ui: dict, mark: str):
    """A card: the workflow's name and purpose over its graph (node boxes at their canvas places, links)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = THUMBNAIL_SIZE
    image = Image.new("RGB", THUMBNAIL_SIZE, (24, 26, 33))
    draw = ImageDraw.Draw(image)
    title, purpose = PURPOSE.get(name, (name.replace("_", " "), ""))
    draw.text((28, 22), "sparse-avatar", font=ImageFont.load_default(size=18), fill=(120, 200, 170))
    draw.text((28, 44), title, font=ImageFont.load_default(size=44), fill=(240, 240, 240))
    draw.text((30, 98), purpose, font=ImageFont.load_default(size=19), fill=(170, 175, 190))

    nodes = {node["id"]: node for node in ui["nodes"]}
    left = min(node["pos"][0] for node in nodes.values())
    top = min(node["pos"][1] for node in nodes.values())
    right = max(node["pos"][0] + node["size"][0] for node in nodes.values())
    bottom = max(node["pos"][1] + node["size"][1] for node in nodes.values())
    area = (24, 140, width - 24, height - 20)
    scale = min((area[2] - area[0]) / (right - left), (area[3] - area[1]) / (bottom - top))
    offset_x = area[0] + ((area[2] - area[0]) - scale * (right - left)) / 2
    offset_y = area[1] + ((area[3] - area[1]) - scale * (bottom - top)) / 2
    box_height = 60 * scale / 0.55

    def box(node):
        x0 = offset_x + scale * (node["pos"][0] - left)
        y0 = offset_y + scale * (node["pos"][1] - top)
        return x0, y0, x0 + scale * node["size"][0], y0 + min(box_height, scale * node["size"][1])

    for _, source, _, target, _, _ in ui["links"]:
        (_, sy0, sx1, sy1), (tx0, ty0, _, ty1) = box(nodes[source]), box(nodes[target])
        start, end = (sx1, (sy0 + sy1) / 2), (tx0, (ty0 + ty1) / 2)
        middle = (start[0] + end[0]) / 2
        draw.line([start, (middle, start[1]), (middle, end[1]), end], fill=(110, 130, 170), width=2)
    font = ImageFont.load_default(size=max(10, int(15 * scale / 0.55)))
    for node in nodes.values():
        x0, y0, x1, y1 = box(node)
        ours = node["type"].startswith("SparseAvatar")
        draw.rounded_rectangle((x0, y0, x1, y1), radius=6, fill=(52, 58, 74) if ours else (58, 52, 52),
                               outline=(120, 200, 170) if ours else (200, 160, 120), width=2)
        words, lines = node_title(node["type"]).split(), [""]
        for word in words:  # wrap onto two lines, then shorten what still does not fit
            trial = f"{lines[-1]} {word}".strip()
            if font.getlength(trial) > (x1 - x0) - 10 and lines[-1] and len(lines) < 2:
                lines.append(word)
            else:
                lines[-1] = trial
        for index, line in enumerate(lines):
            while font.getlength(line) > (x1 - x0) - 10 and len(line) > 4:
                line = line[:-2].rstrip() + "…"
            y = (y0 + y1) / 2 + (index - (len(lines) - 1) / 2) * font.size * 1.15
            draw.text(((x0 + x1) / 2, y), line, font=font, fill=(235, 235, 235), anchor="mm")
    return image


def thumbnail_mark(ui_text: str) -> str:
    return THUMBNAIL_MARK + hashlib.sha256(ui_text.encode()).hexdigest()[:16]


def thumbnail_state(path: Path, mark: str) -> str:
    """'ok' (ours and current, or a hand-made one), 'stale' (ours, older workflow) or 'missing'."""
    if not path.exists():
        return "missing"
    from PIL import Image

    with Image.open(path) as image:
        comment = image.info.get("comment", b"")
    comment = comment.decode(errors="replace") if isinstance(comment, bytes) else str(comment)
    return "stale" if comment.startswith(THUMBNAIL_MARK) and comment != mark else "ok"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    expected = set()
    for api_path in sorted(API_FOLDER.glob("*.api.json")):
        name = api_path.name[: -len(".api.json")]
        ui_path, thumbnail_path = FOLDER / f"{name}.json", FOLDER / f"{name}.jpg"
        expected |= {ui_path.name, thumbnail_path.name}
        ui = to_ui(json.loads(api_path.read_text()))
        text = json.dumps(ui, indent=1) + "\n"
        mark = thumbnail_mark(text)
        if args.check:
            if not ui_path.exists() or ui_path.read_text() != text:
                stale.append(ui_path.name)
            if thumbnail_state(thumbnail_path, mark) != "ok":
                stale.append(thumbnail_path.name)
            continue
        ui_path.write_text(text)
        print(f"wrote {ui_path.relative_to(REPO)}")
        if thumbnail_state(thumbnail_path, mark) != "ok":
            draw_thumbnail(name, ui, mark).save(thumbnail_path, quality=90, comment=mark.encode())
            print(f"wrote {thumbnail_path.relative_to(REPO)}")
    extra = sorted(path.name for path in FOLDER.iterdir() if path.name not in expected)
    if extra:
        print("example_workflows/ must hold only the UI workflows built from workflows_api/ and their thumbnails; "
              "not built here:", ", ".join(extra))
        return 1
    if stale:
        print("stale or missing (run scripts/build_example_workflows.py):", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
