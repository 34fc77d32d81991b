"""Check the web extension (web/js/) in a real browser against a real ComfyUI with the pack loaded.

    /path/to/venv-with-playwright/bin/python scripts/browser_check.py \
        --comfyui /work/comfyui [--python /work/comfyui/venv/bin/python] [--port 8190]

Needs: a ComfyUI checkout with its venv (the pack's requirements installed there), Debian's
Chromium (`apt-get install -y chromium`, used as /usr/bin/chromium: no browser download) and
Python's `playwright` package in a venv of its own (`python3 -m venv /tmp/pw && /tmp/pw/bin/pip
install playwright`; never a requirement of the pack). The pack's own venv (--pack-python,
default ./.venv/bin/python) makes the inputs. Not part of CI (CI has no Chromium).

The reference and the speech are Avatar World's by default (the pack's own procedural faces and
espeak-ng voices, Apache-2.0 like the rest of the project), so checks.txt and the screenshots it
writes under bench/results/browser_check/ are committed: every frame in them is a drawn Avatar
World face. `--clip FILE [--speech FILE]` uses a real clip instead (e.g. one from ../shared/media,
whose licence allows tests and evaluation only, never copies in the project): its screenshots then
show that person and go to <base-directory>/screenshots, outside the repository, unless
--screenshots says otherwise.

What it does, all on loopback:
1. A fresh ComfyUI base folder (--base-directory, so the ComfyUI tree itself is not touched):
   custom_nodes/sparse_avatar -> this checkout, models/avatar/tiny.safetensors (an untrained
   `tiny` model: renders take seconds on a CPU), input/reference.mp4 (2 s of an Avatar World
   person talking, 256 px, with its sound; or 2 s of --clip) and input/speech.wav (1.2 s of
   another Avatar World voice; or of --speech).
2. Starts `main.py --cpu` on --port and opens it in headless Chromium.
3. Checks the extension is listed by /extensions and registered, with no console errors.
4. Builds a graph in the page (Load Reference Video -> Extract Identity; two samplers with other
   seeds -> two Decode Avatar Video -> Preference Pair, winner 'choose'), picks the reference range
   on Load Reference Video by clicking its scrub bar and Set start / Set end, queues it, plays the
   decoded video in the node's player (time advances, audio is decoded), clicks "B is better" on
   the A/B widget and checks the line appended to output/sparse-avatar/preferences/browser_check.jsonl.
5. Queues Train Avatar (15 steps, full weights), waits for progress with a loss on the node (the
   trainer syncs the loss every 10th step), clicks its Cancel and checks that the node reports the
   weights file it kept and that the file exists.
6. Counts console errors, page errors and failed requests; ComfyUI's own start-up noise on a fresh
   user folder (404s for user.css and userdata listings, api.comfy.org unreachable offline) is
   listed but not counted.
Screenshots of each step (JPEG at 3/4 size, made small with the pack's Pillow) and checks.txt (the
results, with the versions and the reference used) go to --screenshots. Exit status 0 when every
check passed. It takes 2-10 minutes on a CPU (mostly the 10 training steps before the first loss).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_MEDIA = REPO.parent / "shared" / "media"

# Avatar World seeds of the reference person and of the driving voice (training-range seeds; the
# untrained tiny model never saw them anyway).
WORLD_PERSON_SEED, WORLD_VOICE_SEED = 7, 11

PREPARE = r"""
import sys
from pathlib import Path
from sparse_avatar.media import load_audio, load_reference_video, write_video
from sparse_avatar.media.audio import write_wav
from sparse_avatar.model.checkpoint import new_model, save_checkpoint
base, clip, speech = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
person_seed, voice_seed = int(sys.argv[4]), int(sys.argv[5])
save_checkpoint(new_model("tiny", seed=0), base / "models" / "avatar" / "tiny.safetensors")
if clip == "world":
    from sparse_avatar.avatar_world.generate import ClipSpec, make_clip
    from sparse_avatar.avatar_world.speech import SAMPLE_RATE
    world = make_clip(ClipSpec(identity_seed=person_seed, voice_seed=person_seed, text_seed=person_seed,
                               scene_seed=person_seed, clip_seed=person_seed, seconds=2.0, size=256))
    write_video(base / "input" / "reference.mp4", world.frames(), world.spec.fps, audio=world.audio,
                sample_rate=SAMPLE_RATE)
clip = base / "input" / "reference.mp4" if clip == "world" else clip
reference = load_reference_video(clip, end_s=2.0, max_side=256)
if clip != base / "input" / "reference.mp4":
    write_video(base / "input" / "reference.mp4", reference.frames, reference.fps, audio=reference.audio,
                sample_rate=reference.sample_rate)
if speech == "world":
    from sparse_avatar.avatar_world.speech import SAMPLE_RATE, synthesize_speech
    audio = synthesize_speech(voice_seed, voice_seed, 1.2)[0]
    assert SAMPLE_RATE == 16000
else:
    audio = load_audio(speech)
write_wav(base / "input" / "speech.wav", audio[: int(1.2 * 16000)])
print(reference.n_frames, reference.fps)
"""

# Playwright cannot scale a screenshot: the pack's Pillow makes the committed ones small (3/4 size,
# JPEG quality 60: about 50-80 KB each, the noise of the untrained renders is what costs).
SHRINK = r"""
import sys
from pathlib import Path
from PIL import Image
for path in sorted(Path(sys.argv[1]).glob("*.jpg")):
    image = Image.open(path).convert("RGB")
    if image.width > 1300:
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
        image.save(path, "JPEG", quality=60, optimize=True)
"""


def shrink_screenshots(shots: Path, pack_python: str) -> None:
    if any(shots.glob("*.jpg")):
        subprocess.run([pack_python, "-c", SHRINK, str(shots)], check=True)


# Graph built with the frontend's own objects, so the widgets and links are exactly what a user gets.
BUILD_GRAPH = r"""
(fps) => {
  const app = window.comfyAPI.app.app;
  const LiteGraph = window.LiteGraph;
  app.graph.clear();
  const add = (type, pos, widgets = {}) => {
    const node = LiteGraph.createNode(type);
    app.graph.add(node);
    node.pos = pos;
    for (const [name, value] of Object.entries(widgets)) {
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget) throw new Error(`${type} has no widget ${name}`);
      widget.value = value;
      widget.callback?.(value, app.canvas, node);
    }
    return node;
  };
  const link = (from, output, to, input) => {
    const out = from.outputs.findIndex((o) => o.name === output);
    const inp = to.inputs.findIndex((i) => i.name === input);
    if (out < 0 || inp < 0) throw new Error(`no ${output} -> ${input}`);
    from.connect(out, to, inp);
  };
  const ref = add("SparseAvatarLoadReferenceVideo", [20, 20], { video: "reference.mp4", max_side: 256 });
  ref.size = [340, ref.size[1]];
  const audio = add("LoadAudio", [480, 380], { audio: "speech.wav" });
  const speech = add("SparseAvatarEncodeSpeech", [480, 600], { fps });
  const model = add("SparseAvatarLoadModel", [480, 20], { checkpoint: "tiny.safetensors", dtype: "fp32" });
  const identity = add("SparseAvatarExtractIdentity", [480, 240]);
  const samplers = [1, 2].map((seed, i) => add("SparseAvatarSampler", [800, 20 + i * 430],
    { steps: 2, seed, chunk_frames: 0 }));
  const decoders = samplers.map((s, i) => add("SparseAvatarDecodeVideo", [1160, 20 + i * 520], { paste_back: false }));
  const pair = add("SparseAvatarPreferencePair", [1520, 20], { winner: "choose", pairs_name: "browser_check" });
  link(audio, "AUDIO", speech, "audio");
  link(model, "model", identity, "model");
  link(ref, "reference", identity, "reference");
  samplers.forEach((s, i) => {
    link(model, "model", s, "model");
    link(identity, "identity", s, "identity");
    link(speech, "speech", s, "speech");
    link(model, "model", decoders[i], "model");
    link(s, "latent", decoders[i], "latent");
  });
  link(decoders[0], "video", pair, "video_a");
  link(decoders[1], "video", pair, "video_b");
  link(ref, "reference", pair, "reference");
  decoders.forEach((d) => { d.size = [320, d.size[1]]; });
  pair.size = [560, pair.size[1]];
  const tag = (node, widget, label) => {
    const element = node.widgets.find((w) => w.name === widget).element;
    element.dataset.check = label;
  };
  tag(ref, "sparse_avatar_range", "range");
  tag(decoders[0], "sparse_avatar_player", "player-a");
  tag(pair, "sparse_avatar_pair", "pair");
  app.canvas.ds.scale = 0.7;
  app.canvas.ds.offset = [10, 10];
  app.graph.setDirtyCanvas(true, true);
  return { ref: ref.id, decoder: decoders[0].id, pair: pair.id };
}
"""

TRAIN_GRAPH = r"""
() => {
  const app = window.comfyAPI.app.app;
  const LiteGraph = window.LiteGraph;
  app.graph.clear();
  const ref = LiteGraph.createNode("SparseAvatarLoadReferenceVideo");
  app.graph.add(ref);
  ref.pos = [20, 20];
  ref.widgets.find((w) => w.name === "video").value = "reference.mp4";
  ref.widgets.find((w) => w.name === "max_side").value = 256;
  const model = LiteGraph.createNode("SparseAvatarLoadModel");
  app.graph.add(model);
  model.pos = [20, 520];
  model.widgets.find((w) => w.name === "checkpoint").value = "tiny.safetensors";
  model.widgets.find((w) => w.name === "dtype").value = "fp32";
  const train = LiteGraph.createNode("SparseAvatarTrain");
  app.graph.add(train);
  train.pos = [380, 20];
  train.size = [420, train.size[1]];
  const set = (name, value) => { train.widgets.find((w) => w.name === name).value = value; };
  set("steps", 15); set("lora_rank", 0); set("minutes", 0); set("filename_prefix", "browser_check");
  set("learning_rate", 0.001); set("allow_cpu", true); // a CPU ComfyUI: refused otherwise
  model.connect(0, train, train.inputs.findIndex((i) => i.name === "model"));
  ref.connect(0, train, train.inputs.findIndex((i) => i.name === "reference"));
  train.widgets.find((w) => w.name === "sparse_avatar_training").element.dataset.check = "train";
  app.canvas.ds.scale = 1;
  app.canvas.ds.offset = [10, 10];
  app.graph.setDirtyCanvas(true, true);
  return { train: train.id };
}
"""


# What a fresh ComfyUI start logs by itself: 404s for a new user's files and the favicon, no internet
# for api.comfy.org, and (frontend 1.27.10) a TypeError in its own settings store on a new user
# ("reading 'id'" in onChange/addSetting, thrown before any extension is loaded).
_NOISE = ("/api/userdata", "/user.css", "api.comfy.org", "/favicon.ico")


def _comfyui_noise(line: str) -> bool:
    """A console error of ComfyUI's own, not of the pack: anything naming the pack's scripts or
    routes counts; a page error counts unless its stack is the frontend's settings store."""
    if "sparse_avatar" in line or "sparse-avatar" in line:
        return False
    if line.startswith("page error"):
        return "at onChange" in line and "/assets/index-" in line
    return any(part in line for part in _NOISE)


def _versions(base_url: str, log_path: Path, chromium: str) -> str:
    log = log_path.read_text() if log_path.is_file() else ""
    found = {key: line.split(":", 1)[1].strip() for line in log.splitlines()
             for key in ("ComfyUI version", "ComfyUI frontend version") if line.startswith(key + ":")}
    try:
        browser = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        browser = "chromium ?"
    return f"ComfyUI {found.get('ComfyUI version', '?')}, frontend {found.get('ComfyUI frontend version', '?')}, {browser}"


def http_json(url: str, timeout: float = 30.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Checks:
    def __init__(self):
        self.results: list[tuple[bool, str]] = []

    def __call__(self, ok: bool, what: str) -> bool:
        self.results.append((bool(ok), what))
        print(("PASS " if ok else "FAIL ") + what, flush=True)
        return bool(ok)


def prepare_base(base: Path, pack_python: str, clip: Path | None, speech: Path | None) -> float:
    """Make the base folder; returns the reference clip's frame rate. ``None``: Avatar World's."""
    if base.exists():
        shutil.rmtree(base)
    for folder in ("custom_nodes", "models/avatar", "input", "output", "temp", "user"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "sparse_avatar").symlink_to(REPO, target_is_directory=True)
    made = subprocess.run([pack_python, "-c", PREPARE, str(base), str(clip or "world"), str(speech or "world"),
                           str(WORLD_PERSON_SEED), str(WORLD_VOICE_SEED)], check=True, cwd=REPO.parent,
                          capture_output=True, text=True)
    return float(made.stdout.split()[-1])


def wait_for_server(base_url: str, server: subprocess.Popen, log_path: Path, seconds: float = 240) -> dict:
    deadline = time.time() + seconds
    while True:
        try:
            return http_json(f"{base_url}/object_info", timeout=60)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if server.poll() is not None or time.time() > deadline:
                print(log_path.read_text()[-4000:])
                raise SystemExit("ComfyUI did not start")
            time.sleep(2)


def run_browser(args, base_url: str, base: Path, fps: float, check: Checks) -> None:
    from playwright.sync_api import sync_playwright

    shots = args.screenshots
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*.jpg"):  # no screenshot of an earlier run (a failure.jpg) left beside these
        old.unlink()
    console_errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium,
                                             args=["--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page(viewport={"width": 1640, "height": 1000})
        page.on("console", lambda message: console_errors.append(
            f"{message.text} [{message.location.get('url', '')}]") if message.type == "error" else None)
        page.on("pageerror", lambda error: console_errors.append(
            f"page error: {error} [{' | '.join((error.stack or '').splitlines()[1:3]).strip()}]"))
        # A media element aborts its range requests when its source changes: not an error.
        page.on("requestfailed", lambda request: None if request.failure == "net::ERR_ABORTED" else console_errors.append(
            f"request failed: {request.url} ({request.failure})"))
        page.goto(base_url)
        page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph", timeout=120_000)
        page.wait_for_timeout(3000)  # extensions finish their setup
        # A first start opens the templates dialog: close whatever dialog is open.
        for _ in range(3):
            if not page.locator(".p-dialog").count():
                break
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)
        check(not page.locator(".p-dialog").count(), "no dialog left over the canvas")
        try:
            steps(page, args, base_url, base, fps, check, console_errors)
        except Exception:
            page.screenshot(path=str(shots / "failure.jpg"), quality=85)
            raise
        finally:
            browser.close()


def steps(page, args, base_url, base, fps, check, console_errors) -> None:
    shots = args.screenshots

    listed = http_json(f"{base_url}/extensions")
    check(any(path.endswith("/sparse_avatar.js") for path in listed), f"/extensions lists the pack's script ({len(listed)} scripts)")
    check(page.evaluate("() => window.comfyAPI.app.app.extensions.some((e) => e.name === 'sparse_avatar.web')"),
          "the extension is registered in the frontend")

    ids = page.evaluate(BUILD_GRAPH, fps)
    page.wait_for_function("() => { const v = document.querySelector('[data-check=range]') && "
                           "window.comfyAPI.app.app.graph.getNodeById(%d).videoContainer?.querySelector('video');"
                           " return v && v.readyState >= 1 && v.duration > 0; }" % ids["ref"], timeout=30_000)
    page.wait_for_timeout(500)
    # The range picker: click a quarter and three quarters into the scrub bar, Set start / Set end.
    bar = page.locator("[data-check=range] .sa-bar")
    box = bar.bounding_box()
    duration = page.evaluate("(id) => window.comfyAPI.app.app.graph.getNodeById(id).sparseAvatarRange.clipVideo().duration", ids["ref"])
    bar.click(position={"x": box["width"] * 0.25, "y": box["height"] / 2})
    page.locator("[data-check=range] button", has_text="Set start").click()
    bar.click(position={"x": box["width"] * 0.75, "y": box["height"] / 2})
    page.locator("[data-check=range] button", has_text="Set end").click()
    start, end = page.evaluate("(id) => { const n = window.comfyAPI.app.app.graph.getNodeById(id);"
                               " return ['start_seconds', 'end_seconds'].map((k) => n.widgets.find((w) => w.name === k).value); }", ids["ref"])
    check(abs(start - 0.25 * duration) <= 0.11 and abs(end - 0.75 * duration) <= 0.11,
          f"range picker set start/end from scrubbing: {start:.1f}-{end:.1f} s of a {duration:.2f} s clip")
    page.screenshot(path=str(shots / "1_graph_range_picked.jpg"), quality=85)

    page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
    page.wait_for_function("() => { const v = document.querySelector('[data-check=player-a] video');"
                           " return v && !v.hidden && v.readyState >= 2; }", timeout=args.timeout * 1000)
    played = page.evaluate("""async () => {
        const v = document.querySelector('[data-check=player-a] video');
        v.muted = false; v.currentTime = 0;
        await v.play();
        await new Promise((r) => setTimeout(r, 700));
        const state = { t: v.currentTime, audioBytes: v.webkitAudioDecodedByteCount, videoBytes: v.webkitVideoDecodedByteCount,
                        width: v.videoWidth, duration: v.duration, src: v.src, error: v.error && v.error.code };
        v.pause();
        return state; }""")
    check(played["t"] > 0.1 and played["width"] > 0 and not played["error"],
          f"the Decode Avatar Video player plays the rendered file ({played['width']} px, {played['duration']:.2f} s, at {played['t']:.2f} s)")
    check(played["audioBytes"] > 0, f"the preview plays with sound ({played['audioBytes']} audio bytes decoded)")

    page.wait_for_function("() => !document.querySelector('[data-check=pair] button[data-side=B]').disabled", timeout=args.timeout * 1000)
    page.locator("[data-check=pair] button", has_text="Play both").click()
    page.wait_for_timeout(800)
    page.screenshot(path=str(shots / "2_rendered_preview_and_ab.jpg"), quality=85)
    page.locator("[data-check=pair] button", has_text="B is better").click()
    page.wait_for_function("() => document.querySelector('[data-check=pair] .sa-note:last-child').textContent.includes('pairs in')",
                           timeout=30_000)
    status = page.locator("[data-check=pair] > .sa-note").last.text_content()
    pairs_file = base / "output" / "sparse-avatar" / "preferences" / "browser_check.jsonl"
    lines = pairs_file.read_text().splitlines() if pairs_file.is_file() else []
    check(len(lines) == 1 and json.loads(lines[0])["winner"] == "b",
          f"the A/B click appended the pair: {pairs_file.name} has {len(lines)} line(s); the node says '{status}'")
    page.screenshot(path=str(shots / "3_pair_recorded.jpg"), quality=85)

    # Train Avatar: progress with the loss, then Cancel keeps the weights.
    ids = page.evaluate(TRAIN_GRAPH)
    page.evaluate("() => window.comfyAPI.app.app.queuePrompt(0, 1)")
    page.wait_for_function("() => { const s = window.comfyAPI.app.app.graph.getNodeById(%d).sparseAvatarTrain.state.last;"
                           " return s && s.state === 'running' && s.loss !== null; }" % ids["train"],
                           timeout=args.train_timeout * 1000)
    page.wait_for_timeout(1500)
    text = page.locator("[data-check=train] .sa-note").text_content()
    check("loss" in text, f"Train Avatar shows progress with the loss: '{text}'")
    page.screenshot(path=str(shots / "4_train_progress.jpg"), quality=85)
    page.locator("[data-check=train] button").click()
    page.wait_for_function("() => { const s = window.comfyAPI.app.app.graph.getNodeById(%d).sparseAvatarTrain.state.last;"
                           " return s && s.state === 'cancelled'; }" % ids["train"], timeout=args.train_timeout * 1000)
    text = page.locator("[data-check=train] .sa-note").text_content()
    kept = sorted(path.name for path in (base / "models" / "avatar").glob("browser_check_*.safetensors"))
    check(bool(kept) and kept[0] in text, f"Cancel kept the weights: '{text}'; files {kept}")
    page.wait_for_timeout(500)
    page.screenshot(path=str(shots / "5_train_cancelled_kept.jpg"), quality=85)

    # ComfyUI itself logs a few 404s on a fresh user folder (user.css, userdata listings) and cannot
    # reach api.comfy.org offline: those are listed, not counted; anything else is.
    ours = [line for line in console_errors if not _comfyui_noise(line)]
    check(not ours, "no console errors from the extension" + ("" if not ours else ": " + " | ".join(ours[:5])))
    others = [line for line in console_errors if _comfyui_noise(line)]
    print(f"  ComfyUI's own console errors (not counted): {len(others)}" + "".join(f"\n    {line}" for line in others[:10]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, default=Path("/work/comfyui"))
    parser.add_argument("--python", help="ComfyUI's python (default: <comfyui>/venv/bin/python)")
    parser.add_argument("--pack-python", default=str(REPO / ".venv" / "bin" / "python"), help="a python with sparse_avatar installed")
    parser.add_argument("--port", type=int, default=8190)
    parser.add_argument("--base-directory", type=Path, default=Path("/tmp/sparse_avatar_browser_check"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--clip", type=Path, help="a real reference clip (its first 2 s) instead of the Avatar World "
                        f"person, e.g. {SHARED_MEDIA / 'v15_real3dportrait_may_5s.mp4'}: its screenshots are not committable")
    parser.add_argument("--speech", type=Path, help="the driving speech instead of an Avatar World voice (first 1.2 s), "
                        f"e.g. {SHARED_MEDIA / 'a06_real3dportrait_obama_5s.wav'}")
    parser.add_argument("--screenshots", type=Path, help="where the screenshots and checks.txt go (default "
                        "bench/results/browser_check/, or <base-directory>/screenshots with --clip)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the render")
    parser.add_argument("--train-timeout", type=float, default=900.0,
                        help="seconds to wait for Train Avatar's first loss (every 10th step; a CPU step of the tiny "
                             "model takes 5-25 s) and again for its cancel")
    args = parser.parse_args()
    python = args.python or str(args.comfyui / "venv" / "bin" / "python")
    if args.screenshots is None:  # a real person's frames never land in the repository by default
        args.screenshots = args.base_directory / "screenshots" if args.clip else REPO / "bench" / "results" / "browser_check"
    reference = (f"reference {args.clip.name}" if args.clip else f"reference Avatar World person {WORLD_PERSON_SEED}") + \
        (f", speech {args.speech.name}" if args.speech else f", speech Avatar World voice {WORLD_VOICE_SEED}")

    fps = prepare_base(args.base_directory, args.pack_python, args.clip, args.speech)
    base_url = f"http://127.0.0.1:{args.port}"
    log_path = args.base_directory / "comfyui.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(args.port), "--disable-auto-launch",
             "--base-directory", str(args.base_directory)],
            cwd=args.comfyui, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
    check = Checks()
    try:
        object_info = wait_for_server(base_url, server, log_path)
        ours = [name for name in object_info if name.startswith("SparseAvatar")]
        check(len(ours) >= 10, f"ComfyUI on {base_url} loaded {len(ours)} sparse-avatar nodes")
        run_browser(args, base_url, args.base_directory, fps, check)
    except Exception as error:  # a failed wait or click: report it as a failed check
        check(False, f"{type(error).__name__}: {str(error)[:600]}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    failed = [what for ok, what in check.results if not ok]
    summary = f"{len(check.results) - len(failed)}/{len(check.results)} checks passed"
    print(f"{summary}; server log {log_path}; screenshots in {args.screenshots}")
    versions = _versions(base_url, log_path, args.chromium)
    args.screenshots.mkdir(parents=True, exist_ok=True)
    shrink_screenshots(args.screenshots, args.pack_python)
    (args.screenshots / "checks.txt").write_text(
        f"scripts/browser_check.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {versions}; {reference}\n"
        + "".join(("PASS " if ok else "FAIL ") + what + "\n" for ok, what in check.results) + summary + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
