#!/usr/bin/env bash
# Train the FP starting model shipped in ultralytics_gabfusion/assets/ (YOLOv5n on the easier 160 px generated set).
# Usage: bash scripts/train_fp_model.sh [epochs]     (CPU: ~30-60 min on 2 cores; resumable: rerun to continue)
# Writes runs/fp-model/train/ and, when training has finished, the asset and its card via
# `python -m ultralytics_gabfusion.assets publish`.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${1:-60}"
PY="${GAB_PY:-.venv-test/bin/python}"
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"
DATA=datasets/synth-fp160
"$PY" -m ultralytics_gabfusion synth out=$DATA train=1000 val=200 imgsz=160 seed=0 max_objects=4 min_size=20
RUN="$PWD/runs/fp-model/train"
if [ -f "$RUN/weights/last.pt" ] && [ ! -f "$RUN/weights/best.pt" -o "$RUN/weights/last.pt" -nt "$RUN/weights/best.pt" ] \
   && "$PY" -c "import torch,sys; c=torch.load('$RUN/weights/last.pt',weights_only=False); sys.exit(0 if c.get('epoch',-1)>=0 else 1)"; then
  "$PY" -m ultralytics_gabfusion train resume model="$RUN/weights/last.pt"
elif [ ! -f "$RUN/weights/best.pt" ]; then
  "$PY" -m ultralytics_gabfusion train trainer=default model=yolov5n.yaml data=$DATA/data.yaml imgsz=160 \
      epochs="$EPOCHS" batch=16 optimizer=AdamW lr0=0.003 seed=0 deterministic=True workers=2 \
      project="$PWD/runs/fp-model" name=train exist_ok=True plots=False
fi
