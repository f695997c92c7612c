#!/usr/bin/env bash
# Train the FP starting model shipped in ultralytics_gabfusion/assets/ (YOLOv5n on the easier 160 px generated set)
# and publish it there with its card (command, data settings, seed, commit, sha256, val mAP).
# Usage: bash scripts/train_fp_model.sh [epochs]     (about 30-40 min on 2 CPU cores; rerun to resume or publish)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS="${1:-60}"
NAME=yolov5n-synth160
PY="${GAB_PY:-.venv-test/bin/python}"
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"
DATA=datasets/synth-fp160
DATA_KEYS="n_train=1000 n_val=200 imgsz=160 seed=0 max_objects=4 min_size=20"
"$PY" -m ultralytics_gabfusion synth out=$DATA train=1000 val=200 imgsz=160 seed=0 max_objects=4 min_size=20
RUN="$PWD/runs/fp-model/train"
TRAIN="yolo-gab train trainer=default model=yolov5n.yaml data=$DATA/data.yaml imgsz=160 epochs=$EPOCHS batch=16 \
optimizer=AdamW lr0=0.003 seed=0 deterministic=True workers=2 plots=False"
# best.pt holds optimizer state until the run ends: then resume, else train (or publish a finished run)
if [ -f "$RUN/weights/last.pt" ] && "$PY" -c "import torch,sys; sys.exit(0 if torch.load('$RUN/weights/last.pt', weights_only=False).get('optimizer') is not None else 1)"; then
  "$PY" -m ultralytics_gabfusion train resume model="$RUN/weights/last.pt"
elif [ ! -f "$RUN/weights/best.pt" ]; then
  ${TRAIN/yolo-gab/"$PY" -m ultralytics_gabfusion} project="$PWD/runs/fp-model" name=train exist_ok=True
fi
"$PY" -m ultralytics_gabfusion.zoo publish "$RUN" "$NAME" "bash scripts/train_fp_model.sh $EPOCHS  # = $TRAIN" $DATA_KEYS
