#!/usr/bin/env bash
# One command to set up sparse-avatar on a fresh machine and run its main job.
#   bash scripts/setup.sh            # venv + torch (the right build) + the pack, then the demo
#   bash scripts/setup.sh --no-demo  # install only
# Environment:
#   PYTHON=python3.11           the interpreter to build the venv from (default: python3)
#   SPARSE_AVATAR_VENV=.venv    where the venv goes
#   SPARSE_AVATAR_TORCH="torch==2.13.0"   the torch requirement used when torch is missing
#   SPARSE_AVATAR_TORCH_INDEX=URL         e.g. https://download.pytorch.org/whl/cpu for a CPU-only
#                                         torch on machines whose pip has no local CPU wheel
set -euo pipefail
cd "$(dirname "$0")/.."
run_demo=1
[ "${1:-}" = "--no-demo" ] && run_demo=0

venv="${SPARSE_AVATAR_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
py="$venv/bin/python"

# torch first and explicitly: a bare `torch` pulled in by another package can be a multi-GB CUDA
# build. An existing torch (CUDA or not) is left alone.
if "$py" -c "import torch" 2>/dev/null; then
  echo "[setup] torch $("$py" -c 'import torch; print(torch.__version__)') already installed; leaving it alone"
else
  spec="${SPARSE_AVATAR_TORCH:-torch==2.13.0}"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing $spec (CUDA build from the package index)"
    "$py" -m pip install -q "$spec"
  elif [ -n "${SPARSE_AVATAR_TORCH_INDEX:-}" ]; then
    echo "[setup] no GPU: installing $spec from $SPARSE_AVATAR_TORCH_INDEX"
    "$py" -m pip install -q "$spec" --index-url "$SPARSE_AVATAR_TORCH_INDEX"
  else
    echo "[setup] no GPU: installing $spec (CPU wheel where pip has one)"
    "$py" -m pip install -q "$spec"
  fi
fi

echo "[setup] installing sparse-avatar and its dependencies (editable, with test extras)"
"$py" -m pip install -q -e ".[dev]"

if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "[setup] note: espeak-ng is not installed; speech synthesis for Avatar World and some tests"
  echo "        needs it (Debian/Ubuntu: sudo apt-get install -y espeak-ng)."
fi

if [ "$run_demo" = 1 ]; then
  echo "[setup] running the main job: python -m sparse_avatar demo --out demo_output"
  "$py" -m sparse_avatar demo --out demo_output
fi
