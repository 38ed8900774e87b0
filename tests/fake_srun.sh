#!/bin/bash
# The tests' stand-in for `srun` (examples/slurm/*.sbatch): run SLURM_NTASKS copies of the command on
# this machine, with the variables srun gives each task (SLURM_PROCID, SLURM_LOCALID); srun's own options
# are ignored. Task i's pid, stdout and stderr go to $FAKE_SRUN_DIR/{pid,out,err}.i. Exit status: the
# first non-zero one of the tasks (0 when all succeed).
set -u
while [[ $# -gt 0 && "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$FAKE_SRUN_DIR/out.$i" 2> "$FAKE_SRUN_DIR/err.$i" &
  pids+=($!)
  echo $! > "$FAKE_SRUN_DIR/pid.$i"
done
rc=0
for p in "${pids[@]}"; do
  wait "$p"; s=$?
  if [[ $rc -eq 0 ]]; then rc=$s; fi
done
exit $rc
