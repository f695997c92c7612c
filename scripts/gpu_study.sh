#!/usr/bin/env bash
# preset=study-long on one GPU: every run in its own process, all at once, then the report from what finished.
# The generated set, the FP validation and one step-0 run come first, so the parallel processes never race on the data.
# Usage: bash scripts/gpu_study.sh OUT [key=value ...]   (extra keys go to every bench call, e.g. epochs=1 for a dry run)
#   BUDGET_S: seconds each run's process may take (default 420); GAB_PY: python (default python3); DEVICE (default 0)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="$(realpath -m "${1:?usage: gpu_study.sh OUT [key=value ...]}")"
shift
EXTRA=("$@")
PY="${GAB_PY:-python3}"
DEV="${DEVICE:-0}"
BUDGET_S="${BUDGET_S:-420}"
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"
mkdir -p "$OUT/logs"
COMMON=(preset=study-long device="$DEV" workers=1 qat_kernel=reference "${EXTRA[@]}")
bench() { "$PY" -m ultralytics_gabfusion bench "${COMMON[@]}" "$@"; }

bench bits=[4] seeds=[0] arms=[ptq] out="$OUT/study" > "$OUT/logs/prepare.log" 2>&1

pids=()
launch() {  # log name, nice level, bench keys
  local name="$1" level="$2"
  shift 2
  timeout "$BUDGET_S" nice -n "$level" "$PY" -m ultralytics_gabfusion bench "${COMMON[@]}" "$@" out="$OUT/study" \
    > "$OUT/logs/$name.log" 2>&1 &
  pids+=($!)
}
for b in 4 3; do
  for s in 0 1 2; do
    for a in baseline gab gab_ada; do
      launch "w${b}a${b}-s$s-$a" 0 bits=[$b] seeds=[$s] arms=[$a]
    done
  done
  launch "w${b}a${b}-step0" 5 bits=[$b] arms=[ptq,ptq_gab]  # every seed's start (the stability table needs them)
  launch "w${b}a${b}-s0-paper" 0 bits=[$b] seeds=[0] arms=[ptq_gab_paper,gab_paper]  # the paper's form: one seed
done
for p in "${pids[@]}"; do wait "$p"; done

# the report from the stored results (nothing is trained here)
bench report_only=True arms=[ptq,ptq_gab,ptq_gab_paper,baseline,gab,gab_ada,gab_paper] out="$OUT/study" \
  > "$OUT/logs/report.log" 2>&1
# weights, images and val folders stay here (only the numbers, curves and logs are needed back)
find "$OUT" -name "*.pt" -delete
find "$OUT" -type d \( -name data -o -name val \) -prune -exec rm -rf {} +
cat "$OUT/study/bench.md" 2>/dev/null
