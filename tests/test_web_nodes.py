"""The node side of the web extension (web/js/): what the nodes send the browser and what its clicks do.

Run as plain classes (no ComfyUI): Train Avatar's progress/loss events (``_comfy.send_event`` is
captured), Preference Pair's 'choose' mode (clips written, nothing appended until the A/B click)
and the click itself (``record_pending_choice``, what the POST route calls). The browser side is
tests/test_web_js.py (pure functions) and scripts/browser_check.py (the real ComfyUI in Chromium).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparse_avatar.errors import UserFacingError
from sparse_avatar.nodes import _comfy
from sparse_avatar.nodes import training as training_nodes
from sparse_avatar.nodes.training import (PAIR_ROUTE, TRAIN_EVENT, RecordPreferencePair, TrainAvatar,
                                          record_pending_choice)
from sparse_avatar.training.preferences import read_pairs
from test_nodes_training import FPS, Interrupted, _load, _reference, _video, models_cwd  # noqa: F401 (fixture)


def _capture_events(monkeypatch):
    events = []
    monkeypatch.setattr(_comfy, "send_event", lambda event, data: events.append((event, dict(data))))
    return events


def _quick_trainer(monkeypatch, losses):
    """Stands in for ``finetune_personality`` (tested for real in test_nodes_training.py): reports
    ``losses`` as the trainer does (None on steps it did not sync), stops when asked, writes the file."""
    def finetune(model, crops, speech, out_path, *, steps, progress, should_cancel, **_):
        for step, loss in enumerate(losses[:steps], start=1):
            progress(step, steps, loss)
            if should_cancel():
                break
        Path(out_path).write_bytes(b"weights")
        return Path(out_path)

    monkeypatch.setattr(training_nodes, "finetune_personality", finetune)


def test_train_avatar_sends_progress_with_the_loss_and_what_it_saved(models_cwd, monkeypatch):
    events = _capture_events(monkeypatch)
    _quick_trainer(monkeypatch, [0.5, None, 0.25])
    with torch.inference_mode():
        result = TrainAvatar().train(_load(), _reference(models_cwd), steps=3, allow_cpu=True, lora_rank=0, filename_prefix="person",
                                     unique_id=7)
    assert {event for event, _ in events} == {TRAIN_EVENT}
    sent = [data for _, data in events]
    assert [(data["state"], data["step"], data["total"], data["loss"]) for data in sent] == [
        ("running", 1, 3, 0.5), ("running", 2, 3, 0.5), ("running", 3, 3, 0.25), ("saved", 3, 3, 0.25)]
    assert all(data["node"] == "7" and data["elapsed_s"] >= 0 for data in sent)
    assert sent[-1]["file"] == "person_00001.safetensors" == result["ui"]["text"][0].split(" ")[0]


def test_train_avatar_shows_a_budgeted_runs_progress_from_its_first_step(models_cwd, monkeypatch):
    """A time-budgeted run's total is the library's planned steps, which moves as the run learns
    its pace (here 40, then 400): the node reports by the fraction done, so the first step is
    shown at once and a moving total neither hides progress nor floods the browser."""
    events = _capture_events(monkeypatch)

    def finetune(model, crops, speech, out_path, *, progress, **_):
        for step in range(1, 201):
            progress(step, 40 if step < 10 else 400, 0.5 if step % 10 == 0 else None)
        Path(out_path).write_bytes(b"weights")
        return Path(out_path)

    monkeypatch.setattr(training_nodes, "finetune_personality", finetune)
    with torch.inference_mode():
        TrainAvatar().train(_load(), _reference(models_cwd), steps=100_000, lora_rank=0, filename_prefix="timed", allow_cpu=True)
    running = [data for _, data in events if data["state"] == "running"]
    assert running[0]["step"] == 1 and running[0]["total"] == 40 and running[0]["remaining_s"] is None
    assert 20 <= len(running) <= 110 and all(data["remaining_s"] is None or data["remaining_s"] >= 0 for data in running)
    assert events[-1][1]["state"] == "saved" and events[-1][1]["step"] == events[-1][1]["total"] == 200


def test_train_avatar_cancel_says_what_it_kept(models_cwd, monkeypatch):
    events, pressed = [], []
    _quick_trainer(monkeypatch, [0.5] * 50)

    def send(event, data):
        events.append(dict(data))
        pressed.append(True)  # Cancel pressed while step 1 runs

    def check_interrupted():
        if pressed:
            raise Interrupted()

    monkeypatch.setattr(_comfy, "send_event", send)
    monkeypatch.setattr(_comfy, "interrupt_requested", lambda: bool(pressed))
    monkeypatch.setattr(_comfy, "check_interrupted", check_interrupted)
    with torch.inference_mode(), pytest.raises(Interrupted):  # ComfyUI's interrupt, after the save
        TrainAvatar().train(_load(), _reference(models_cwd), steps=50, allow_cpu=True, lora_rank=0, filename_prefix="kept")
    assert [(data["state"], data["step"], data["total"]) for data in events] == [("running", 1, 50), ("cancelled", 1, 50)]
    assert events[-1]["file"] == "kept_00001.safetensors"
    assert (models_cwd / "models" / "avatar" / "kept_00001.safetensors").read_bytes() == b"weights"


def test_preference_pair_choose_waits_for_the_click_then_appends_once(models_cwd):
    reference = _reference(models_cwd)
    pairs_file = models_cwd / "output" / "sparse-avatar" / "preferences" / "session.jsonl"
    assert RecordPreferencePair.INPUT_TYPES()["required"]["winner"][1]["default"] == "choose"
    shown = RecordPreferencePair().record(_video(1), _video(2), reference, winner="choose", pairs_name="session")
    assert shown["result"] == (str(pairs_file),) and not pairs_file.exists(), "nothing is appended before the click"
    (entry,) = shown["ui"]["sparse_avatar_pair"]
    assert entry["pairs_name"] == "session" and entry["pair"] == "pair_00001"
    for side in ("a", "b"):  # the /view queries the A/B widget plays
        clip = entry[side]
        assert clip == {"filename": f"pair_00001_{side}.mp4", "subfolder": "sparse-avatar/preferences/session", "type": "output"}
        assert (models_cwd / "output" / clip["subfolder"] / clip["filename"]).is_file()

    for pairs_name, pair, winner, problem in (("../x", "pair_00001", "a", "not allowed"),
                                              ("session", "pair_00001/../../x", "a", "unknown pair"),
                                              ("session", "pair_00001", "c", "winner must be A or B"),
                                              ("other", "pair_00001", "a", "already recorded")):
        with pytest.raises(UserFacingError, match=problem):
            record_pending_choice(pairs_name, pair, winner)
    assert record_pending_choice("session", "pair_00001", "b") == {
        "pairs_file": "session.jsonl", "pair": "pair_00001", "winner": "B", "count": 1}
    with pytest.raises(UserFacingError, match="already recorded"):  # a second click
        record_pending_choice("session", "pair_00001", "a")
    (pair,) = read_pairs(pairs_file)
    assert pair.winner == "b" and pair.fps == FPS and pair.video_b.name == "pair_00001_b.mp4"

    # the next pair keeps counting, and the fixed choices still append at once
    fixed = RecordPreferencePair().record(_video(3), _video(4), reference, winner="A", pairs_name="session")
    assert "pair_00002: A preferred; 2 pairs" in fixed["ui"]["text"][0]
    assert json.loads(pairs_file.read_text().splitlines()[1])["winner"] == "a"


def test_the_route_is_only_registered_inside_comfyui():
    registered = []
    assert _comfy.add_routes(registered.append) is False and registered == []
    assert PAIR_ROUTE.startswith("/sparse_avatar/")
