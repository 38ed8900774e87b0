"""What the trainer's shard checks cost: sha256 + value ranges of one shard vs. reading it and training on it.

    python bench/shard_check_bench.py [--rows 262144] [--ms-per-step 59.3] [--batch-size 32] [--repeats 5]

Builds one shard of the paper's default bursty set (262,144 sequences of 9 examples; class ids and labels
int16, as for the real Omniglot: the symbolic dataset of the same 1623 classes has the same bytes per
row) and times, as medians over `--repeats` runs in this process:
- `sha256`: `seqgen.shards.file_sha256` of the shard (what `ShardSet.verify_shard` does once per shard);
- `ranges`: `seqgen.shards.range_problems` over the whole shard (what the reader does per block);
- `read`: reading the shard's four datasets into int32 arrays (the reader's own work, the baseline).
An epoch of that shard is rows / batch size training steps; its compute time uses `--ms-per-step` (default:
the paper model at 28 px on this 2-core CPU, docs/speed.md; a GPU is faster, so pass its figure there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqgen import shards as fmt
from seqgen.build import build
from seqgen.config import BuildConfig, DatasetConfig, ExampleType


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1 << 18)
    ap.add_argument("--ms-per-step", type=float, default=59.3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = BuildConfig(num_seqs=args.rows, shard_size=args.rows,
                      dataset=DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=1623))
    with tempfile.TemporaryDirectory() as tmp:
        build(cfg, tmp, progress=False)
        path = Path(tmp) / fmt.shard_file(0)

        def read() -> dict[str, np.ndarray]:
            with h5py.File(path, "r") as f:
                return {k: np.asarray(f[k][()], np.int32) for k in fmt.INDEX_KEYS}

        data = read()
        t_sha = _median_seconds(lambda: fmt.file_sha256(path), args.repeats)
        t_rng = _median_seconds(lambda: fmt.range_problems(cfg, data), args.repeats)
        t_read = _median_seconds(read, args.repeats)
        size = path.stat().st_size
    epoch = args.rows / args.batch_size * args.ms_per_step / 1e3
    print(f"shard: {args.rows:,} rows, {size / 1e6:.1f} MB")
    print(f"sha256 {t_sha * 1e3:.1f} ms ({size / t_sha / 1e9:.2f} GB/s), value ranges {t_rng * 1e3:.1f} ms, "
          f"reading it {t_read * 1e3:.1f} ms  (medians of {args.repeats})")
    print(f"checks / reading = {(t_sha + t_rng) / t_read:.2f}x")
    print(f"one epoch of this shard = {args.rows / args.batch_size:,.0f} steps x {args.ms_per_step} ms = {epoch:,.0f} s; "
          f"checks = {(t_sha + t_rng) / epoch:.1e} of it ({(t_sha + t_rng) / (args.ms_per_step / 1e3):.2f} steps)")


if __name__ == "__main__":
    main()
