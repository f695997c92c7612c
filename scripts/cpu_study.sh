#!/usr/bin/env bash
# The CPU accuracy study (docs/RESULTS.md, docs/campaign/): 3 seeds, arms ptq / baseline / gab / gab_ada.
#   part yolov5n: preset=cpu-study from the shipped YOLOv5n (W4A4 and W3A3, LSQ and N2UQ)
#   part yolo11n: an FP YOLO11n trained here on the same generated set (not shipped: two models would exceed the
#                 package's 8 MB), then W4A4 LSQ from it
# Usage: bash scripts/cpu_study.sh [yolov5n|yolo11n|all] [out]   (rerun the same command to resume)
# Ultralytics trains on one thread on a 2-core CPU, so the two parts can run side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
OUT="${2:-runs/cpu-study}"
PY="${GAB_PY:-.venv-test/bin/python}"
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"

if [ "$PART" = yolov5n ] || [ "$PART" = all ]; then
  "$PY" -m ultralytics_gabfusion bench preset=cpu-study out="$OUT/yolov5n"
fi

if [ "$PART" = yolo11n ] || [ "$PART" = all ]; then
  FP_EPOCHS="${FP_EPOCHS:-25}"
  DATA="$OUT/yolo11n/data"
  # the shipped YOLOv5n's generated set (its card), so both models are measured on the same images
  "$PY" -c "from ultralytics_gabfusion import zoo; print(zoo.make_data('yolov5n-synth160', '$DATA'))"
  RUN="$PWD/$OUT/yolo11n/yolo11n-synth160"  # the bench labels the model by this folder
  if [ -f "$RUN/weights/last.pt" ] && "$PY" -c "import torch,sys; sys.exit(0 if torch.load('$RUN/weights/last.pt', weights_only=False).get('optimizer') is not None else 1)"; then
    "$PY" -m ultralytics_gabfusion train resume model="$RUN/weights/last.pt"
  elif [ ! -f "$RUN/weights/best.pt" ]; then
    "$PY" -m ultralytics_gabfusion train trainer=default model=yolo11n.yaml data="$DATA/data.yaml" imgsz=160 \
      epochs="$FP_EPOCHS" batch=16 optimizer=AdamW lr0=0.003 seed=0 deterministic=True workers=2 plots=False \
      project="$(dirname "$RUN")" name=yolo11n-synth160 exist_ok=True
  fi
  "$PY" -m ultralytics_gabfusion bench preset=cpu-study models="[$RUN/weights/best.pt]" data="$DATA/data.yaml" \
    methods=[lsq] bits=[4] out="$OUT/yolo11n/bench"
fi
