#!/usr/bin/env bash
# GPU check at paper scale (105 px, 12 layers, batch 32), in <= 8 minutes on one H100/H200, offline,
# installing nothing (the machine must already have jax[cuda], equinox, optax, h5py, numba, click, tqdm,
# pillow, matplotlib). Needs the two Omniglot zips in $OMNIGLOT_DIR (default: .device/omniglot).
#
#   OMNIGLOT_DIR=/path/to/omniglot bash bench/gpu_check.sh [TRAIN_SECONDS]
#
# 1. builds a bursty training set (p_bursty 0.9) and fewshot_holdout / no_support_zipfian eval sets;
# 2. prints the trainer benchmark at paper scale (ms/step, steps/s, GFLOP/s);
# 3. trains the paper model for TRAIN_SECONDS (default 300) and prints ICL / IWL at each evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OMNIGLOT_DIR="${OMNIGLOT_DIR:-.device/omniglot}"
TRAIN_SECONDS="${1:-300}"
WORK="${WORK:-/tmp/emergent-icl-gpu}"
OUT_DIR="${OUT:-$WORK}"
mkdir -p "$WORK" "$OUT_DIR"

python3 -c "import jax; print('devices:', jax.devices())"
for t in bursty fewshot_holdout no_support_zipfian; do
  n=2000000; [ "$t" = bursty ] || n=4096
  seed=0; [ "$t" = bursty ] || seed=1
  python3 -m seqgen build --type "$t" --num-seqs "$n" --seed "$seed" --out "$WORK/$t" \
     --omniglot "$OMNIGLOT_DIR" --cache-dir "$WORK/cache" --quiet
done

python3 bench/trainer_bench.py --image-size 105 --layers 12 --batch 32 --steps "${BENCH_STEPS:-100}" --steps-per-dispatch "${DISPATCH:-50}" \
  --omniglot "$OMNIGLOT_DIR" --cache-dir "$WORK/cache" | tee "$OUT_DIR/bench.txt"

# Steps that fit in TRAIN_SECONDS at the measured speed (10 % margin for evaluations).
STEPS=$(python3 - "$OUT_DIR/bench.txt" "$TRAIN_SECONDS" <<'EOF'
import re, sys
rate = float(re.search(r"ours:\s+[\d.]+ ms/step\s+([\d.]+) steps/s", open(sys.argv[1]).read()).group(1))
print(max(100, int(rate * float(sys.argv[2]) * 0.9) // 100 * 100))
EOF
)
echo "training $STEPS steps"
rm -rf "$WORK/run"
timeout $((TRAIN_SECONDS * 2 + 120)) python3 -m trainer fit --train "$WORK/bursty" \
  --eval "$WORK/fewshot_holdout" --eval "$WORK/no_support_zipfian" --run-dir "$WORK/run" \
  --steps "$STEPS" --eval-every $((STEPS / 5)) --checkpoint-every "$STEPS" --log-every 100 \
  --steps-per-dispatch "${DISPATCH:-50}" --eval-seqs "${EVAL_SEQS:-2048}" --no-progress --omniglot "$OMNIGLOT_DIR" --cache-dir "$WORK/cache" || true
python3 - "$WORK/run/metrics.jsonl" <<'EOF' | tee "$OUT_DIR/curves.txt"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["kind"] == "eval":
        m = r["metrics"]["accuracy_closed" if r["seq_type"] == "fewshot_holdout" else "accuracy_query"]
        name = "ICL" if r["seq_type"] == "fewshot_holdout" else "IWL"
        print(f"step {r['step']:>7} {name} {m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] n={m['n']}")
    elif r["step"] % 1000 == 0:
        print(f"step {r['step']:>7} train loss {r['metrics']['loss']:.3f}")
EOF
cp "$WORK/run/metrics.jsonl" "$OUT_DIR/metrics.jsonl" 2>/dev/null || true
