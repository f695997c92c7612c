#!/usr/bin/env bash
# preset=study-long and the ADA weight sweep on one GPU, the runs in parallel processes, then the reports.
# Each process is one (bits, seed) slice of the study or one sweep setting; all share the generated set, made first.
# Usage: bash scripts/gpu_study.sh OUT [key=value ...]   (extra keys go to every bench call, e.g. epochs=1 for a dry run)
#   BUDGET_S: seconds each training process may run (default 420); what finished by then is reported.
#   GAB_PY: python (default python3); DEVICE: bench device (default 0).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="$(realpath -m "${1:?usage: gpu_study.sh OUT [key=value ...]}")"
shift
EXTRA=("$@")
PY="${GAB_PY:-python3}"
DEV="${DEVICE:-0}"
BUDGET_S="${BUDGET_S:-420}"
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"
mkdir -p "$OUT/logs"
COMMON=(preset=study-long device="$DEV" workers=2 qat_kernel=reference "${EXTRA[@]}")
bench() { "$PY" -m ultralytics_gabfusion bench "$@"; }

# 1. the generated set, the FP validation and the first step-0 run (so parallel processes never race on the data)
bench "${COMMON[@]}" bits=[4] seeds=[0] arms=[ptq] out="$OUT/study" > "$OUT/logs/prepare.log" 2>&1
DATA=$(ls -d "$OUT"/study/data/synth-*/data.yaml | head -1)

# 2. the study, one process per (bits, seed), and the ADA sweep (W4A4 LSQ, +GABFusion+ADA, seed 0)
pids=()
for b in 4 3; do
  for s in 0 1 2; do
    timeout "$BUDGET_S" "$PY" -m ultralytics_gabfusion bench "${COMMON[@]}" bits=[$b] seeds=[$s] out="$OUT/study" \
      > "$OUT/logs/study-w${b}a${b}-s$s.log" 2>&1 &
    pids+=($!)
  done
done
sweep() {  # name, then keys
  local name="$1"
  shift
  timeout "$BUDGET_S" nice -n 5 "$PY" -m ultralytics_gabfusion bench "${COMMON[@]}" data="$DATA" bits=[4] seeds=[0] \
    arms=[gab_ada] workers=1 \
    "$@" out="$OUT/ada-sweep/$name" > "$OUT/logs/ada-sweep-$name.log" 2>&1 &
  pids+=($!)
}
# W4A4 N2UQ (lower priority: reported if it finishes in the budget)
for s in 0 1 2; do
  timeout "$BUDGET_S" nice -n 10 "$PY" -m ultralytics_gabfusion bench "${COMMON[@]}" data="$DATA" methods=[n2uq] bits=[4] \
    seeds=[$s] arms=[ptq,ptq_gab,baseline,gab,gab_ada] workers=1 out="$OUT/study-n2uq" > "$OUT/logs/n2uq-s$s.log" 2>&1 &
  pids+=($!)
done
# YOLO11n: an FP model trained here on the same set, its step-0 rows, then W4A4 LSQ baseline and +GABFusion (seed 0)
yolo11n() {
  local run="$OUT/yolo11n" w
  "$PY" -m ultralytics_gabfusion train trainer=default model=yolo11n.yaml data="$DATA" imgsz=160 \
    epochs="${YOLO11N_EPOCHS:-30}" batch=16 optimizer=AdamW lr0=0.003 seed=0 deterministic=True workers=2 plots=False \
    device="$DEV" project="$run" name=yolo11n-synth160 exist_ok=True
  w="$run/yolo11n-synth160/weights/best.pt"
  bench models="[$w]" data="$DATA" imgsz=160 batch=16 device="$DEV" workers=1 methods=[lsq] bits=[8,4] seeds=[0] \
    arms=[ptq,ptq_gab,ptq_gab_paper] out="$run/step0"
  bench models="[$w]" data="$DATA" imgsz=160 batch=16 device="$DEV" workers=1 methods=[lsq] bits=[4] seeds=[0] \
    arms=[ptq,baseline,gab] epochs=10 fraction=0.5 warmup_epochs=0 qat_kernel=reference "${EXTRA[@]}" out="$run/study"
}
timeout "$BUDGET_S" nice -n 5 bash -c "$(declare -f yolo11n bench); PY='$PY'; OUT='$OUT'; DATA='$DATA'; DEV='$DEV'; \
  EXTRA=(${EXTRA[*]}); yolo11n" > "$OUT/logs/yolo11n.log" 2>&1 &
pids+=($!)
sweep w0.01 ada=0.01
sweep w1 ada=1.0
sweep t1-w0.0004 ada=0.0004 ada_t=1.0  # softmax(S/1) at a weight giving about the default's gradient share
for p in "${pids[@]}"; do wait "$p"; done

# 3. reports from what finished (nothing is trained here)
bench "${COMMON[@]}" report_only=True out="$OUT/study" > "$OUT/logs/report-study.log" 2>&1
for d in "$OUT"/ada-sweep/*/; do
  n=$(basename "$d")
  case "$n" in
    w0.01) k=(ada=0.01) ;; w1) k=(ada=1.0) ;; t1-w0.0004) k=(ada=0.0004 ada_t=1.0) ;; *) continue ;;
  esac
  bench "${COMMON[@]}" data="$DATA" bits=[4] seeds=[0] arms=[gab_ada] "${k[@]}" report_only=True out="$d" \
    > "$OUT/logs/report-$n.log" 2>&1
done
bench "${COMMON[@]}" data="$DATA" methods=[n2uq] bits=[4] seeds=[0,1,2] arms=[ptq,ptq_gab,baseline,gab,gab_ada] \
  report_only=True out="$OUT/study-n2uq" > "$OUT/logs/report-n2uq.log" 2>&1
# weights, images and val folders stay here (only the numbers, curves and logs are needed back)
find "$OUT" -name "*.pt" -delete
find "$OUT" -type d \( -name data -o -name val \) -prune -exec rm -rf {} +
cat "$OUT/study/bench.md" 2>/dev/null
grep -E "^\| yolo" "$OUT/study-n2uq/bench.md" "$OUT"/yolo11n/*/bench.md 2>/dev/null
for d in "$OUT"/ada-sweep/*/; do grep -E "^\| .*ADA" "$d/bench.md" 2>/dev/null; done
