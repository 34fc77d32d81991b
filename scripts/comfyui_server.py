"""Start and stop a real ComfyUI with this pack linked into custom_nodes (for the scripts in this folder).

    from comfyui_server import ComfyServer, free_port, http_json, link_pack

    server = ComfyServer(comfyui, python)   # main.py --cpu --listen 127.0.0.1 on a free port
    server.start()                          # waits for GET /object_info (server.object_info)
    server.base                             # http://127.0.0.1:PORT
    server.rss_bytes()                      # the server process's resident memory (VmRSS)
    server.kill()                           # SIGKILL, as a crash would; start() again: same port and log
    server.stop()

Used by comfyui_smoke.py and reliability.py. Standard library only, loopback only.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = 30.0):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body.strip() else None


def link_pack(comfyui: Path) -> Path:
    """ComfyUI/custom_nodes/sparse_avatar -> this checkout (left alone when something is already there)."""
    link = Path(comfyui) / "custom_nodes" / "sparse_avatar"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(REPO, target_is_directory=True)
    return link


def copy_inputs(comfyui: Path, paths) -> None:
    for path in paths:
        shutil.copy(path, Path(comfyui) / "input" / Path(path).name)


class ComfyServer:
    """``python main.py --cpu --listen 127.0.0.1 --port PORT`` in ``comfyui``, its output in a log file."""

    def __init__(self, comfyui: Path, python: str = sys.executable, port: int | None = None, log_path: Path | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.comfyui = Path(comfyui)
        self.python = python
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"comfyui_{self.port}.log"
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.object_info: dict = {}
        self.start_seconds = float("nan")
        self.log_path.write_text("")

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, wait_s: float = 180.0) -> dict:
        """Start the server and wait until /object_info answers; its node types. RuntimeError with the
        log's end when it exits or does not answer in time."""
        started = time.monotonic()
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(
                [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                 *self.extra_args],
                cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = started + wait_s
        while True:
            try:
                self.object_info = http_json(f"{self.base}/object_info", timeout=60)
                break
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = self.log_path.read_text()[-4000:]
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not start (log {self.log_path}):\n{tail}") from None
                time.sleep(1)
        self.start_seconds = time.monotonic() - started
        return self.object_info

    def pack_import_problems(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines()
                if "sparse_avatar" in line and ("IMPORT FAILED" in line or "Traceback" in line)]

    def rss_bytes(self) -> int:
        """VmRSS of the server process (from /proc/PID/status), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def kill(self) -> None:
        """SIGKILL the server (a crash, a power cut for the process) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None
