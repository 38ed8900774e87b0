#!/usr/bin/env bash
# GPU check at paper scale (105 px, 12 layers, batch 32), in <= 8 minutes on one H100/H200, offline,
# installing nothing (the machine must already have jax[cuda], equinox, optax, h5py, numba, click, tqdm,
# pillow, matplotlib). Needs the two Omniglot zips in $OMNIGLOT_DIR (default: .device/omniglot).
#
#   OMNIGLOT_DIR=/path/to/omniglot bash bench/gpu_check.sh [TRAIN_SECONDS]
#   P_BURSTY="0.9 0" bash bench/gpu_check.sh 180      # the burstiness contrast at paper scale
#
# 1. builds one bursty training set per p_bursty in $P_BURSTY (default 0.9) and fewshot_holdout /
#    no_support_zipfian eval sets (2048 sequences each);
# 2. prints the trainer benchmark at paper scale (ms/step, steps/s, GFLOP/s) for both kernel paths
#    (trainer/models/kernels.py: "xla" = XLA's own ops with autodiff, the GPU default; "custom" = the
#    hand-written backward passes chosen on the CPU), then one run against a vectorized group of $GROUP
#    (default 8) runs in one jitted step (bench/group_bench.py: ms/step, runs/hour at 500k steps);
# 3. trains the paper model for TRAIN_SECONDS (default 300) per p_bursty and prints ICL / IWL at each
#    evaluation (copies land in $OUT when set, e.g. on the device machine).
# Knobs for a dry run on a CPU: IMAGE_SIZE, LAYERS, BENCH_STEPS, DISPATCH, EVAL_SEQS, MIN_STEPS, WORK,
# GROUP, NUM_SEQS (training sequences per set, default 2000000), e.g.
#   IMAGE_SIZE=28 LAYERS=1 BENCH_STEPS=4 DISPATCH=2 GROUP=2 NUM_SEQS=20000 EVAL_SEQS=64 bash bench/gpu_check.sh 5
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OMNIGLOT_DIR="${OMNIGLOT_DIR:-.device/omniglot}"
TRAIN_SECONDS="${1:-300}"
P_BURSTY="${P_BURSTY:-0.9}"
WORK="${WORK:-/tmp/emergent-icl-gpu}"
OUT_DIR="${OUT:-$WORK}"
mkdir -p "$WORK" "$OUT_DIR"

python3 -c "import jax; print('devices:', jax.devices())"
for p in $P_BURSTY; do
  python3 -m seqgen build --type bursty --p-bursty "$p" --num-seqs "${NUM_SEQS:-2000000}" --seed 0 --out "$WORK/bursty-$p" \
    --omniglot "$OMNIGLOT_DIR" --cache-dir "$WORK/cache" --quiet
done
for t in fewshot_holdout no_support_zipfian; do
  python3 -m seqgen build --type "$t" --num-seqs 2048 --seed 1 --out "$WORK/$t" \
    --omniglot "$OMNIGLOT_DIR" --cache-dir "$WORK/cache" --quiet
done

BENCH_ARGS=(--image-size "${IMAGE_SIZE:-105}" --layers "${LAYERS:-12}" --batch 32 --steps "${BENCH_STEPS:-100}"
            --steps-per-dispatch "${DISPATCH:-50}" --omniglot "$OMNIGLOT_DIR" --cache-dir "$WORK/cache")
# The platform's default kernel path last: bench.txt (which sizes the training below) is what `fit` runs.
DEFAULT_PATH=$(python3 -c "from trainer.models.kernels import kernel_path; print(kernel_path())")
OTHER_PATH=$([ "$DEFAULT_PATH" = xla ] && echo custom || echo xla)
for path in "$OTHER_PATH" "$DEFAULT_PATH"; do
  echo "== kernel path $path"
  EMERGENT_ICL_KERNELS=$path python3 bench/trainer_bench.py "${BENCH_ARGS[@]}" | tee "$OUT_DIR/bench-$path.txt"
done
cp "$OUT_DIR/bench-$DEFAULT_PATH.txt" "$OUT_DIR/bench.txt"
echo "== vectorized group of ${GROUP:-8} (kernel path $DEFAULT_PATH)"
python3 bench/group_bench.py --group "${GROUP:-8}" "${BENCH_ARGS[@]}" | tee "$OUT_DIR/group.txt"

# Steps that fit in TRAIN_SECONDS at the measured speed (10 % margin for evaluations).
STEPS=$(python3 bench/gpu_curves.py steps "$OUT_DIR/bench.txt" "$TRAIN_SECONDS")
for p in $P_BURSTY; do
  echo "p_bursty $p: training $STEPS steps"
  rm -rf "$WORK/run-$p"
  timeout $((TRAIN_SECONDS * 2 + 120)) python3 -m trainer fit --train "$WORK/bursty-$p" \
    --eval "$WORK/fewshot_holdout" --eval "$WORK/no_support_zipfian" --run-dir "$WORK/run-$p" \
    --image-size "${IMAGE_SIZE:-105}" --num-layers "${LAYERS:-12}" --steps "$STEPS" --eval-every $(( STEPS / 5 > 0 ? STEPS / 5 : 1 )) --checkpoint-every "$STEPS" --log-every 100 \
    --steps-per-dispatch "${DISPATCH:-50}" --eval-seqs "${EVAL_SEQS:-2048}" --no-progress \
    --omniglot "$OMNIGLOT_DIR" --cache-dir "$WORK/cache" || true
  python3 bench/gpu_curves.py curves "$WORK/run-$p/metrics.jsonl" "p_bursty $p" | tee "$OUT_DIR/curves-$p.txt"
  cp "$WORK/run-$p/metrics.jsonl" "$OUT_DIR/metrics-$p.jsonl" 2>/dev/null || true
done
