"""Run the pack inside a real ComfyUI and execute API-format workflows over its HTTP API.

    python scripts/comfyui_smoke.py --comfyui /path/to/ComfyUI --python /path/to/comfy/venv/bin/python \
        [--workflow workflows_api/xyz.api.json ...] [--input FILE ...]

Links this checkout into ComfyUI/custom_nodes/sparse_avatar (unless already there), starts
`main.py --cpu --listen 127.0.0.1` on a free loopback port, checks that every node of the pack is
in /object_info, queues each workflow, waits for it (bounded), prints what each output node
produced, and stops the server. Files given with --input are copied into ComfyUI's input folder
first (workflows refer to them by name). Standard library only, loopback only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
from pathlib import Path

from comfyui_server import REPO, ComfyServer, copy_inputs, http_json, link_pack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, type=Path)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--workflow", action="append", default=[], type=Path)
    parser.add_argument("--input", action="append", default=[], type=Path, help="file copied into ComfyUI/input")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per workflow")
    args = parser.parse_args()

    link_pack(args.comfyui)
    copy_inputs(args.comfyui, args.input)

    server = ComfyServer(args.comfyui, args.python)
    base, log_path = server.base, server.log_path
    failures = 0
    try:
        try:
            object_info = server.start()
        except RuntimeError as error:
            print(error)
            return 1
        sys.path.insert(0, str(REPO.parent))
        ours = sorted(name for name, info in object_info.items() if str(info.get("category", "")).startswith("sparse-avatar"))
        print(f"ComfyUI up on {base}; {len(object_info)} node types; sparse-avatar nodes: {ours}")
        import_errors = server.pack_import_problems()
        if import_errors:
            print("import problems:", *import_errors, sep="\n  ")
            failures += 1

        for workflow_path in args.workflow:
            prompt = json.loads(workflow_path.read_text())
            try:
                queued = http_json(f"{base}/prompt", {"prompt": prompt, "client_id": "sparse-avatar-smoke"})
            except urllib.error.HTTPError as error:
                print(f"{workflow_path.name}: refused: {error.read().decode()[:2000]}")
                failures += 1
                continue
            prompt_id = queued["prompt_id"]
            started = time.time()
            while time.time() - started < args.timeout:
                history = http_json(f"{base}/history/{prompt_id}")
                if prompt_id in history:
                    entry = history[prompt_id]
                    status = entry.get("status", {})
                    print(f"{workflow_path.name}: status={status.get('status_str')} in {time.time() - started:.1f}s")
                    for message in status.get("messages", []):
                        if message[0] == "execution_error":
                            print("  error:", message[1].get("exception_message"))
                            failures += 1
                    for node_id, output in entry.get("outputs", {}).items():
                        print(f"  node {node_id} output: {json.dumps(output)[:400]}")
                    break
                time.sleep(1)
            else:
                print(f"{workflow_path.name}: no result within {args.timeout:.0f}s")
                failures += 1
    finally:
        server.stop()
    print(f"server log: {log_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
