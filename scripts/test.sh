#!/usr/bin/env bash
# The test command: sets up the venv if needed (no demo), then runs the CPU test suite.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${SPARSE_AVATAR_VENV:-.venv}"
if ! "$venv/bin/python" -c "import sparse_avatar, torch, pytest" 2>/dev/null; then
  bash scripts/setup.sh --no-demo
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$venv/bin/python" -m pytest -q -ra "$@" tests
