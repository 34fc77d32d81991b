"""Batch rendering on a running ComfyUI: one API-format workflow, one CSV row per job.

    python -m sparse_avatar batch --workflow workflows_api/avatar_dub.api.json --jobs jobs.csv \
        --server http://127.0.0.1:8188 [--out jobs_output]

ComfyUI's own executor runs every graph; this module only talks to its HTTP API: ``GET
/object_info`` (what the server has), ``POST /upload/image`` (local input files), ``POST /prompt``
(queue a job, with our ``client_id``), the websocket ``/ws?clientId=`` (progress), ``GET
/history/<prompt_id>`` (the result, authoritative), ``GET /view`` (download outputs) and ``POST
/interrupt`` + ``POST /queue`` (Ctrl-C). It never imports ComfyUI.

The jobs CSV: one row per job, one column per node input to set.

    job,LoadAudio.audio,6.seed,Sparse Reference Sampler.steps
    alice_hello,@clips/hello.wav,1,20
    alice_bye,@clips/bye.wav,2,

- ``job`` (optional): the job's name (letters, digits, ``._-``), its output folder and its key in
  the manifest; default ``job-0001``, ``job-0002``, ... by row.
- ``NODE.input``: NODE is a node id of the workflow (``6``), a node title (``_meta.title``, what
  the canvas shows), or a node type (``LoadAudio``) when only one node has it; ``input`` is one of
  that node's widget inputs (the part after the last dot). Values are converted to the input's
  type (INT, FLOAT, BOOLEAN: true/false, STRING, a combo's choice). An empty cell keeps the
  workflow's value. ``@path`` uploads a local file (path relative to the CSV) into ComfyUI's input
  folder and sets the input to its name.

Everything is checked before anything is queued (the workflow, every column and cell, the local
files, the server and the node types it has); a problem is a ``UserFacingError``.

Outputs (the files ComfyUI saved, type ``output``) are downloaded into ``OUT/<job>/``, next to the
exact prompt that was queued (``OUT/<job>/prompt.api.json``). ``OUT/manifest.json`` (rewritten
atomically after every change) records each job's status, prompt id, attempts, files and a
fingerprint of its settings; a rerun skips the jobs that are done with the same settings, collects
a job that finished on the server while the tool was not watching, and runs the rest. A job that
fails in execution is queued once more (``retries``); a job the server refuses at validation is
not (the same prompt would be refused again).
"""
from __future__ import annotations

import base64
import copy
import csv
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserFacingError
from .files import atomic_output, write_text

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
# Seconds between /history checks while the websocket is quiet (or absent), and how long a
# finished prompt may take to appear in /history (ComfyUI sends execution_success just before it
# files the history entry).
POLL_SECONDS = 1.0
HISTORY_SETTLE_SECONDS = 60.0


# ------------------------------------------------------------------------------------------ jobs


@dataclass
class Setting:
    """One CSV column: which node input it sets and how its cells are read."""

    column: str
    node_id: str
    input_name: str
    kind: str  # INT, FLOAT, BOOLEAN, STRING, COMBO; NUMBER (int or float) when only the workflow's value is known
    choices: tuple | None = None


@dataclass
class Job:
    name: str
    row: int  # 1-based CSV line of the row (the header is line 1)
    values: dict[str, object]  # column -> converted value (str for @uploads: the local path)
    uploads: dict[str, Path] = field(default_factory=dict)  # column -> local file to upload
    fingerprint: str = ""


def load_workflow(path) -> dict:
    """The API-format workflow (``{node_id: {"class_type", "inputs"}}``) from ``path``."""
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"workflow {str(path)!r} not found; pass an API-format workflow (.api.json, "
                              "ComfyUI: Workflow > Export (API)).")
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserFacingError(f"workflow {str(path)!r} is not valid JSON ({error}).") from None
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise UserFacingError(f"workflow {str(path)!r} is in ComfyUI's UI format; batch needs the API format "
                              "(Workflow > Export (API)), e.g. the copies in workflows_api/.")
    if isinstance(workflow, dict) and isinstance(workflow.get("prompt"), dict):
        workflow = workflow["prompt"]  # a saved /prompt request body
    if (not isinstance(workflow, dict) or not workflow
            or not all(isinstance(node, dict) and "class_type" in node and isinstance(node.get("inputs"), dict)
                       for node in workflow.values())):
        raise UserFacingError(f"workflow {str(path)!r} is not an API-format workflow: expected "
                              "{node_id: {\"class_type\": ..., \"inputs\": {...}}}.")
    return workflow


def _node_title(node: dict) -> str | None:
    meta = node.get("_meta")
    return meta.get("title") if isinstance(meta, dict) else None


def resolve_node(workflow: dict, reference: str, column: str) -> str:
    """Node id for a column's NODE part: a node id, else a unique title, else a unique node type."""
    if reference in workflow:
        return reference
    for label, matches in (
        ("title", [key for key, node in workflow.items() if _node_title(node) == reference]),
        ("type", [key for key, node in workflow.items() if node["class_type"] == reference]),
    ):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UserFacingError(f"jobs column {column!r}: {len(matches)} nodes have the {label} {reference!r} "
                                  f"(ids {', '.join(sorted(matches))}); name one by its id, e.g. "
                                  f"'{min(matches)}.{column.rsplit('.', 1)[1]}'.")
    described = ", ".join(f"{key} ({_node_title(node) or node['class_type']})" for key, node in workflow.items())
    raise UserFacingError(f"jobs column {column!r}: the workflow has no node {reference!r} (by id, title or type). "
                          f"Its nodes: {described}.")


def _declared_inputs(object_info: dict | None, class_type: str) -> dict:
    if not object_info or class_type not in object_info:
        return {}
    declared = object_info[class_type].get("input", {})
    return {**declared.get("required", {}), **declared.get("optional", {})}


def _kind_of(spec, current) -> tuple[str, tuple | None]:
    """(kind, combo choices) from an /object_info input spec, else from the workflow's value."""
    if spec:
        head = spec[0]
        if isinstance(head, (list, tuple)):
            return "COMBO", tuple(head)
        if head == "COMBO":  # the v3 schema's spelling
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return "COMBO", tuple(options.get("options", ())) or None
        if head in ("INT", "FLOAT", "BOOLEAN", "STRING"):
            return head, None
        return str(head), None
    if isinstance(current, bool):
        return "BOOLEAN", None
    if isinstance(current, int):
        return "NUMBER", None  # without the server's word, 8 may be an INT or a FLOAT that happens to be whole
    if isinstance(current, float):
        return "FLOAT", None
    return "STRING", None


def parse_columns(workflow: dict, header: list[str], object_info: dict | None = None) -> list[Setting]:
    settings = []
    for column in header:
        if column == "job":
            continue
        if "." not in column:
            raise UserFacingError(f"jobs column {column!r}: name a node input as NODE.input (NODE = node id, title "
                                  "or type, e.g. '6.seed' or 'LoadAudio.audio'), or call the column 'job'.")
        reference, input_name = column.rsplit(".", 1)
        node_id = resolve_node(workflow, reference, column)
        node = workflow[node_id]
        declared = _declared_inputs(object_info, node["class_type"])
        if input_name not in node["inputs"]:
            raise UserFacingError(f"jobs column {column!r}: node {node_id} ({node['class_type']}) has no input "
                                  f"{input_name!r} in this workflow; its inputs: {', '.join(sorted(node['inputs']))}.")
        current = node["inputs"].get(input_name)
        if isinstance(current, list):
            raise UserFacingError(f"jobs column {column!r}: input {input_name!r} of node {node_id} is connected to "
                                  f"node {current[0]}; batch sets widget values only (set that node's input instead).")
        kind, choices = _kind_of(declared.get(input_name), current)
        if kind not in ("INT", "FLOAT", "NUMBER", "BOOLEAN", "STRING", "COMBO"):
            raise UserFacingError(f"jobs column {column!r}: input {input_name!r} of node {node_id} takes a {kind} "
                                  "from another node, not a value.")
        settings.append(Setting(column, node_id, input_name, kind, choices))
    return settings


def _convert(setting: Setting, text: str, where: str):
    try:
        if setting.kind == "INT":
            return int(text)
        if setting.kind == "FLOAT":
            return float(text)
        if setting.kind == "NUMBER":
            try:
                return int(text)
            except ValueError:
                return float(text)
    except ValueError:
        raise UserFacingError(f"{where}: {text!r} is not a number ({setting.kind} input "
                              f"{setting.input_name!r}).") from None
    if setting.kind == "BOOLEAN":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise UserFacingError(f"{where}: {text!r} is not true/false.")
    if setting.kind == "COMBO" and setting.choices is not None and text not in setting.choices:
        shown = ", ".join(map(str, setting.choices[:12])) + (", ..." if len(setting.choices) > 12 else "")
        raise UserFacingError(f"{where}: {text!r} is not a choice of {setting.input_name!r} on this server "
                              f"({shown}); to send a local file, write @path.")
    return text


def load_jobs(path, workflow: dict, object_info: dict | None = None) -> tuple[list[Setting], list[Job]]:
    """Columns and jobs of the jobs CSV, every cell converted and every local file found."""
    path = Path(path)
    if not path.is_file():
        raise UserFacingError(f"jobs file {str(path)!r} not found.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserFacingError(f"jobs file {str(path)!r} is not a readable CSV ({error}).") from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if len(rows) < 2:
        raise UserFacingError(f"jobs file {str(path)!r} needs a header row and at least one job row.")
    header = [cell.strip() for cell in rows[0]]
    duplicates = sorted({column for column in header if header.count(column) > 1})
    if duplicates or "" in header:
        raise UserFacingError(f"jobs file {str(path)!r}: every header cell needs a unique name "
                              f"(repeated: {', '.join(duplicates) or 'an empty one'}).")
    settings = parse_columns(workflow, header, object_info)
    by_column = {setting.column: setting for setting in settings}
    jobs, names = [], set()
    for index, row in enumerate(rows[1:], start=1):
        where = f"{path.name} row {index + 1}"
        if len(row) > len(header):
            raise UserFacingError(f"{where}: {len(row)} cells for {len(header)} columns.")
        cells = dict(zip(header, (cell.strip() for cell in row)))
        name = cells.get("job") or f"job-{index:04d}"
        if not _JOB_NAME.match(name):
            raise UserFacingError(f"{where}: job name {name!r}: use letters, digits, '.', '_' and '-' only.")
        if name in names:
            raise UserFacingError(f"{where}: job name {name!r} is used twice.")
        names.add(name)
        job = Job(name=name, row=index + 1, values={})
        for column, setting in by_column.items():
            text = cells.get(column, "")
            if not text:
                continue
            cell = f"{where}, column {column!r}"
            if text.startswith("@"):
                local = Path(text[1:]).expanduser()
                local = local if local.is_absolute() else path.parent / local
                if not local.is_file():
                    raise UserFacingError(f"{cell}: local file {str(local)!r} not found.")
                if setting.kind not in ("STRING", "COMBO"):
                    raise UserFacingError(f"{cell}: @file goes into a file input, not the {setting.kind} input "
                                          f"{setting.input_name!r}.")
                job.uploads[column] = local
                job.values[column] = str(local)
            else:
                job.values[column] = _convert(setting, text, cell)
        jobs.append(job)
    return settings, jobs


def fingerprint(workflow: dict, job: Job) -> str:
    """Same settings -> same fingerprint: the workflow, the job's values, and each upload's size and time."""
    uploads = {column: [str(local), local.stat().st_size, local.stat().st_mtime_ns] for column, local in job.uploads.items()}
    text = json.dumps({"workflow": workflow, "values": job.values, "uploads": uploads}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_prompt(workflow: dict, settings: list[Setting], values: dict[str, object]) -> dict:
    prompt = copy.deepcopy(workflow)
    for setting in settings:
        if setting.column in values:
            prompt[setting.node_id]["inputs"][setting.input_name] = values[setting.column]
    return prompt


# ------------------------------------------------------------------------------------------ HTTP


class ComfyClient:
    """The few ComfyUI HTTP routes batch uses (standard library only)."""

    def __init__(self, server: str, timeout: float = 30.0):
        server = server.strip().rstrip("/")
        if "://" not in server:
            server = "http://" + server
        parsed = urllib.parse.urlsplit(server)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UserFacingError(f"--server {server!r}: give ComfyUI's address, e.g. http://127.0.0.1:8188.")
        self.base = server
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _request(self, method: str, route: str, body: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(self.base + route, data=body, method=method, headers=headers or {})
        return urllib.request.urlopen(request, timeout=self.timeout)

    def get_json(self, route: str):
        with self._request("GET", route) as response:
            return json.loads(response.read())

    def post_json(self, route: str, payload: dict):
        body = json.dumps(payload).encode()
        with self._request("POST", route, body, {"Content-Type": "application/json"}) as response:
            data = response.read()
        return json.loads(data) if data.strip() else None

    def object_info(self) -> dict:
        try:
            return self.get_json("/object_info")
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            raise UserFacingError(f"no ComfyUI answers at {self.base} ({reason}); start it (python main.py "
                                  "--listen 127.0.0.1 --port 8188) or pass its address with --server.") from None

    def queue_prompt(self, prompt: dict) -> str:
        """Queue ``prompt``; its prompt id. A refusal (HTTP 400: validation) raises ``PromptRefused``."""
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as error:
            try:
                detail = json.loads(error.read() or b"{}")
            except ValueError:
                detail = {}
            raise PromptRefused(describe_refusal(detail) or f"HTTP {error.code}") from None
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def in_queue(self, prompt_id: str) -> bool:
        queue = self.get_json("/queue")
        return any(item[1] == prompt_id for key in ("queue_running", "queue_pending") for item in queue.get(key, []))

    def upload(self, local: Path) -> str:
        """Put a local file into ComfyUI's input folder; the name to give the node."""
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (("type", "input"), ("overwrite", "false")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        filename = local.name.replace('"', "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + local.read_bytes() + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        try:
            with self._request("POST", "/upload/image", b"".join(parts), headers) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise UserFacingError(f"ComfyUI refused the upload of {str(local)!r} (HTTP {error.code}).") from None
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    def download(self, item: dict, destination: Path) -> None:
        query = urllib.parse.urlencode({key: item.get(key, "") for key in ("filename", "subfolder", "type")})
        with self._request("GET", f"/view?{query}") as response, atomic_output(destination) as temporary, \
                open(temporary, "wb") as handle:
            while chunk := response.read(1 << 20):
                handle.write(chunk)

    def cancel(self, prompt_id: str) -> None:
        """Take our prompt off the server: out of the queue if pending, interrupted if running."""
        for route, payload in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            try:
                self.post_json(route, payload)
            except (urllib.error.URLError, OSError, ValueError):
                pass

    def websocket(self) -> WebSocket:
        parsed = urllib.parse.urlsplit(self.base)
        path = (parsed.path or "") + "/ws?clientId=" + urllib.parse.quote(self.client_id)
        return WebSocket.connect(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), path,
                                 secure=parsed.scheme == "https", timeout=self.timeout)


class PromptRefused(Exception):
    """ComfyUI's /prompt refused the prompt (validation); the message says why."""


def describe_refusal(detail: dict) -> str:
    error = detail.get("error") or {}
    lines = [error.get("message", "") if isinstance(error, dict) else str(error)]
    for node_id, node_error in (detail.get("node_errors") or {}).items():
        for item in node_error.get("errors", []):
            lines.append(f"node {node_id} ({node_error.get('class_type', '?')}): {item.get('message', '')}"
                         + (f" ({item['details']})" if item.get("details") else ""))
    return "; ".join(line for line in lines if line)


# ------------------------------------------------------------------------------------- websocket


class WebSocket:
    """A minimal RFC 6455 client: text and binary messages, ping/pong, close. Enough for ComfyUI's
    /ws, which sends JSON text messages (and binary preview images, which batch ignores)."""

    def __init__(self, sock: socket.socket, buffered: bytes = b""):
        self.sock = sock
        self.buffer = buffered
        self.closed = False

    @classmethod
    def connect(cls, host: str, port: int, path: str, secure: bool = False, timeout: float = 30.0) -> WebSocket:
        sock = socket.create_connection((host, port), timeout=timeout)
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        sock.sendall(request.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection during the websocket handshake")
            answer += chunk
        head, rest = answer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ConnectionError(f"websocket handshake refused: {lines[0]}")
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        expected = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise ConnectionError("websocket handshake: wrong Sec-WebSocket-Accept")
        return cls(sock, rest)

    def _read_exactly(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self.sock.recv(max(65536, count - len(self.buffer)))
            if not chunk:
                self.closed = True
                raise ConnectionError("websocket closed by the server")
            self.buffer += chunk
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _send_frame(self, opcode: int, payload: bytes = b"") -> None:
        head = bytes([0x80 | opcode])
        length = len(payload)
        if length < 126:
            head += bytes([0x80 | length])
        elif length < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", length)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", length)
        mask = os.urandom(4)  # clients mask every frame (RFC 6455 5.3)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send_text(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv(self, timeout: float | None = None):
        """The next message (str for text, bytes for binary), or None if none came within ``timeout``
        seconds. Raises ConnectionError when the connection is closed."""
        if self.closed:
            raise ConnectionError("websocket closed")
        self.sock.settimeout(timeout)
        message, message_opcode = b"", None
        while True:
            try:
                first, second = self._read_exactly(2)
            except TimeoutError:
                if message_opcode is None:
                    return None
                self.sock.settimeout(None)  # inside a fragmented message: wait for the rest
                continue
            self.sock.settimeout(30.0)  # the rest of a started frame comes promptly
            fin, opcode = first & 0x80, first & 0x0F
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", self._read_exactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", self._read_exactly(8))[0]
            mask = self._read_exactly(4) if second & 0x80 else None
            payload = self._read_exactly(length)
            if mask:
                payload = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
            if opcode == 0x8:  # close: answer it, then report the end
                try:
                    self._send_frame(0x8, payload[:2])
                except OSError:
                    pass
                self.closed = True
                raise ConnectionError("websocket closed by the server")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                message, message_opcode = payload, opcode
            elif opcode == 0x0 and message_opcode is not None:
                message += payload
            else:
                raise ConnectionError(f"websocket: unexpected frame opcode {opcode}")
            if fin:
                self.sock.settimeout(timeout)
                return message.decode("utf-8") if message_opcode == 0x1 else message

    def close(self) -> None:
        if not self.closed:
            try:
                self._send_frame(0x8, struct.pack("!H", 1000))
            except OSError:
                pass
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


# -------------------------------------------------------------------------------------- manifest


def load_manifest(out: Path) -> dict:
    path = out / MANIFEST_NAME
    if not path.exists():
        return {"version": MANIFEST_VERSION, "jobs": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserFacingError(f"{path} is not readable ({error}); move it away to start the batch afresh.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("jobs"), dict):
        raise UserFacingError(f"{path} is not a batch manifest; move it away to start the batch afresh.")
    return manifest


def save_manifest(out: Path, manifest: dict) -> None:
    write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def is_done(entry: dict | None, job_fingerprint: str, out: Path) -> bool:
    return bool(entry and entry.get("status") == "done" and entry.get("fingerprint") == job_fingerprint
                and all((out / name).is_file() for name in entry.get("outputs", [])))


# ----------------------------------------------------------------------------------------- batch


class _Bars:
    """The progress bars: jobs done of the batch, and the running node's steps."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.jobs = self.node = None
        if enabled:
            from tqdm import tqdm

            self._tqdm = tqdm
            self.jobs = tqdm(total=total, desc="jobs", unit="job", position=0, dynamic_ncols=True)

    def write(self, text: str) -> None:
        if self.enabled:
            self._tqdm.write(text)
        else:
            print(text, flush=True)

    def job_started(self, name: str) -> None:
        if self.enabled:
            self.close_node()
            self.node = self._tqdm(total=1, desc=name, unit="step", position=1, leave=False, dynamic_ncols=True)

    def step(self, label: str, value: float, maximum: float) -> None:
        if self.node is not None:
            self.node.set_description_str(label, refresh=False)
            self.node.total = max(maximum, 1)
            self.node.n = value
            self.node.refresh()

    def close_node(self) -> None:
        if self.node is not None:
            self.node.close()
            self.node = None

    def job_finished(self) -> None:
        self.close_node()
        if self.jobs is not None:
            self.jobs.update(1)

    def close(self) -> None:
        self.close_node()
        if self.jobs is not None:
            self.jobs.close()


@dataclass
class BatchResult:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    out: Path | None = None


class _Batch:
    def __init__(self, client: ComfyClient, workflow: dict, settings: list[Setting], out: Path, manifest: dict,
                 retries: int, timeout: float | None, bars: _Bars):
        self.client, self.workflow, self.settings = client, workflow, settings
        self.out, self.manifest, self.retries, self.timeout, self.bars = out, manifest, retries, timeout, bars
        self.titles = {key: _node_title(node) or node["class_type"] for key, node in workflow.items()}
        self.ws: WebSocket | None = None
        self.ws_note_given = False
        self.uploaded: dict[Path, str] = {}

    # -- websocket -------------------------------------------------------------------------------

    def _ensure_websocket(self) -> None:
        if self.ws is not None and not self.ws.closed:
            return
        try:
            self.ws = self.client.websocket()
        except (OSError, ConnectionError) as error:
            self.ws = None
            if not self.ws_note_given:
                self.bars.write(f"note: no websocket at {self.client.base}/ws ({error}); following jobs by polling "
                                "/history (no step progress).")
                self.ws_note_given = True

    def _next_message(self, wait: float):
        if self.ws is None:
            time.sleep(wait)
            return None
        try:
            raw = self.ws.recv(timeout=wait)
        except (OSError, ConnectionError):
            self.ws = None  # reconnect on the next wait; /history still tells us how the job ends
            return None
        if raw is None or isinstance(raw, bytes):
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    # -- one job ---------------------------------------------------------------------------------

    def entry(self, job: Job) -> dict:
        return self.manifest["jobs"].setdefault(job.name, {})

    def save(self) -> None:
        save_manifest(self.out, self.manifest)

    def prompt_for(self, job: Job) -> dict:
        values = dict(job.values)
        for column, local in job.uploads.items():
            if local not in self.uploaded:
                self.uploaded[local] = self.client.upload(local)
            values[column] = self.uploaded[local]
        return build_prompt(self.workflow, self.settings, values)

    def wait(self, job: Job, prompt_id: str) -> dict:
        """Follow ``prompt_id`` to its end; its /history entry."""
        started = time.monotonic()
        last_poll = 0.0
        finished_at = None
        while True:
            now = time.monotonic()
            if self.timeout and now - started > self.timeout:
                self.client.cancel(prompt_id)
                return {"status": {"status_str": "error", "completed": False, "messages": [
                    ["execution_error", {"exception_message": f"no result within {self.timeout:.0f} s (--timeout); "
                                                              "the job was cancelled on the server"}]]}}
            if finished_at is None and (self.ws is None or now - last_poll >= 5 * POLL_SECONDS):
                # the websocket is for progress; /history says when a job has ended, even if a message was missed
                last_poll = now
                entry = self.client.history(prompt_id)
                if entry is not None:
                    return entry
                if self.ws is None:
                    self._ensure_websocket()
            if finished_at is not None:
                entry = self.client.history(prompt_id)
                if entry is not None:
                    return entry
                if now - finished_at > HISTORY_SETTLE_SECONDS:
                    raise UserFacingError(f"job {job.name}: ComfyUI reported prompt {prompt_id} finished but has no "
                                          "history entry for it.")
                time.sleep(0.2)
                continue
            message = self._next_message(POLL_SECONDS)
            if not message:
                continue
            kind, data = message.get("type"), message.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "execution_start":
                self.bars.step(f"{job.name}: started", 0, 1)
            elif kind == "executing" and data.get("node") is not None:
                node = str(data.get("display_node") or data["node"])
                self.bars.step(f"{job.name}: {self.titles.get(node, node)}", 0, 1)
            elif kind == "progress":
                node = str(data.get("node"))
                self.bars.step(f"{job.name}: {self.titles.get(node, node)}", data.get("value", 0), data.get("max", 1))
            elif kind in ("execution_success", "execution_error", "execution_interrupted") or (
                    kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id):
                finished_at = time.monotonic()

    def collect(self, job: Job, history: dict) -> list[str]:
        """Download the files the job saved into OUT/<job>/; their paths relative to OUT."""
        saved, previews = [], 0
        for node_id, output in (history.get("outputs") or {}).items():
            for value in output.values():
                if not isinstance(value, list):
                    continue
                for item in value:
                    if not (isinstance(item, dict) and item.get("filename")):
                        continue
                    if item.get("type", "output") != "output":
                        previews += 1
                        continue
                    saved.append((node_id, item))
        names: list[str] = []
        for node_id, item in saved:
            name = Path(item["filename"]).name
            if f"{job.name}/{name}" in names:
                name = f"{node_id}_{name}"
            self.client.download(item, self.out / job.name / name)
            names.append(f"{job.name}/{name}")
        if not names:
            self.bars.write(f"warning: job {job.name} saved no files" + (f" ({previews} previews only: add a Save "
                            "node to the workflow)" if previews else "") + ".")
        return names

    def run_job(self, job: Job) -> bool:
        entry = self.entry(job)
        same = entry.get("fingerprint") == job.fingerprint
        resumed_id = entry.get("prompt_id") if same and entry.get("status") in ("queued", "stopped") else None
        if entry.get("status") == "done" and not same:
            self.bars.write(f"job {job.name}: its settings changed since it was rendered; rendering it again.")
        attempts = entry.get("attempts", 0) if resumed_id else 0
        entry.clear()
        entry.update({"status": "pending", "fingerprint": job.fingerprint, "row": job.row, "attempts": attempts,
                      "settings": {key: str(value) for key, value in job.values.items()}})
        self.bars.job_started(job.name)
        started = time.time()
        attempts_left = 1 + self.retries
        while attempts_left:
            resumed = resumed_id is not None
            if resumed:
                # queued by an earlier run: collect it if it finished there, follow it if it still runs
                prompt_id, resumed_id = resumed_id, None
                if self.client.history(prompt_id) is None and not self.client.in_queue(prompt_id):
                    continue  # gone (the server restarted): queue it anew
            else:
                prompt = self.prompt_for(job)
                self._ensure_websocket()
                try:
                    prompt_id = self.client.queue_prompt(prompt)
                except PromptRefused as refusal:
                    entry.update(status="failed", error=f"refused by ComfyUI: {refusal}")
                    self.save()
                    self.bars.write(f"job {job.name}: FAILED, refused by ComfyUI: {refusal}")
                    return False
                write_text(self.out / job.name / "prompt.api.json", json.dumps(prompt, indent=1) + "\n")
                attempts_left -= 1
                entry["attempts"] += 1
            entry.update(status="queued", prompt_id=prompt_id)
            self.save()
            try:
                history = self.wait(job, prompt_id)
            except KeyboardInterrupt:
                self.client.cancel(prompt_id)
                entry.update(status="stopped")
                self.save()
                raise
            failure = _failure(history)
            if failure is None:
                entry.update(status="done", outputs=self.collect(job, history), error=None,
                             seconds=round(time.time() - started, 1))
                self.save()
                self.bars.write(f"job {job.name}: done in {entry['seconds']:.1f} s, {len(entry['outputs'])} file(s) "
                                f"in {self.out / job.name}")
                return True
            interrupted = failure.startswith("interrupted")
            if interrupted and resumed:  # cancelled by our own Ctrl-C last time: no failure of the job
                entry["attempts"] = max(0, entry["attempts"] - 1)
                continue
            entry.update(status="failed", error=failure)
            self.save()
            if interrupted:  # someone pressed Cancel in ComfyUI: not a job to force through
                self.bars.write(f"job {job.name}: FAILED, {failure}")
                return False
            again = " - queueing it once more" if attempts_left else ""
            self.bars.write(f"job {job.name}: attempt {entry['attempts']} failed: {failure}{again}")
        return False


def _failure(history: dict) -> str | None:
    """None if the history entry is a success, else what went wrong."""
    status = history.get("status") or {}
    if status.get("status_str") == "success" or (status.get("completed") and status.get("status_str") != "error"):
        return None
    for event, data in status.get("messages") or []:
        if event == "execution_error":
            node = f"node {data['node_id']} ({data.get('node_type', '?')}): " if data.get("node_id") else ""
            return f"{node}{data.get('exception_type', 'error')}: {data.get('exception_message', '').strip()}"
        if event == "execution_interrupted":
            return f"interrupted on the server at node {data.get('node_id')}"
    return f"ComfyUI status {status.get('status_str', 'unknown')}"


def default_out(jobs_path) -> Path:
    jobs_path = Path(jobs_path)
    return jobs_path.with_name(jobs_path.stem + "_output")


def run_batch(workflow_path, jobs_path, server: str = "http://127.0.0.1:8188", out=None, retries: int = 1,
              timeout: float | None = None, progress: bool = True) -> BatchResult:
    """Render every job of ``jobs_path`` with ``workflow_path`` on the ComfyUI at ``server``.

    Checks everything first (UserFacingError), then runs the jobs that are not done yet, one after
    another. Ctrl-C (KeyboardInterrupt) cancels the running job on the server, keeps the manifest
    and propagates; the next run continues."""
    workflow = load_workflow(workflow_path)
    load_jobs(jobs_path, workflow)  # the file and its columns, before asking the server anything
    client = ComfyClient(server)
    object_info = client.object_info()
    missing = sorted({node["class_type"] for node in workflow.values()} - set(object_info))
    if missing:
        raise UserFacingError(f"ComfyUI at {client.base} has no node type {', '.join(missing)}; install the pack "
                              "that provides it (for sparse-avatar's nodes: this pack in custom_nodes/) and restart.")
    settings, jobs = load_jobs(jobs_path, workflow, object_info)
    out = Path(out) if out is not None else default_out(jobs_path)
    out.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(out)
    manifest.update(version=MANIFEST_VERSION, workflow=str(Path(workflow_path).resolve()),
                    jobs_file=str(Path(jobs_path).resolve()), server=client.base)

    result = BatchResult(out=out)
    pending = []
    for job in jobs:
        job.fingerprint = fingerprint(workflow, job)
        if is_done(manifest["jobs"].get(job.name), job.fingerprint, out):
            result.skipped.append(job.name)
        else:
            pending.append(job)
    bars = _Bars(len(pending), enabled=progress)
    if result.skipped:
        bars.write(f"{len(result.skipped)} job(s) already done (see {out / MANIFEST_NAME}); {len(pending)} to run.")
    batch = _Batch(client, workflow, settings, out, manifest, retries, timeout, bars)
    try:
        for job in pending:
            (result.done if batch.run_job(job) else result.failed).append(job.name)
            bars.job_finished()
    except KeyboardInterrupt:
        bars.write(f"stopped: {len(result.done) + len(result.skipped)} of {len(jobs)} job(s) done; run the same "
                   "command again to continue.")
        raise
    except (urllib.error.URLError, OSError) as error:  # the server went away mid-batch, or the disk is full
        reason = getattr(error, "reason", error)
        raise UserFacingError(f"batch stopped after {len(result.done) + len(result.skipped)} of {len(jobs)} job(s): "
                              f"{reason} (server {client.base}, outputs in {out}); run the same command again to "
                              "continue.") from None
    finally:
        bars.close()
        if batch.ws is not None:
            batch.ws.close()
        save_manifest(out, manifest)
    return result


# --------------------------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "batch", help="render many jobs with one API-format workflow on a running ComfyUI (a CSV row per job)",
        description="Queue one job per CSV row on a running ComfyUI, follow it, download its outputs. Columns: "
                    "'job' (optional name) and NODE.input (NODE = node id, title or type; a value '@file' uploads "
                    "a local file). Rerunning skips finished jobs (OUT/manifest.json).")
    parser.add_argument("--workflow", required=True, help="API-format workflow (.api.json; e.g. workflows_api/)")
    parser.add_argument("--jobs", required=True, help="CSV, one row per job")
    parser.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default http://127.0.0.1:8188)")
    parser.add_argument("--out", default=None, help="output folder (default: beside the CSV, jobs.csv -> jobs_output/)")
    parser.add_argument("--retries", type=int, default=1, help="times a job that fails in execution is queued again (default 1)")
    parser.add_argument("--timeout", type=float, default=0.0, help="seconds one job may take before it is cancelled (default 0: no limit)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars, one line per job")
    parser.set_defaults(handler=_run_cli)


def _run_cli(args) -> int:
    if args.retries < 0:
        raise UserFacingError("--retries must be 0 or more.")
    result = run_batch(args.workflow, args.jobs, server=args.server, out=args.out, retries=args.retries,
                       timeout=args.timeout or None, progress=not args.no_progress)
    print(f"{len(result.done)} done, {len(result.skipped)} already done, {len(result.failed)} failed"
          + (f" ({', '.join(result.failed)})" if result.failed else "") + f"; outputs and manifest in {result.out}")
    return 1 if result.failed else 0
