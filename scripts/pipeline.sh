#!/usr/bin/env bash
# The README's main command on a fresh machine: its own virtual environment, the offline set-up, then the demo
# benchmark: generate the synthetic detection set, train the FP model, W4A4 LSQ QAT (baseline) and W4A4 LSQ +
# GABFusion + ADA from that FP checkpoint, re-validate all three and print the table (runs/demo/bench.md, .json,
# .png). About 4 minutes on 2 CPU cores; a GPU is used when present.
# Usage: bash scripts/pipeline.sh [bench keys, e.g. models=[yolov5s] epochs=10 out=runs/my-demo]
#        GAB_SKIP_INSTALL=1 GAB_VENV=.venv bash scripts/pipeline.sh    # reuse an environment that is already set up
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GAB_VENV:-.venv-demo}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if [ "${GAB_SKIP_INSTALL:-0}" != "1" ]; then
  "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch/torchvision first and pinned (as scripts/test.sh): an unpinned resolve could pull a multi-GB build.
  "$PY" -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
  "$PY" -m pip install -q -c constraints.txt -e .
fi
# Offline: no weight, font, dataset or pip downloads (the demo needs none: it generates its data, trains from scratch).
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false
export YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"
# Later keys win, so "$@" can override the preset and out= (e.g. out=runs/other device=cpu).
exec "$PY" -m ultralytics_gabfusion bench preset=demo out=runs/demo "$@"
