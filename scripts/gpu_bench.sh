#!/usr/bin/env bash
# One-shot benchmark for a rented GPU box on which Ultralytics is NOT installed: the wheels travel in .whl/
# (ultralytics, its pure-Python dependencies, this plugin's dependencies; torch is expected on the box).
#   (a) training-step time and peak memory: FP vs LSQ, LSQ+, PACT, N2UQ, each alone / +GABFusion / +GABFusion+ADA
#       (640 px, batch 32, AMP; ratios to the FP step of the same run)            -> $OUT/speed/speed.{md,json}
#   (b) accuracy table on the generated 4,000/500 set at 512 px: yolov5s, W4A4, LSQ and N2UQ, arms baseline /
#       +GABFusion / +GABFusion+ADA from one FP checkpoint                          -> $OUT/acc/bench.{md,json,png}
# Budget (~8 minutes on one H100, measured there: FP yolov5s 37 epochs in 242 s at batch 64 + AMP, i.e. ~6.5 s per
# epoch with validation; a W4A4 QAT step costs ~2.2-2.8x an FP step):
#   data generation ~15 s; (a) ~13 arms x (build + 18 steps) ~75 s;
#   FP: fp_time=0.04 h = 144 s (Ultralytics' time mode fits ~20 epochs into it); FP is trained once, so a time
#       budget cannot bias the comparison;
#   QAT: a fixed 2 epochs per arm (6 arms x ~2 x 15 s ~ 180 s) and NO time= budget: in time mode a slower arm (ADA
#       runs a teacher forward) would get fewer epochs than the baseline and the table would not be like for like;
#   start-up, calibration, final evaluation and re-validation ~10 s per run (~70 s).  Total ~ 8 min.
# These are short schedules: the table shows where each arm lands after the same tiny budget, not converged numbers.
# Usage: OUT=/some/dir bash scripts/gpu_bench.sh
#        GAB_BENCH_TINY=1 bash scripts/gpu_bench.sh     # the same flow at CI size on a CPU (checks the script itself)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/gpu-bench}"
WORK="${GAB_BENCH_WORK:-/tmp/gab-bench-work}"   # data and weights stay here: only reports are copied to $OUT
PY="${PYTHON:-python3}"
mkdir -p "$OUT" "$WORK"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # no wheels: use what this interpreter already has
fi
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR="$WORK/yolo_config"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()" || exit 1
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF

if [ "${GAB_BENCH_TINY:-0}" = "1" ]; then
  SPEED=(device=cpu imgsz=64 batch=2 steps=1 warmup=0 methods=[lsq,n2uq])
  ACC=(device=cpu synth_train=16 synth_val=8 imgsz=64 fp_epochs=1 epochs=1 batch=8 workers=0)
else
  SPEED=(device=0 steps=15 warmup=3)
  ACC=(device=0 synth_train=4000 synth_val=500 imgsz=512 batch=64 fp_epochs=40 fp_time=0.04 epochs=2
       warmup_epochs=0.3)  # warm-up 0.3 of 2 epochs (the recipes' 1 epoch would be half of this QAT run)
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

step "speed" "$OUT/speed.log" "$PY" -m ultralytics_gabfusion bench speed "${SPEED[@]}" out="$OUT/speed"
[ -f "$OUT/speed/speed.md" ] && sed -n '/^| model/,$p' "$OUT/speed/speed.md"

step "accuracy" "$OUT/acc.log" "$PY" -m ultralytics_gabfusion bench models=[yolov5s] methods=[lsq,n2uq] bits=[4] \
  arms=[baseline,gab,gab_ada] seeds=[0] "${ACC[@]}" out="$WORK/acc"
mkdir -p "$OUT/acc"
for f in bench.md bench.json bench.png; do [ -f "$WORK/acc/$f" ] && cp "$WORK/acc/$f" "$OUT/acc/"; done
[ -d "$WORK/acc/results" ] && cp -r "$WORK/acc/results" "$OUT/acc/"
for d in "$WORK"/acc/runs/*/; do  # per-epoch curves and args of every run, without the weights
  [ -d "$d" ] || continue
  mkdir -p "$OUT/acc/runs/$(basename "$d")"
  cp "$d"/results.csv "$d"/args.yaml "$OUT/acc/runs/$(basename "$d")/" 2>/dev/null
done
[ -f "$OUT/acc/bench.md" ] && sed -n '/^| model/,$p' "$OUT/acc/bench.md"
exit $status
