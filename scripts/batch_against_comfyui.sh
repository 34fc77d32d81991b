#!/usr/bin/env bash
# Run `python -m sparse_avatar batch` against a real ComfyUI with this pack loaded (CPU, ~6 minutes).
#
#   COMFYUI=/path/to/ComfyUI bash scripts/batch_against_comfyui.sh
#
# Environment:
#   COMFYUI        the ComfyUI checkout (required): the pack is linked into custom_nodes/ if missing,
#                  a tiny random checkpoint goes to models/avatar/batch-tiny.safetensors and a broken
#                  one to models/avatar/batch-broken.safetensors (to show a job refused and reported)
#   COMFY_PYTHON   ComfyUI's interpreter (default $COMFYUI/venv/bin/python)
#   SERVER         ComfyUI's address (default http://127.0.0.1:8188); if nothing answers there, the
#                  script starts `main.py --cpu` on that port and stops it at the end
#   WORK           scratch folder (default a new temporary one)
#
# What it does: makes a reference clip (the demo's synthetic talking face) and two speech files
# (espeak-ng), writes a jobs CSV for workflows_api/avatar_dub.api.json with three jobs (two
# renders, one with the broken checkpoint), runs batch (expects exit 1: two done, one refused at
# validation: ComfyUI answers HTTP 400, which is not retried because it would be refused again; the
# retry of a job that fails while running is tested against the stub server in tests/), checks the manifest and the downloaded videos, then runs batch again (expects the two
# finished jobs skipped and only the broken one queued again); then runs each of the three shipped
# workflows once (dub; personalize, then dub; generate with Mix Identity). Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
: "${COMFYUI:?set COMFYUI to the ComfyUI checkout}"
comfy_python="${COMFY_PYTHON:-$COMFYUI/venv/bin/python}"
server="${SERVER:-http://127.0.0.1:8188}"
py="${PYTHON:-$repo/.venv/bin/python}"
work="${WORK:-$(mktemp -d)}"
mkdir -p "$work"
echo "[batch-check] scratch folder $work"

[ -e "$COMFYUI/custom_nodes/sparse_avatar" ] || ln -s "$repo" "$COMFYUI/custom_nodes/sparse_avatar"
mkdir -p "$COMFYUI/models/avatar"
[ -f "$COMFYUI/models/avatar/batch-tiny.safetensors" ] || \
  "$py" -m sparse_avatar init-checkpoint --config tiny --out "$COMFYUI/models/avatar/batch-tiny.safetensors"
head -c 4096 /dev/urandom > "$COMFYUI/models/avatar/batch-broken.safetensors"
trap 'rm -f "$COMFYUI/models/avatar/batch-broken.safetensors"' EXIT

started_pid=""
if ! curl -sf "$server/system_stats" >/dev/null; then
  port="${server##*:}"
  echo "[batch-check] no ComfyUI at $server: starting one (log $work/comfyui.log)"
  (cd "$COMFYUI" && exec "$comfy_python" main.py --cpu --listen 127.0.0.1 --port "$port" --disable-auto-launch) \
    >"$work/comfyui.log" 2>&1 &
  started_pid=$!
  trap 'rm -f "$COMFYUI/models/avatar/batch-broken.safetensors"; kill "$started_pid" 2>/dev/null || true' EXIT
  for _ in $(seq 90); do curl -sf "$server/system_stats" >/dev/null && break; sleep 2; done
fi
# The server reads models/avatar when asked for /object_info; the new checkpoints are listed from now on.

"$py" -m sparse_avatar demo --out "$work/demo" --seconds 0.6 --reference-seconds 3 >/dev/null  # its reference.mp4: an Avatar World person
cp "$work/demo/reference.mp4" "$work/reference.mp4"
espeak-ng -w "$work/hello.wav" "Hello there, this is the first batch job."
espeak-ng -w "$work/bye.wav" "And this is the second one. Goodbye."
cat >"$work/jobs.csv" <<'CSV'
job,SparseAvatarLoadReferenceVideo.video,SparseAvatarLoadReferenceVideo.max_side,LoadAudio.audio,SparseAvatarLoadModel.checkpoint,SparseAvatarSampler.steps,SparseAvatarSampler.seed,SaveVideo.filename_prefix
hello,@reference.mp4,128,@hello.wav,batch-tiny.safetensors,2,1,sparse-avatar/batch_hello
bye,@reference.mp4,128,@bye.wav,batch-tiny.safetensors,2,2,sparse-avatar/batch_bye
broken,@reference.mp4,128,@bye.wav,batch-broken.safetensors,2,3,sparse-avatar/batch_broken
CSV

run_batch() {
  set +e
  "$py" -m sparse_avatar batch --workflow workflows_api/avatar_dub.api.json --jobs "$work/jobs.csv" \
    --server "$server" --out "$work/out" --timeout 600 "$@"
  status=$?
  set -e
}

echo "[batch-check] first run (expect: hello and bye done, broken refused at validation without a retry, exit 1)"
run_batch
[ "$status" = 1 ] || { echo "[batch-check] FAIL: exit $status, expected 1"; exit 1; }
"$py" - "$work/out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
jobs = json.loads((out / "manifest.json").read_text())["jobs"]
for name, entry in sorted(jobs.items()):
    print(f"  {name}: {entry['status']}, attempts {entry['attempts']}, outputs {entry.get('outputs')}, error {entry.get('error')}")
assert jobs["hello"]["status"] == jobs["bye"]["status"] == "done", jobs
broken = jobs["broken"]
assert broken["status"] == "failed" and broken["attempts"] == 0 and broken["error"].startswith("refused by ComfyUI"), broken
assert "batch-broken.safetensors is not a readable .safetensors file" in broken["error"], broken
for name in ("hello", "bye"):
    videos = [out / path for path in jobs[name]["outputs"] if path.endswith(".mp4")]
    assert videos and all(video.stat().st_size > 1000 for video in videos), jobs[name]
print("  manifest and downloaded videos as expected")
PY

echo "[batch-check] second run (expect: 2 already done, broken queued again, exit 1)"
run_batch --retries 0 >"$work/second_run.txt"
cat "$work/second_run.txt"
[ "$status" = 1 ] && grep -q "0 done, 2 already done, 1 failed" "$work/second_run.txt" \
  || { echo "[batch-check] FAIL: second run did not skip the finished jobs"; exit 1; }
"$py" -m sparse_avatar probe --no-faces "$work/out/hello/"*.mp4 | head -5

# Every shipped workflow once, on the tiny checkpoint with few steps: dub, personalize (Train Avatar
# for 3 steps) then dub, and generate with Mix Identity (B: a second clip).
# Seed 3: a ComfyUI venv with only requirements.txt has no mediapipe, so the Haar fallback tracks,
# and Haar finds some drawn Avatar World faces (seeds 0 and 3) but not others (1 and 2).
"$py" -m sparse_avatar demo --out "$work/demo_b" --seconds 0.6 --reference-seconds 2 --seed 3 >/dev/null
cp "$work/demo_b/reference.mp4" "$work/motion.mp4"
printf '%s\n' "job,1.video,1.max_side,2.audio,4.checkpoint,6.steps" \
  "dub,@reference.mp4,128,@hello.wav,batch-tiny.safetensors,2" >"$work/dub.csv"
printf '%s\n' "job,1.video,1.max_side,2.audio,4.checkpoint,5.steps,5.minutes,5.filename_prefix,5.allow_cpu,7.steps" \
  "personalize,@reference.mp4,128,@hello.wav,batch-tiny.safetensors,3,1,batch_personalized,true,2" >"$work/personalize.csv"
printf '%s\n' "job,1.video,1.max_side,9.video,9.max_side,2.audio,4.checkpoint,6.steps" \
  "generate,@reference.mp4,128,@motion.mp4,128,@bye.wav,batch-tiny.safetensors,2" >"$work/generate.csv"
for name in dub personalize generate; do
  echo "[batch-check] workflows_api/avatar_$name.api.json"
  "$py" -m sparse_avatar batch --workflow "workflows_api/avatar_$name.api.json" --jobs "$work/$name.csv" \
    --server "$server" --out "$work/out_$name" --timeout 600 --no-progress
done
echo "[batch-check] OK: outputs in $work/out and $work/out_{dub,personalize,generate}"
