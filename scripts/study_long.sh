#!/usr/bin/env bash
# The longer study (docs/RESULTS.md): yolo-gab bench preset=study-long on a CPU, in two processes side by side
# (Ultralytics trains on one thread on a 2-core machine): one per bit-width, then W4A4 N2UQ (baseline, 3 seeds) in
# out/n2uq once the W4A4 part is done. Resumable: rerun the same command.
# Usage: bash scripts/study_long.sh [out]      then: bash scripts/study_long.sh [out] report
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="$(realpath -m "${1:-runs/study-long}")"
PY="${GAB_PY:-.venv-test/bin/python}"
export YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false YOLO_CONFIG_DIR="${YOLO_CONFIG_DIR:-$PWD/.yolo_config}"
"$PY" -c "from ultralytics_gabfusion.offline import setup_offline_env; setup_offline_env()"
bench() { "$PY" -m ultralytics_gabfusion bench preset=study-long workers=0 "$@"; }
n2uq() { bench methods=[n2uq] bits=[4] arms=[ptq,baseline] out="$OUT/n2uq" "$@"; }

if [ "${2:-}" = report ]; then  # the tables from whatever has finished (nothing is trained)
  bench report_only=True out="$OUT" || true
  n2uq report_only=True || true
  exit 0
fi
bench bits=[4] seeds=[0] arms=[ptq] out="$OUT"  # the generated set and the FP validation, before the processes start
(bench bits=[4] out="$OUT" || true; n2uq || true) > "$OUT/w4a4.log" 2>&1 &
bench bits=[3] out="$OUT" > "$OUT/w3a3.log" 2>&1 &
wait
bench report_only=True out="$OUT" || true
n2uq report_only=True || true
