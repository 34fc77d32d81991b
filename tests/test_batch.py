"""`python -m sparse_avatar batch` against an in-process stand-in for ComfyUI's HTTP + websocket API
(tests/comfy_stub.py, same routes and message shapes as the real server): jobs queued with their
values, outputs downloaded, one retry after execution_error, Ctrl-C and rerun without redoing
finished jobs, and every bad input refused before anything is queued."""
import json
import socket
import threading
from pathlib import Path

import pytest
import sparse_avatar
from comfy_stub import ComfyStub
from sparse_avatar import batch
from sparse_avatar.cli import main
from sparse_avatar.errors import UserFacingError

WORKFLOW = {
    "1": {"class_type": "LoadAudio", "inputs": {"audio": "speech.wav"}, "_meta": {"title": "Speech"}},
    "2": {"class_type": "SparseAvatarSampler", "_meta": {"title": "Sampler"},
          "inputs": {"speech": ["1", 0], "mode": "dub", "steps": 20, "seed": 0, "audio_guidance": 1.0}},
    "3": {"class_type": "SaveVideo", "_meta": {"title": "Save Video"},
          "inputs": {"video": ["2", 0], "filename_prefix": "sparse-avatar/dub", "format": "mp4", "codec": "h264"}},
}
# /object_info as ComfyUI serves it: v1 specs, and the v3 schema's ["COMBO", {"options": ...}].
OBJECT_INFO = {
    "LoadAudio": {"input": {"required": {"audio": [["speech.wav", "other.wav"], {"audio_upload": True}]}}},
    "SparseAvatarSampler": {"input": {"required": {
        "speech": ["SPEECH_FEATURES", {}], "mode": [["generate", "dub"], {"default": "generate"}],
        "steps": ["INT", {"default": 20}], "seed": ["INT", {"default": 0, "control_after_generate": True}],
        "audio_guidance": ["FLOAT", {"default": 1.0}]}}},
    "SaveVideo": {"input": {"required": {
        "video": ["VIDEO", {}], "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
        "format": ["COMBO", {"options": ["auto", "mp4"]}], "codec": ["COMBO", {"options": ["auto", "h264"]}]}}},
}


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    monkeypatch.setattr(batch, "POLL_SECONDS", 0.05)


@pytest.fixture
def make_stub():
    stubs = []

    def make(**kwargs):
        stub = ComfyStub(kwargs.pop("object_info", OBJECT_INFO), output_node="3", progress_node="2", **kwargs)
        stubs.append(stub)
        return stub

    yield make
    for stub in stubs:
        stub.close()


def write_inputs(tmp_path, rows: str, workflow=WORKFLOW) -> tuple[Path, Path]:
    workflow_path = tmp_path / "dub.api.json"
    workflow_path.write_text(json.dumps(workflow))
    (tmp_path / "clips").mkdir(exist_ok=True)
    (tmp_path / "clips" / "a.wav").write_bytes(b"RIFF-a")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text(rows)
    return workflow_path, jobs


JOBS = ("job,Speech.audio,2.seed,SparseAvatarSampler.audio_guidance\n"
        "a,@clips/a.wav,1,\n"
        "b,other.wav,2,1.5\n"
        "c,,3,\n")


def sent(stub, job_index):
    return stub.prompts[job_index][1]


def test_each_row_is_queued_with_its_values_and_its_outputs_are_collected(tmp_path, make_stub):
    stub = make_stub()
    workflow, jobs = write_inputs(tmp_path, JOBS)
    result = batch.run_batch(workflow, jobs, server=stub.url, progress=False)

    assert result.done == ["a", "b", "c"] and not result.failed
    assert result.out == tmp_path / "jobs_output"
    assert [sent(stub, i)["2"]["inputs"]["seed"] for i in range(3)] == [1, 2, 3]  # ints, not "1"
    assert [sent(stub, i)["2"]["inputs"]["audio_guidance"] for i in range(3)] == [1.0, 1.5, 1.0]
    assert [sent(stub, i)["1"]["inputs"]["audio"] for i in range(3)] == ["a.wav", "other.wav", "speech.wav"]
    assert stub.uploads == {"a.wav": b"RIFF-a"}
    assert sent(stub, 0)["3"] == WORKFLOW["3"]  # untouched nodes go as they are
    assert len({client for _, _, client in stub.prompts}) == 1  # one client id (one websocket) for the batch

    manifest = json.loads((result.out / "manifest.json").read_text())
    for index, name in enumerate("abc"):
        entry = manifest["jobs"][name]
        assert entry["status"] == "done" and entry["attempts"] == 1 and entry["prompt_id"] == stub.prompts[index][0]
        assert entry["outputs"] == [f"{name}/dub_{index + 1:05d}_.mp4"]  # the saved video; the temp preview is not kept
        downloaded = (result.out / entry["outputs"][0]).read_bytes()
        assert downloaded == json.dumps(sent(stub, index), sort_keys=True).encode()
        assert json.loads((result.out / name / "prompt.api.json").read_text()) == sent(stub, index)
    assert sorted(path.name for path in (result.out / "a").iterdir()) == ["dub_00001_.mp4", "prompt.api.json"]


def test_a_job_that_fails_is_queued_once_more(tmp_path, make_stub):
    def fail(prompt, attempt):
        seed = prompt["2"]["inputs"]["seed"]
        return "CUDA out of memory" if seed == 2 and attempt == 1 or seed == 3 else None

    stub = make_stub(fail=fail)
    workflow, jobs = write_inputs(tmp_path, JOBS)
    result = batch.run_batch(workflow, jobs, server=stub.url, progress=False)

    assert result.done == ["a", "b"] and result.failed == ["c"]
    seeds = [prompt["2"]["inputs"]["seed"] for _, prompt, _ in stub.prompts]
    assert seeds == [1, 2, 2, 3, 3]  # b and c retried once, not more
    jobs_entries = json.loads((result.out / "manifest.json").read_text())["jobs"]
    assert jobs_entries["b"]["status"] == "done" and jobs_entries["b"]["attempts"] == 2
    assert jobs_entries["c"]["status"] == "failed" and jobs_entries["c"]["attempts"] == 2
    assert jobs_entries["c"]["error"] == "node 2 (SparseAvatarSampler): RuntimeError: CUDA out of memory"
    assert "outputs" not in jobs_entries["c"]

    # A rerun retries only the failed job; with --retries 0 it is queued once.
    result = batch.run_batch(workflow, jobs, server=stub.url, progress=False, retries=0)
    assert result.skipped == ["a", "b"] and result.failed == ["c"] and len(stub.prompts) == 6


def test_stopped_and_rerun_it_does_not_redo_finished_jobs(tmp_path, make_stub, monkeypatch):
    stub = make_stub()
    workflow, jobs = write_inputs(tmp_path, JOBS)
    collect = batch._Batch.collect

    def ctrl_c_while_downloading_b(self, job, history):
        if job.name == "b":
            raise KeyboardInterrupt
        return collect(self, job, history)

    monkeypatch.setattr(batch._Batch, "collect", ctrl_c_while_downloading_b)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(workflow, jobs, server=stub.url, progress=False)
    manifest = json.loads((tmp_path / "jobs_output" / "manifest.json").read_text())
    assert manifest["jobs"]["a"]["status"] == "done"
    assert manifest["jobs"]["b"]["status"] == "queued"  # it finished on the server; we never saved its files
    assert "c" not in manifest["jobs"] and len(stub.prompts) == 2

    monkeypatch.setattr(batch._Batch, "collect", collect)
    result = batch.run_batch(workflow, jobs, server=stub.url, progress=False)
    assert result.skipped == ["a"] and result.done == ["b", "c"]
    assert len(stub.prompts) == 3  # b collected from /history, not rendered again
    assert (result.out / "b" / "dub_00002_.mp4").is_file()

    result = batch.run_batch(workflow, jobs, server=stub.url, progress=False)
    assert result.skipped == ["a", "b", "c"] and not result.done and len(stub.prompts) == 3

    # Changed settings or a lost output file: that job is rendered again, the others stay done.
    jobs.write_text(JOBS.replace("c,,3,", "c,,4,"))
    (result.out / "a" / "dub_00001_.mp4").unlink()
    result = batch.run_batch(workflow, jobs, server=stub.url, progress=False)
    assert result.skipped == ["b"] and result.done == ["a", "c"]
    assert [prompt["2"]["inputs"]["seed"] for _, prompt, _ in stub.prompts[3:]] == [1, 4]


def test_ctrl_c_cancels_the_running_job_on_the_server_and_a_rerun_renders_it(tmp_path, make_stub, monkeypatch):
    hold = threading.Event()
    stub = make_stub(hold=hold)
    workflow, jobs = write_inputs(tmp_path, JOBS)
    step = batch._Bars.step

    def ctrl_c_at_first_progress(self, label, value, maximum):
        if value == 1:
            raise KeyboardInterrupt
        return step(self, label, value, maximum)

    monkeypatch.setattr(batch._Bars, "step", ctrl_c_at_first_progress)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(workflow, jobs, server=stub.url, progress=True)
    first_id = stub.prompts[0][0]
    assert {"prompt_id": first_id} in stub.interrupts and first_id in stub.deletes
    entry = json.loads((tmp_path / "jobs_output" / "manifest.json").read_text())["jobs"]["a"]
    assert entry["status"] == "stopped" and entry["prompt_id"] == first_id

    monkeypatch.setattr(batch._Bars, "step", step)
    result = batch.run_batch(workflow, jobs, server=stub.url, progress=True)
    assert result.done == ["a", "b", "c"] and len(stub.prompts) == 4
    entry = json.loads((result.out / "manifest.json").read_text())["jobs"]["a"]
    assert entry["status"] == "done" and entry["attempts"] == 1 and entry["prompt_id"] == stub.prompts[1][0]


def test_the_websocket_client_reads_text_and_binary_and_answers_pings(make_stub):
    stub = make_stub()
    client = batch.ComfyClient(stub.url)
    ws = client.websocket()
    status = json.loads(ws.recv(timeout=10))  # the server's greeting; its ping follows and is answered inside recv
    assert status == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                 "sid": client.client_id}}
    stub.send_binary(client.client_id, b"\x00\x00\x00\x01" + bytes(range(256)) * 300)  # a 76 kB preview frame
    assert ws.recv(timeout=10) == b"\x00\x00\x00\x01" + bytes(range(256)) * 300
    assert ws.recv(timeout=0.05) is None  # nothing more: a timeout, not an error
    ws.close()
    assert stub.ws_closed.wait(timeout=10)
    assert stub.pongs == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("rows, message", [
    ("job,Sampler.cfg\na,2\n", "node 2 (SparseAvatarSampler) has no input 'cfg' in this workflow"),
    ("job,9.seed\na,2\n", "the workflow has no node '9'"),
    ("job,seed\na,2\n", "name a node input as NODE.input"),
    ("job,2.speech\na,x\n", "is connected to node 1"),
    ("job,2.seed\na,two\n", "jobs.csv row 2, column '2.seed': 'two' is not a number"),
    ("job,2.seed\na,1\na,2\n", "job name 'a' is used twice"),
    ("job,2.seed\na b,1\n", "job name 'a b'"),
    ("job,1.audio\na,@clips/missing.wav\n", "local file"),
    ("job,2.seed\n", "at least one job row"),
])
def test_bad_jobs_are_refused_before_anything_is_queued(tmp_path, make_stub, rows, message):
    stub = make_stub()
    workflow, jobs = write_inputs(tmp_path, rows)
    with pytest.raises(UserFacingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        batch.run_batch(workflow, jobs, server=stub.url, progress=False)
    assert stub.prompts == [] and stub.uploads == {}


def test_values_the_server_would_refuse_are_refused_first(tmp_path, make_stub):
    # Only the server knows a combo's choices and that 'steps' is an INT: checked against /object_info.
    stub = make_stub()
    for rows, message in (("job,Speech.audio\na,nope.wav\n", "'nope.wav' is not a choice of 'audio'"),
                          ("job,2.steps\na,2.5\n", "'2.5' is not a number"),
                          ("job,3.format\na,webm\n", "'webm' is not a choice of 'format'")):
        workflow, jobs = write_inputs(tmp_path, rows)
        with pytest.raises(UserFacingError, match=message):
            batch.run_batch(workflow, jobs, server=stub.url, progress=False)
    info = {name: spec for name, spec in OBJECT_INFO.items() if name != "SparseAvatarSampler"}
    stub = make_stub(object_info=info)
    workflow, jobs = write_inputs(tmp_path, JOBS)
    with pytest.raises(UserFacingError, match="has no node type SparseAvatarSampler"):
        batch.run_batch(workflow, jobs, server=stub.url, progress=False)
    assert stub.prompts == []


def test_missing_or_wrong_workflow_and_server_down(tmp_path):
    workflow, jobs = write_inputs(tmp_path, JOBS)
    with pytest.raises(UserFacingError, match="workflow .*missing.api.json' not found"):
        batch.run_batch(tmp_path / "missing.api.json", jobs, progress=False)
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [], "links": [], "version": 0.4}))
    with pytest.raises(UserFacingError, match="UI format"):
        batch.run_batch(ui, jobs, progress=False)
    with pytest.raises(UserFacingError, match="jobs file .* not found"):
        batch.run_batch(workflow, tmp_path / "none.csv", progress=False)
    with pytest.raises(UserFacingError, match="no ComfyUI answers at http://127.0.0.1:"):
        batch.run_batch(workflow, jobs, server=f"http://127.0.0.1:{free_port()}", progress=False)
    assert not (tmp_path / "jobs_output").exists()


def test_cli(tmp_path, make_stub, capsys):
    stub = make_stub()
    workflow, jobs = write_inputs(tmp_path, JOBS)
    out = tmp_path / "renders"
    assert main(["batch", "--workflow", str(workflow), "--jobs", str(jobs), "--server", stub.url,
                 "--out", str(out), "--no-progress"]) == 0
    assert "3 done, 0 already done, 0 failed" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["jobs"]["c"]["status"] == "done"
    assert main(["batch", "--workflow", str(tmp_path / "nope.api.json"), "--jobs", str(jobs)]) == 2
    assert capsys.readouterr().err.startswith("error: workflow")


def test_the_shipped_api_workflows_take_the_documented_columns(tmp_path):
    folder = Path(sparse_avatar.__file__).parent / "workflows_api"
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("job,LoadAudio.audio,SparseAvatarSampler.seed,1.end_seconds\n"  # node 1: the reference in each
                    "hello,@speech.wav,7,12.5\n")
    (tmp_path / "speech.wav").write_bytes(b"RIFF")
    for path in sorted(folder.glob("*.api.json")):
        workflow = batch.load_workflow(path)
        settings, (job,) = batch.load_jobs(jobs, workflow)
        prompt = batch.build_prompt(workflow, settings, {**job.values, "LoadAudio.audio": "speech.wav"})
        sampler = next(node for node in prompt.values() if node["class_type"] == "SparseAvatarSampler")
        assert sampler["inputs"]["seed"] == 7 and prompt["1"]["inputs"]["end_seconds"] == 12.5
        assert prompt["1"]["class_type"] == "SparseAvatarLoadReferenceVideo"
        assert job.uploads == {"LoadAudio.audio": tmp_path / "speech.wav"}


def test_a_type_two_nodes_have_must_be_named_by_id(tmp_path):
    # generate with Mix Identity loads two reference videos (A: looks, B: motion).
    workflow = batch.load_workflow(Path(sparse_avatar.__file__).parent / "workflows_api" / "avatar_generate.api.json")
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("job,SparseAvatarLoadReferenceVideo.video\na,x.mp4\n")
    with pytest.raises(UserFacingError, match=r"2 nodes have the type 'SparseAvatarLoadReferenceVideo' \(ids 1, 9\)"):
        batch.load_jobs(jobs, workflow)


def test_a_server_lost_mid_batch_is_one_clear_error_and_the_done_jobs_stay_done(tmp_path, make_stub, monkeypatch):
    import urllib.error

    stub = make_stub()
    workflow, jobs = write_inputs(tmp_path, JOBS)
    queue_prompt = batch.ComfyClient.queue_prompt

    def server_gone_at_c(self, prompt):
        if prompt["2"]["inputs"]["seed"] == 3:
            raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
        return queue_prompt(self, prompt)

    monkeypatch.setattr(batch.ComfyClient, "queue_prompt", server_gone_at_c)
    with pytest.raises(UserFacingError, match=r"batch stopped after 2 of 3 job\(s\): .*Connection refused.*run the same"):
        batch.run_batch(workflow, jobs, server=stub.url, progress=False)
    manifest = json.loads((tmp_path / "jobs_output" / "manifest.json").read_text())
    assert [manifest["jobs"][name]["status"] for name in "ab"] == ["done", "done"]
