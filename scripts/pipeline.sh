#!/usr/bin/env bash
# The README's main command on a fresh machine: its own virtual environment, the offline set-up, then the demo
# benchmark: from the shipped FP YOLOv5n (ultralytics_gabfusion/assets/), regenerate its 160 px data set, W4A4 LSQ
# PTQ (and its step-0 twin with GABFusion), W4A4 LSQ QAT (baseline) and W4A4 LSQ + GABFusion + ADA, re-validate every arm like the FP model and print
# the table (runs/demo/bench.md, .json, .png, curves.png). A few minutes on 2 CPU cores once the environment exists;
# a GPU is used when present. preset=demo-scratch trains the FP model here instead.
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
# Offline: no weight, font, dataset or pip downloads (the demo needs none: its FP model ships, its data is generated).
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false
export YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"
# Later keys win, so "$@" can override the preset and out= (e.g. out=runs/other device=cpu).
exec "$PY" -m ultralytics_gabfusion bench preset=demo out=runs/demo "$@"
