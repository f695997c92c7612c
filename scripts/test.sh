#!/usr/bin/env bash
# Run the test suite in its own virtual environment (created and filled on first use).
# Usage: bash scripts/test.sh [pytest args...]   (GAB_TEST_WORKERS=N: N parallel workers, default 2; 0: none)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GAB_VENV:-.venv-test}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch/torchvision first and pinned: an unpinned resolve could pull a multi-GB build.
"$PY" -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
"$PY" -m pip install -q -c constraints.txt -e ".[test]"
# Offline: no weight, font, dataset or pip downloads (tests also set this themselves).
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false
export YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"
# Two workers (one thread each, see tests/conftest.py); a test file runs on one worker, so its module fixtures are
# built once. GAB_TEST_WORKERS=0 runs the suite in this process.
WORKERS="${GAB_TEST_WORKERS:-2}"
if [ "$WORKERS" -gt 0 ]; then
  exec "$PY" -m pytest -q -n "$WORKERS" --dist loadfile "$@"
fi
exec "$PY" -m pytest -q "$@"
