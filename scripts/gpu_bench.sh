#!/usr/bin/env bash
# One-shot GPU measurement (Ultralytics need not be installed: wheels in .whl/ are installed to /tmp/site first).
# Parts, in priority order; each writes its results under $OUT as soon as it finishes (JSON per part, every table
# appended to $OUT/summary.md; at most 7 files, logs stay in $WORK), so a timeout keeps what was done:
#   speed  training-step time and peak memory at 640 px, batch 32, AMP: YOLOv5s and YOLO11s, FP and each method
#          alone / +GABFusion / +GABFusion+ADA, reference and compiled fake-quant kernels; ratios to FP of the same
#          run; N2UQ at batch 32 must fit                                              -> $OUT/speed-<model>.json
#   lsq    YOLOv5s W4A4 LSQ on the generated 4,000/500 set at 512 px: one FP model trained there (fp_time budget),
#          then ptq / baseline / gab_ada with the same schedule, $QAT_EPOCHS (>= 6) QAT epochs each
#                                                                                       -> $OUT/lsq.json
#   n2uq   the same for N2UQ, from the same FP model (reused from the lsq part)         -> $OUT/n2uq.json
# Budget on one H100/H200 (measured on an H100: FP yolov5s 37 epochs in 242 s at batch 64 + AMP, ~6.5 s per epoch
# with validation; a W4A4 QAT epoch ~2x that): speed ~3 min, lsq ~5 min (FP 144 s + 3 arms x 6 epochs), n2uq ~3 min.
# Usage: OUT=/some/dir PARTS="speed lsq" bash scripts/gpu_bench.sh
#        GAB_BENCH_TINY=1 bash scripts/gpu_bench.sh     # the same flow at CI size on a CPU (checks the script itself)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/gpu-bench}"
WORK="${GAB_BENCH_WORK:-/tmp/gab-bench-work}"   # data and weights stay here: only reports are copied to $OUT
PARTS="${PARTS:-speed lsq n2uq}"
QAT_EPOCHS="${QAT_EPOCHS:-6}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$WORK"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # no wheels: use what this interpreter already has
fi
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR="$WORK/yolo_config" PYTHONUNBUFFERED=1
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()" || exit 1
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.txt"
git rev-parse HEAD >> "$OUT/device.txt" 2>/dev/null

if [ "${GAB_BENCH_TINY:-0}" = "1" ]; then
  SPEED=(device=cpu imgsz=64 batch=2 steps=1 warmup=0 methods=[lsq,n2uq] kernels=[reference])
  SPEED_MODELS="yolov5n"
  ACC=(device=cpu synth_train=16 synth_val=8 imgsz=64 fp_epochs=1 epochs=1 batch=8 workers=0)
else
  SPEED=(device=0 steps=12 warmup=3 methods=[lsq,lsqplus,pact,n2uq] arms=[fp,q,q+gab,q+gab+ada]
         kernels=[reference,compiled])
  SPEED_MODELS="yolov5s yolo11s"
  ACC=(device=0 synth_train=4000 synth_val=500 imgsz=512 batch=64 fp_epochs=60 fp_time=0.04 epochs="$QAT_EPOCHS"
       warmup_epochs=0)  # Ultralytics' 100-iteration warm-up floor would cover most of a short QAT run
fi
status=0

step() {  # step NAME LOG CMD...: run quietly, keep the full log, print only the elapsed time (and a tail on failure)
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc, $((SECONDS - t0)) s (log: $log)"
  if [ $rc -ne 0 ]; then tail -n 25 "$log"; status=1; fi
}

acc_part() {  # acc_part NAME METHOD: ptq / baseline / gab_ada from the shared FP model, reports copied to $OUT
  local name=$1 method=$2
  step "$name" "$WORK/$name.log" "$PY" -m ultralytics_gabfusion bench models=[yolov5s] methods=["$method"] bits=[4] \
    arms=[ptq,baseline,gab_ada] seeds=[0] "${ACC[@]}" out="$WORK/acc"   # one out dir: the FP run is reused
  [ -f "$WORK/acc/bench.json" ] && cp "$WORK/acc/bench.json" "$OUT/$name.json"
  [ "$name" = lsq ] && [ -f "$WORK/acc/curves.png" ] && cp "$WORK/acc/curves.png" "$OUT/$name-curves.png"
  [ -f "$WORK/acc/bench.md" ] && { echo; cat "$WORK/acc/bench.md"; } >> "$OUT/summary.md" \
    && sed -n '/^| model/,$p' "$WORK/acc/bench.md"
}

for part in $PARTS; do
  case $part in
    speed)
      for m in $SPEED_MODELS; do
        step "speed $m" "$WORK/speed-$m.log" "$PY" -m ultralytics_gabfusion bench speed models=["$m"] "${SPEED[@]}" \
          out="$WORK/speed-$m"
        [ -f "$WORK/speed-$m/speed.json" ] && cp "$WORK/speed-$m/speed.json" "$OUT/speed-$m.json"
        [ -f "$WORK/speed-$m/speed.md" ] && { echo; cat "$WORK/speed-$m/speed.md"; } >> "$OUT/summary.md" \
          && sed -n '/^| /,$p' "$WORK/speed-$m/speed.md"
      done ;;
    lsq) acc_part lsq lsq ;;
    n2uq) acc_part n2uq n2uq ;;
    *) echo "unknown part '$part' (use speed, lsq, n2uq)"; status=2 ;;
  esac
done
exit $status
