"""Helpers of bench/gpu_check.sh.

    python bench/gpu_curves.py steps BENCH_TXT SECONDS   # training steps that fit in SECONDS (90 %)
    python bench/gpu_curves.py curves METRICS_JSONL LABEL   # ICL / IWL / loss lines of a run
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path


def steps(bench_txt: str, seconds: float) -> int:
    rate = float(re.search(r"ours:\s+[\d.]+ ms/step\s+([\d.]+) steps/s", open(bench_txt).read()).group(1))
    minimum = int(os.environ.get("MIN_STEPS", "100"))
    return max(minimum, int(rate * seconds * 0.9) // 100 * 100)


def curves(metrics: str, label: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trainer.metrics import column_of, metric_key_of  # ICL / IWL: the one definition

    if not os.path.isfile(metrics):
        print(f"{label}: no metrics.jsonl (the fit failed or ran out of time before its first log)")
        return
    for line in open(metrics):
        r = json.loads(line)
        if r["kind"] == "eval":
            m = r["metrics"][metric_key_of(r["seq_type"])]
            print(f"{label} step {r['step']:>7} {column_of(r['seq_type']).upper()} {m['mean']:.3f} "
                  f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] n={m['n']}")
        else:
            print(f"{label} step {r['step']:>7} train loss {r['metrics']['loss']:.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        print(steps(sys.argv[2], float(sys.argv[3])))
    else:
        curves(sys.argv[2], sys.argv[3])
