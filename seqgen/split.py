"""Rare / common / holdout split of the dataset classes, and the Zipf weights over rare + common.

Exactly the original `SeqGenerator.__init__` (Chan et al. 2022, datasets/data_generators.py):

- `ordering = np.random.default_rng(split_seed).choice(range(n), size=n, replace=False)` over the `n`
  dataset classes, or, with `preserve_ordering_every_n = g`, the same permutation of the `n / g` blocks
  of `g` consecutive classes (so e.g. the 8 augmentations of a character stay on one side of the split);
- rare = the first `n_rare`, common = the next `n_common`, holdout = the LAST `n_holdout` of the ordering
  (so the holdout classes do not move when `n_rare` / `n_common` change);
- Zipf weights over rare + common (in that order): `1 / j**a` for `j = n_non_holdout, ..., 1`, normalised,
  so the last (common) classes are the most frequent.

The split depends only on the dataset and split options, never on the sequence type, so every shard set
built from the same dataset + split config (training and all evaluation types) agrees on it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from seqgen.config import BuildConfig
from seqgen.configio import ConfigError


@dataclass(frozen=True, eq=False)
class ClassSplit:
    """Dataset class ids of each pool (int64, read-only) and the Zipf weights over `non_holdout`."""

    rare: np.ndarray
    common: np.ndarray
    holdout: np.ndarray
    non_holdout: np.ndarray  # rare followed by common
    zipf_weights: np.ndarray  # float64, sums to 1, one per non_holdout class

    @property
    def zipf_weights_sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.zipf_weights, dtype="<f8").tobytes()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the shard manifest."""
        return {
            "rare": [int(c) for c in self.rare],
            "common": [int(c) for c in self.common],
            "holdout": [int(c) for c in self.holdout],
            "zipf_weights_sha256": self.zipf_weights_sha256,
        }


def class_ordering(num_classes: int, split_seed: int, preserve_ordering_every_n: int | None) -> np.ndarray:
    """The original's fixed-seed permutation of the dataset classes."""
    rng = np.random.default_rng(split_seed)
    g = preserve_ordering_every_n
    if g:
        if num_classes % g:
            raise ConfigError(f"preserve_ordering_every_n={g} must divide the {num_classes} dataset classes")
        n_groups = num_classes // g
        group_order = rng.choice(range(n_groups), size=n_groups, replace=False)
        return np.arange(num_classes).reshape(n_groups, g)[group_order].reshape(num_classes)
    return np.asarray(rng.choice(range(num_classes), size=num_classes, replace=False))


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    """`1 / j**exponent` for j = n..1, normalised (the original's Python-float formula)."""
    try:
        w = np.array([1 / j**exponent for j in range(n, 0, -1)], dtype=np.float64)
    except (OverflowError, ZeroDivisionError):
        raise ConfigError(f"zipf_exponent={exponent} overflows for {n} classes; use a smaller exponent") from None
    total = np.sum(w)
    if n and not total > 0:
        raise ConfigError(f"zipf_exponent={exponent} underflows for {n} classes; use a smaller exponent")
    if n:
        w /= total
    return w


def make_split(cfg: BuildConfig) -> ClassSplit:
    """Split the dataset classes of `cfg` (validated first) into rare / common / holdout pools."""
    sp = cfg.split
    n = cfg.dataset.num_dataset_classes
    if sp.n_classes > n:
        raise ConfigError(
            f"rare+common+holdout = {sp.n_classes} classes but the dataset has only {n}; "
            "lower n_rare_classes / n_common_classes / n_holdout_classes"
        )
    order = class_ordering(n, sp.split_seed, sp.preserve_ordering_every_n).astype(np.int64)
    n_rare, n_common = sp.n_rare_classes, sp.n_common_classes
    rare = order[:n_rare]
    common = order[n_rare : n_rare + n_common]
    holdout = order[n - sp.n_holdout_classes :]
    non_holdout = np.concatenate([rare, common])
    weights = zipf_weights(len(non_holdout), sp.zipf_exponent)
    arrays = [np.array(a) for a in (rare, common, holdout, non_holdout, weights)]
    for a in arrays:
        a.setflags(write=False)
    return ClassSplit(*arrays)
