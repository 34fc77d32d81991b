"""An in-process stand-in for ComfyUI's HTTP + websocket API, for the batch tool's tests.

It speaks the routes and message shapes of the real server (ComfyUI server.py, execution.py,
main.py): ``GET /object_info``, ``POST /prompt`` (``{"prompt_id", "number", "node_errors"}``, or
HTTP 400 ``{"error", "node_errors"}``), ``GET /history/<id>`` (``{id: {"prompt", "outputs",
"status": {"status_str", "completed", "messages"}, "meta"}}``), ``GET /queue``, ``GET /view``,
``POST /upload/image`` (multipart field ``image``; answers ``{"name", "subfolder", "type"}``),
``POST /interrupt``, ``POST /queue`` (``{"delete": [...]}``) and ``/ws?clientId=`` sending
``{"type", "data"}`` JSON text frames: ``status``, ``execution_start``, ``execution_cached``,
``executing``, ``progress`` ``{value, max, prompt_id, node}``, ``executed`` ``{node,
display_node, output, prompt_id}``, ``execution_success``, ``execution_error``,
``execution_interrupted``, then ``executing`` with ``node: None``; plus a ping and a binary
preview frame. "Executing" a prompt here is a few messages from a worker thread: no graph runs.
"""
from __future__ import annotations

import base64
import hashlib
import json
import queue
import re
import struct
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _frame(opcode: int, payload: bytes) -> bytes:
    head = bytes([0x80 | opcode])
    if len(payload) < 126:
        head += bytes([len(payload)])
    elif len(payload) < 1 << 16:
        head += bytes([126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([127]) + struct.pack("!Q", len(payload))
    return head + payload


def _read_client_frame(sock):
    """(opcode, payload) of one masked client frame, or None at EOF."""
    def exactly(count):
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    head = exactly(2)
    if head is None:
        return None
    length = head[1] & 0x7F
    if length == 126:
        length = struct.unpack("!H", exactly(2))[0]
    elif length == 127:
        length = struct.unpack("!Q", exactly(8))[0]
    assert head[1] & 0x80, "client frames must be masked"
    mask = exactly(4)
    payload = exactly(length) if length else b""
    return head[0] & 0x0F, bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


class ComfyStub:
    """``fail(prompt, attempt) -> str | None``: an exception message makes that run fail.
    ``hold``: a threading.Event the worker waits on after the first progress message (for Ctrl-C
    tests); ``interrupt`` releases it as an interruption."""

    def __init__(self, object_info: dict, output_node: str, progress_node: str, fail=None, hold=None):
        self.object_info = object_info
        self.output_node, self.progress_node = output_node, progress_node
        self.fail = fail or (lambda prompt, attempt: None)
        self.hold = hold
        self.prompts: list[tuple[str, dict, str]] = []  # (prompt_id, prompt, client_id) as queued
        self.history: dict[str, dict] = {}
        self.files: dict[tuple[str, str, str], bytes] = {}
        self.uploads: dict[str, bytes] = {}
        self.interrupts: list[dict] = []
        self.deletes: list[str] = []
        self.pongs = 0
        self.sockets: dict[str, tuple] = {}  # client id -> (socket, lock)
        self.running: str | None = None
        self.interrupted = threading.Event()
        self.ws_closed = threading.Event()  # set when a websocket client has closed (its frames all read)
        self._work: queue.Queue = queue.Queue()
        self._attempts: dict[str, int] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, payload, status=200):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path == "/object_info":
                    return self._json(stub.object_info)
                if url.path.startswith("/history/"):
                    prompt_id = url.path[len("/history/"):]
                    return self._json({prompt_id: stub.history[prompt_id]} if prompt_id in stub.history else {})
                if url.path == "/queue":
                    running = [[0, stub.running, {}, {}, []]] if stub.running else []
                    return self._json({"queue_running": running, "queue_pending": []})
                if url.path == "/view":
                    key = (query.get("filename", ""), query.get("subfolder", ""), query.get("type", ""))
                    if key not in stub.files:
                        return self._json({}, 404)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(stub.files[key])))
                    self.end_headers()
                    self.wfile.write(stub.files[key])
                    return
                if url.path == "/ws":
                    return self._websocket(query.get("clientId") or uuid.uuid4().hex)
                self._json({}, 404)

            def _websocket(self, sid):
                key = self.headers["Sec-WebSocket-Key"]
                accept = base64.b64encode(hashlib.sha1((key + _GUID).encode()).digest()).decode()
                self.send_response(101, "Switching Protocols")
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.flush()
                sock, lock = self.connection, threading.Lock()
                stub.sockets[sid] = (sock, lock)
                stub.send(sid, "status", {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid})
                with lock:
                    sock.sendall(_frame(0x9, b"stub-ping"))
                while True:
                    frame = _read_client_frame(sock)
                    if frame is None or frame[0] == 0x8:
                        break
                    if frame[0] == 0xA:
                        stub.pongs += 1
                stub.sockets.pop(sid, None)
                stub.ws_closed.set()
                self.close_connection = True

            def do_POST(self):
                url = urllib.parse.urlsplit(self.path)
                body = self._body()
                if url.path == "/prompt":
                    request = json.loads(body)
                    prompt = request["prompt"]
                    unknown = {key: node for key, node in prompt.items() if node["class_type"] not in stub.object_info}
                    if unknown:
                        return self._json({"error": {"type": "invalid_prompt", "message": "Cannot execute because "
                                           "node type is not installed", "details": "", "extra_info": {}},
                                           "node_errors": {}}, 400)
                    prompt_id = str(uuid.uuid4())
                    stub.prompts.append((prompt_id, prompt, request.get("client_id")))
                    stub._work.put((prompt_id, prompt, request.get("client_id")))
                    return self._json({"prompt_id": prompt_id, "number": len(stub.prompts), "node_errors": {}})
                if url.path == "/upload/image":
                    boundary = self.headers["Content-Type"].split("boundary=")[1].encode()
                    for part in body.split(b"--" + boundary):
                        head, _, content = part.partition(b"\r\n\r\n")
                        match = re.search(rb'name="image"; filename="([^"]+)"', head)
                        if match:
                            name = match.group(1).decode()
                            stub.uploads[name] = content[:-2]  # the part ends with CRLF
                            return self._json({"name": name, "subfolder": "", "type": "input"})
                    return self._json({}, 400)
                if url.path == "/interrupt":
                    data = json.loads(body or b"{}")
                    stub.interrupts.append(data)
                    if data.get("prompt_id") in (None, stub.running):
                        stub.interrupted.set()
                        if stub.hold is not None:
                            stub.hold.set()
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if url.path == "/queue":
                    stub.deletes.extend(json.loads(body).get("delete", []))
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._json({}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._threads = [threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True),
                         threading.Thread(target=self._worker, daemon=True)]
        for thread in self._threads:
            thread.start()

    def send(self, sid, event, data):
        entry = self.sockets.get(sid)
        if entry is None:
            return
        sock, lock = entry
        with lock:
            try:
                sock.sendall(_frame(0x1, json.dumps({"type": event, "data": data}).encode()))
            except OSError:
                pass

    def send_binary(self, sid, payload: bytes):
        entry = self.sockets.get(sid)
        if entry is not None:
            with entry[1]:
                entry[0].sendall(_frame(0x2, payload))

    def _worker(self):
        while True:
            item = self._work.get()
            if item is None:
                return
            self._execute(*item)

    def _execute(self, prompt_id, prompt, sid):
        self.running = prompt_id
        fingerprint = json.dumps(prompt, sort_keys=True)
        attempt = self._attempts[fingerprint] = self._attempts.get(fingerprint, 0) + 1
        messages = []

        def add(event, data):  # execution.add_message: kept for the history, sent to the client
            data = {**data, "timestamp": int(time.time() * 1000)}
            messages.append([event, data])
            self.send(sid, event, data)

        add("execution_start", {"prompt_id": prompt_id})
        add("execution_cached", {"nodes": [], "prompt_id": prompt_id})
        outputs, executed, error, interrupted = {}, [], self.fail(prompt, attempt), False
        for node_id, node in prompt.items():
            self.send(sid, "executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
            if node_id == self.progress_node:
                for value in (1, 2, 3):
                    self.send(sid, "progress", {"value": value, "max": 3, "prompt_id": prompt_id, "node": node_id})
                    if value == 1:
                        self.send_binary(sid, b"\x00\x00\x00\x01preview-jpeg-bytes")
                        if self.hold is not None and not self.hold.is_set():
                            self.hold.wait(timeout=30)
                    if self.interrupted.is_set():
                        interrupted = True
                        break
                if interrupted:
                    add("execution_interrupted", {"prompt_id": prompt_id, "node_id": node_id,
                                                  "node_type": node["class_type"], "executed": executed})
                    break
                if error:
                    add("execution_error", {
                        "prompt_id": prompt_id, "node_id": node_id, "node_type": node["class_type"],
                        "executed": executed, "exception_message": error, "exception_type": "RuntimeError",
                        "traceback": ["Traceback (most recent call last):\n", "RuntimeError: " + error],
                        "current_inputs": {}, "current_outputs": executed})
                    break
            if node_id == self.output_node:
                name = f"{node['inputs'].get('filename_prefix', 'out').split('/')[-1]}_{len(self.prompts):05d}_.mp4"
                self.files[(name, "sparse-avatar", "output")] = fingerprint.encode()
                self.files[("preview.png", "", "temp")] = b"png"
                outputs[node_id] = {"images": [{"filename": name, "subfolder": "sparse-avatar", "type": "output"}],
                                    "animated": [True]}
                outputs["preview"] = {"images": [{"filename": "preview.png", "subfolder": "", "type": "temp"}]}
                self.send(sid, "executed", {"node": node_id, "display_node": node_id, "output": outputs[node_id],
                                            "prompt_id": prompt_id})
            executed.append(node_id)
        else:
            add("execution_success", {"prompt_id": prompt_id})
        success = not (error or interrupted)
        self.history[prompt_id] = {
            "prompt": [len(self.prompts), prompt_id, prompt, {"client_id": sid}, [self.output_node]],
            "outputs": outputs if success else {}, "meta": {},
            "status": {"status_str": "success" if success else "error", "completed": success, "messages": messages},
        }
        self.running = None
        self.interrupted.clear()
        self.send(sid, "executing", {"node": None, "prompt_id": prompt_id})

    def close(self):
        self._work.put(None)
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()
        for sock, _ in list(self.sockets.values()):
            try:
                sock.close()
            except OSError:
                pass
