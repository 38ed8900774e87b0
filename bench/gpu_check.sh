#!/usr/bin/env bash
# The GPU check as one command (what it measures and writes: bench/gpu_check.py's docstring). Offline,
# installing nothing; <= 8 minutes on one H100 / H200 by design (sections that would start after
# --budget-s, default 450 s, are skipped and say so).
#
#   bash bench/gpu_check.sh [--omniglot DIR] [--out results/bench] [--budget-s 450] [--sections a,b,...]
#   bash bench/gpu_check.sh --cpu-dry-run --omniglot DIR --out /tmp/check    # every section, tiny, on the CPU
#
# Omniglot: the two zips in --omniglot DIR, else $OMNIGLOT_DIR, else .device/omniglot (git-ignored: the
# device machine gets only the checkout, so carry that folder along). The shard sets are built on the
# machine. $PYTHON picks the interpreter (default python3); with $OUT set (the device machine's result
# folder) the report is written there too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ALSO=()
if [ -n "${OUT:-}" ]; then ALSO=(--also "$OUT"); fi
exec "${PYTHON:-python3}" bench/gpu_check.py "${ALSO[@]}" "$@"
