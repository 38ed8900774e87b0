"""seqgen throughput: end-to-end shard building vs a straightforward per-sequence NumPy generator.

    python bench/seqgen_bench.py [--num-seqs 4000000] [--baseline-seqs 20000] [--workers 1]

Times `seqgen.build.build` (generation + HDF5 writes + fsync + sha256 of every shard + manifest) for
the paper's default bursty set into a temporary folder, after a warm-up (numba kernels compiled or
loaded from cache; the image-table fingerprint cached), and compares it with `baseline_bursty`: the
original `SeqGenerator.get_bursty_seq` algorithm (Chan et al. 2022) written plainly, one sequence at a
time with `np.random.Generator`, producing only class / label / exemplar indices (no images), as a
NumPy port of the original would. Uses the real Omniglot when found ($OMNIGLOT_DIR, ../shared/omniglot
or --omniglot), else the symbolic dataset of the same size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqgen.build import build
from seqgen.config import BuildConfig, DatasetConfig, ExampleType
from seqgen.sampling import warmup
from seqgen.split import ClassSplit, make_split


def baseline_bursty(cfg: BuildConfig, split: ClassSplit, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The original bursty algorithm, per sequence (labeling ordered; non-bursty zipfian)."""
    rng = np.random.default_rng(seed)
    sq = cfg.sequence
    L, shots, ways = sq.seq_len, sq.bursty_shots, sq.ways
    n_rem = L - shots * ways - 1
    n_rare, n_common = len(split.rare), len(split.common)
    pools = {  # classes, weights, label offset, is_rare
        "rare": (split.rare, np.full(n_rare, 1 / max(1, n_rare)), 0, 1),
        "common": (split.common, np.full(n_common, 1 / max(1, n_common)), n_rare, 0),
        "zipfian": (split.non_holdout, split.zipf_weights, 0, 0),
    }
    n_ex = cfg.dataset.exemplars_per_class
    out = {k: np.zeros((count, L), np.int32) for k in ("example", "label", "is_rare", "exemplar")}

    def random_seq(kind: str, n: int):
        classes, w, off, rare = pools[kind]
        idx = rng.choice(len(classes), size=n, replace=True, p=w)
        rng.shuffle(idx)
        return classes[idx], idx + off, np.full(n, rare)

    def fewshot_seq(kind: str):
        classes, w, off, rare = pools[kind]
        opts = rng.choice(len(classes), size=ways, replace=True, p=w)
        q = rng.integers(ways)
        idx = np.concatenate([np.tile(opts, shots), [opts[q]]])
        return classes[idx], idx + off, np.full(len(idx), rare)

    for r in range(count):
        if rng.random() < sq.p_bursty:
            u = rng.random()
            if u < sq.p_bursty_zipfian:
                fs, rem = fewshot_seq("zipfian"), random_seq("zipfian", n_rem)
            elif u < sq.p_bursty_zipfian + sq.p_bursty_common:
                fs, rem = fewshot_seq("common"), random_seq("rare", n_rem)
            else:
                fs, rem = fewshot_seq("rare"), random_seq("common", n_rem)
            ex, lab, rare = (np.concatenate([a, b]) for a, b in zip(rem, fs))
            order = rng.permutation(L - 1)
            ex[:-1], lab[:-1], rare[:-1] = ex[order], lab[order], rare[order]
        else:
            ex, lab, rare = random_seq("zipfian", L)
        exm = np.zeros(L, np.int32)
        if n_ex > 1:  # drawings without replacement within each class
            for c in np.unique(ex):
                m = ex == c
                exm[m] = rng.choice(n_ex, size=int(m.sum()), replace=False)
        out["example"][r], out["label"][r], out["is_rare"][r], out["exemplar"][r] = ex, lab, rare, exm
    return out


def _omniglot_dir(arg: str | None) -> Path | None:
    for c in (arg, os.environ.get("OMNIGLOT_DIR"), Path(__file__).resolve().parents[2] / "shared" / "omniglot"):
        if c and (Path(c) / "images_background.zip").is_file():
            return Path(c)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-seqs", type=int, default=4_000_000)
    ap.add_argument("--baseline-seqs", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--omniglot", default=None)
    ap.add_argument("--cache-dir", default="data/cache")
    ap.add_argument("--tmp-dir", default=None, help="Parent of the temporary output folder (default: system temp).")
    args = ap.parse_args()

    omniglot = _omniglot_dir(args.omniglot)
    dataset = DatasetConfig() if omniglot else DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=1623)
    cfg = BuildConfig(num_seqs=args.num_seqs, dataset=dataset)
    print(f"config: bursty, {cfg.num_seqs:,} sequences of length {cfg.length}, shard_size {cfg.shard_size:,}, "
          f"{'Omniglot ' + str(omniglot) if omniglot else 'symbolic (no Omniglot found)'}, workers {args.workers}")

    t = time.perf_counter()
    warmup()
    with tempfile.TemporaryDirectory() as d:  # fingerprint + kernels warm
        build(BuildConfig(num_seqs=1000, dataset=dataset), Path(d), omniglot_dir=omniglot,
              cache_dir=args.cache_dir, progress=False)
    print(f"warm-up (kernels, image-table fingerprint): {time.perf_counter() - t:.1f} s")

    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as d:
        t = time.perf_counter()
        res = build(cfg, Path(d), workers=args.workers, omniglot_dir=omniglot, cache_dir=args.cache_dir,
                    progress=False)
        seconds = time.perf_counter() - t
        size = sum(p.stat().st_size for p in Path(d).iterdir())
    assert res.finalized and len(res.built) == cfg.num_shards
    rate = cfg.num_seqs / seconds
    print(f"seqgen build: {cfg.num_seqs:,} sequences, {cfg.num_shards} shards, {size / 1e6:,.0f} MB in "
          f"{seconds:.2f} s = {rate:,.0f} sequences/s end to end")

    split = make_split(cfg)
    baseline_bursty(cfg, split, 200)  # warm
    t = time.perf_counter()
    baseline_bursty(cfg, split, args.baseline_seqs)
    b_seconds = time.perf_counter() - t
    b_rate = args.baseline_seqs / b_seconds
    print(f"baseline (per-sequence NumPy, indices only, no writes): {args.baseline_seqs:,} sequences in "
          f"{b_seconds:.2f} s = {b_rate:,.0f} sequences/s")
    print(f"speed-up: {rate / b_rate:,.0f}x  (targets: >= 1,000,000 sequences/s, >= 250x)")


if __name__ == "__main__":
    main()
