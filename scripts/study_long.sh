#!/usr/bin/env bash
# The longer study (docs/RESULTS.md): yolo-gab bench preset=study-long on a CPU, in two processes side by side
# (Ultralytics trains on one thread on a 2-core machine): one per bit-width. Seed 0 first with every arm, then seeds 1
# and 2 without the paper-form arm (one seed of it is what the study needs). Resumable: rerun the same command.
# Usage: bash scripts/study_long.sh [out]      then: bash scripts/study_long.sh [out] report
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$(realpath -m "${1:-runs/study-long}")"
PY="${GAB_PY:-.venv-test/bin/python}"
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"
bench() { "$PY" -m ultralytics_gabfusion bench preset=study-long workers=0 out="$OUT" "$@"; }

if [ "${2:-}" = report ]; then  # the table from whatever has finished (nothing is trained)
  bench report_only=True
  exit 0
fi
bench bits=[4] seeds=[0] arms=[ptq]  # the generated set and the FP validation, before the two processes start
part() {
  local b="$1"
  bench bits=["$b"] seeds=[0] || true
  bench bits=["$b"] seeds=[1,2] arms=[ptq,ptq_gab,ptq_gab_paper,baseline,gab,gab_ada] || true
}
part 4 > "$OUT/w4a4.log" 2>&1 &
part 3 > "$OUT/w3a3.log" 2>&1 &
wait
bench report_only=True || true
