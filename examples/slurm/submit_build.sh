#!/bin/bash
# Submit a ranged shard build as a job array of TASKS tasks, and its finalize step after all of them.
#   OUT=/shared/shards/bursty NUM_SEQS=4000000 TASKS=8 [SHARD_SIZE=262144] [SEQGEN_ARGS="--type bursty"] bash submit_build.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${OUT:?}" "${NUM_SEQS:?}" "${TASKS:?}"
export OUT NUM_SEQS SHARD_SIZE="${SHARD_SIZE:-262144}" SEQGEN_ARGS="${SEQGEN_ARGS:-}"
job=$(sbatch --parsable --export=ALL --array=0-$((TASKS - 1)) "$here/build_shards.sbatch")
sbatch --export=ALL --dependency=afterok:"$job" "$here/finalize_shards.sbatch"
