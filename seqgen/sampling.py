"""Sequence sampling: the public wrapper around the numba kernels of `seqgen.kernels`.

`generate(cfg, split, start, count)` returns rows `start .. start+count-1` of the shard set described by
`cfg`. Row `i` is a pure function of `(cfg, i)` (counter-based RNG, `seqgen.rng`), so any slicing of a set
into shards or batches gives the same rows, with any number of threads.

Semantics follow the original `SeqGenerator` (Chan et al. 2022, datasets/data_generators.py) and the
generator / labeling that its `Experiment._get_ds_seqs` picks for each sequence type:

- bursty: with probability p_bursty a few-shot block (`bursty_shots*ways` support + query) drawn from
  zipfian / common / rare classes (p_bursty_zipfian, p_bursty_common, rest), plus a random "remainder"
  (zipfian / rare / common), remainder first, then everything but the query shuffled; otherwise a
  non-bursty sequence (non_bursty_type). Labels: labeling_rare for the rare and zipfian parts,
  labeling_common for the common parts; polysemy X > 1 (the original's `ordered_polysemyX`) gives rare
  class k the labels k*X .. k*X+X-1 (one drawn per few-shot class / remainder example) and every
  labeling_common part the labels `index + n_rare*X` (the original's `ordered{n_rare*X}`); a zipfian
  (rare + common) part labels each class as its own pool does (deviation below).
- no_support_{common,rare,zipfian}: query class first (by the pool's weights), support from the other
  classes with replacement (renormalised weights); labeling_common (as the original; no polysemy shift).
- fewshot_{common,rare,zipfian,holdout}: `ways` classes drawn with replacement, `fs_shots` each, a query
  among them, support shuffled (within blocks of `ways` when grouped); labels 0..ways-1 ('unfixed').
- mixed: with p_fewshot a rare few-shot sequence (unfixed), else a random common sequence (ordered).

Strategy evaluations (beyond the paper; not in the original code):
- flip: `ways` DISTINCT trained classes (zipfian pool, by the Zipf weights: the training distribution),
  `fs_shots` each, a query among them; the in-context labels are a uniform derangement of the ways'
  trained labels (with 2 ways, the swap), so no class shows its trained label and following the context
  and following the weights give different answers (the query's stored label is its in-context label;
  its trained label is `trained_label_table(...)[query class]`). This is the "flip" relabelling of
  Singh et al.'s icl-dynamics (`samplers.fewshot_fliplabels`: the query's class and a distractor class,
  both trained, swap their trained labels; the `flip_icl` evaluator of Singh et al. 2025, "Strategy
  coopetition"), generalised from 2 to `ways` classes.
- copy_available: the same sequences with every class under its TRAINED label, so copying the label from
  the context and recalling it from the weights agree; its accuracy against `no_support_zipfian` (the
  query's class absent from the context) separates the two. Note: icl-dynamics' `iwl_copy_avail`
  evaluator is a different sequence (the query's class absent, its trained label attached to another
  class's exemplar in the context: `assign_query_label_random`); ours is the one the issue asks for.
  Trained labels follow the training sets' labeling (`labeling_common` = `labeling_rare`: ordered = the
  index in rare + common, original = the class id); polysemy > 1 is refused (no single trained label).

Exemplars (Omniglot with `exemplars = all`): the drawings of a class are drawn without replacement
within the whole sequence; otherwise the exemplar is 0.

Deviations from the original (each where it crashes, is ill-defined, or differs only in random order):
- exemplars are distinct over the whole sequence; the original draws the remainder and the few-shot
  block of a bursty sequence separately, so a class in both could show one drawing twice;
- a class that could occur more often than it has drawings, labeling_rare = unfixed for a zipfian / rare
  remainder: ConfigError up front (the original raises mid-stream), see `check_supported`;
- a common few-shot block under polysemy (p_bursty_common > 0) is labelled `index + n_rare*X` (the
  original's get_fewshot_seq rejects its own 'ordered{K}' labeling);
- use_zipf_for_common_rare: the original normalises slices of its Zipf weights in place, corrupting them
  for later zipfian draws; here they stay intact;
- the few-shot block of a bursty sequence is not shuffled before the whole support is (same distribution;
  `grouped` therefore has no effect on bursty sequences, as in the original);
- polysemy X > 1 with a zipfian pool (non-bursty zipfian sequences, p_bursty_zipfian > 0): the original
  labels zipfian index i as `i*X + draw` (few-shot / remainder) or `i + n_rare*X` (non-bursty), which for
  common members and beyond overruns its own num_labels = X*n_rare + n_common (labels up to
  (n_rare + n_common)*X - 1, or n_rare*X + n_rare + n_common - 1) and gives one label to two classes;
  here a rare member i gets `i*X + draw` and common member n_rare + j the common label `n_rare*X + j`,
  as in every other part of the sequence (mode ZIPF_POLYSEMY, one draw per example either way);
- randomly_generate_rare only adds `noise_seed`: the trainer draws the random rare images from it
  (exemplars are still drawn, and unused for those classes).
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable

import numpy as np

from seqgen import kernels as K
from seqgen.config import BuildConfig, Labeling, NonBurstyType, SeqType, SplitConfig
from seqgen.configio import ConfigError
from seqgen.rng import base_key
from seqgen.seqtypes import SPECS, Layout
from seqgen.split import ClassSplit, zipf_weights

# Fixed per-type tags (`seqgen.seqtypes`): sets of different types built from the same seed are independent.
SEQ_TYPE_TAGS: dict[SeqType, int] = {t: s.tag for t, s in SPECS.items()}

_POOL_OF = {"rare": K.RARE, "common": K.COMMON, "holdout": K.HOLDOUT, "zipfian": K.ZIPFIAN}


def pool_weights(split: ClassSplit, sp: SplitConfig) -> list[np.ndarray]:
    """Class weights of the rare, common, holdout and zipfian pools (the original `_get_classes_to_sample`).

    With use_zipf_for_common_rare the rare / common weights are the normalised slices of the Zipf weights.
    (The original normalises those slices in place, which corrupts its zipfian weights for later calls;
    here the Zipf weights stay intact.)"""
    def uniform(n: int) -> np.ndarray:
        return np.full(n, 1 / n) if n else np.zeros(0)

    n_rare = len(split.rare)
    if sp.use_zipf_for_common_rare:
        rare, common = split.zipf_weights[:n_rare].copy(), split.zipf_weights[n_rare:].copy()
        rare = rare / np.sum(rare) if len(rare) else rare
        common = common / np.sum(common) if len(common) else common
    else:
        rare, common = uniform(n_rare), uniform(len(split.common))
    return [rare, common, uniform(len(split.holdout)), np.array(split.zipf_weights, dtype=np.float64)]


def _pools(split: ClassSplit, sp: SplitConfig):
    classes = [split.rare, split.common, split.holdout, split.non_holdout]
    weights = pool_weights(split, sp)
    n = np.array([len(c) for c in classes], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int64)
    uniform = np.array([len(w) > 0 and bool(np.all(w == w[0])) for w in weights], dtype=np.bool_)
    all_classes = np.concatenate([np.asarray(c, dtype=np.int64) for c in classes])
    cdf = np.concatenate([np.cumsum(w) for w in weights]).astype(np.float64)
    return all_classes, cdf, off, n, uniform, weights


def _ordered(pool: int, sp: SplitConfig) -> tuple[int, int, int]:
    offset = {K.RARE: 0, K.ZIPFIAN: 0, K.COMMON: sp.n_rare_classes,
              K.HOLDOUT: sp.n_rare_classes + sp.n_common_classes}[pool]
    return (K.ORDERED, offset, 1)


def _bursty_labels(cfg: BuildConfig) -> np.ndarray:
    """The (mode, K, X) table of the bursty sub-generators, resolved as the original's get_bursty_seq."""
    sp, sq = cfg.split, cfg.sequence
    X = sq.polysemy

    def common(pool: int) -> tuple[int, int, int]:
        if X > 1 and pool == K.ZIPFIAN:  # the original's ordered{n_rare*X} would overrun num_labels here
            return (K.ZIPF_POLYSEMY, sp.n_rare_classes, X)
        if X > 1:  # the original overrides labeling_common with f"ordered{n_rare * X}"
            return (K.ORDERED, sp.n_rare_classes * X, 1)
        return (K.ORIGINAL, 0, 1) if sq.labeling_common is Labeling.ORIGINAL else _ordered(pool, sp)

    def rare(pool: int) -> tuple[int, int, int]:
        if X > 1 and pool == K.ZIPFIAN:  # rare members polysemous, common members their common label
            return (K.ZIPF_POLYSEMY, sp.n_rare_classes, X)
        if X > 1:
            return (K.POLYSEMY, 0, X)
        return {Labeling.ORIGINAL: (K.ORIGINAL, 0, 1), Labeling.UNFIXED: (K.UNFIXED, 0, 1)}.get(
            sq.labeling_rare, _ordered(pool, sp))

    labs = np.zeros((7, 3), dtype=np.int64)
    nb_pool = K.ZIPFIAN if sq.non_bursty_type is NonBurstyType.ZIPFIAN else K.COMMON
    labs[K.NB] = common(nb_pool)
    labs[K.FS_RARE], labs[K.REM_COMMON] = rare(K.RARE), common(K.COMMON)
    labs[K.FS_COMMON], labs[K.REM_RARE] = common(K.COMMON), rare(K.RARE)
    labs[K.FS_ZIPF], labs[K.REM_ZIPF] = rare(K.ZIPFIAN), rare(K.ZIPFIAN)
    return labs


def max_class_repeats(cfg: BuildConfig) -> int:
    """The most times one class can occur in a sequence of this config."""
    if cfg.seq_type.is_no_support:
        return cfg.length - 1  # the query class never occurs in the support
    return cfg.length


@functools.lru_cache(maxsize=16)
def _zipf_sha256(n: int, exponent: float) -> str:
    w = zipf_weights(n, exponent)
    return hashlib.sha256(np.ascontiguousarray(w, dtype="<f8").tobytes()).hexdigest()


def check_supported(cfg: BuildConfig, split: ClassSplit) -> None:
    """ConfigError for options that the original cannot generate (it crashes) or that need more data."""
    sp, sq, t = cfg.split, cfg.sequence, cfg.seq_type
    sizes = (len(split.rare), len(split.common), len(split.holdout))
    ids = np.concatenate([split.non_holdout, split.holdout])
    if (sizes != (sp.n_rare_classes, sp.n_common_classes, sp.n_holdout_classes)
            or (len(ids) and not 0 <= ids.min() <= ids.max() < cfg.dataset.num_dataset_classes)
            or split.zipf_weights_sha256 != _zipf_sha256(sp.n_rare_classes + sp.n_common_classes, sp.zipf_exponent)):
        raise ConfigError(f"the class split (rare, common, holdout = {sizes}) was not made from this config; "
                          "build it with seqgen.split.make_split(cfg)")
    n_ex = cfg.dataset.exemplars_per_class
    if n_ex > 1 and max_class_repeats(cfg) > n_ex:
        raise ConfigError(
            f"a class can occur {max_class_repeats(cfg)} times in a {t.value} sequence but has only {n_ex} "
            "exemplars (drawn without replacement); shorten the sequence or use exemplars = single/separated"
        )
    if t is SeqType.BURSTY and sq.labeling_rare is Labeling.UNFIXED and sq.p_bursty > 0:
        remainder = sq.seq_len > sq.bursty_shots * sq.ways + 1
        if remainder and (sq.p_bursty_zipfian > 0 or sq.p_bursty_common > 0):
            raise ConfigError(
                "labeling_rare = unfixed cannot label the zipfian / rare remainder of bursty sequences "
                "(the original fails); use labeling_rare = ordered, or seq_len = bursty_shots*ways+1, "
                "or p_bursty_zipfian = p_bursty_common = 0"
            )


def generate(cfg: BuildConfig, split: ClassSplit, start: int, count: int) -> dict[str, np.ndarray]:
    """Rows start .. start+count-1 of the set: example/label int32, exemplar/is_rare uint8 [count, length],
    and noise_seed uint32 [count] when cfg.needs_noise_seed."""
    cfg.validate()
    if start < 0 or count < 0:
        raise ConfigError(f"start and count must be >= 0, got start={start}, count={count}")
    check_supported(cfg, split)
    sp, t = cfg.split, cfg.seq_type
    L = cfg.length
    out = {
        "example": np.zeros((count, L), dtype=np.int32),
        "exemplar": np.zeros((count, L), dtype=np.uint8),
        "label": np.zeros((count, L), dtype=np.int32),
        "is_rare": np.zeros((count, L), dtype=np.uint8),
    }
    classes, cdf, off, n, uniform, _ = _pools(split, sp)
    pools = (classes, cdf, off, n, uniform)
    base = base_key(cfg.seed, SEQ_TYPE_TAGS[t])
    n_ex = cfg.dataset.exemplars_per_class
    arrays = (out["example"], out["label"], out["is_rare"], out["exemplar"])
    with np.errstate(over="ignore"):  # uint64 wrap-around is intended (matters under NUMBA_DISABLE_JIT)
        if count:
            LAYOUTS[SPECS[t].layout](cfg, base, start, pools, n_ex, arrays)
        lab = out["label"]
        if count and (lab.min() < 0 or lab.max() >= cfg.num_labels):  # the stored dtype holds [0, num_labels)
            raise RuntimeError(f"internal error: {t.value} labels in [{lab.min()}, {lab.max()}] overrun "
                               f"num_labels={cfg.num_labels}")
        if cfg.needs_noise_seed:
            out["noise_seed"] = np.zeros(count, dtype=np.uint32)
            if count:
                K._noise_seed_kernel(base, start, out["noise_seed"])
    return out


def _bursty(cfg: BuildConfig, base: np.uint64, start: int, pools: tuple, n_ex: int, arrays: tuple) -> None:
    sq = cfg.sequence
    nb_kind = {NonBurstyType.ZIPFIAN: K.NB_ZIPFIAN, NonBurstyType.COMMON_UNIFORM: K.NB_COMMON_UNIFORM,
               NonBurstyType.COMMON_NO_SUPPORT: K.NB_COMMON_NO_SUPPORT}[sq.non_bursty_type]
    K._bursty_kernel(base, start, cfg.length, sq.bursty_shots, sq.ways, sq.p_bursty, sq.p_bursty_zipfian,
                     sq.p_bursty_common + sq.p_bursty_zipfian, nb_kind, _bursty_labels(cfg), *pools, n_ex, *arrays)


def _no_support(cfg: BuildConfig, base: np.uint64, start: int, pools: tuple, n_ex: int, arrays: tuple) -> None:
    pool = _POOL_OF[SPECS[cfg.seq_type].pool]
    lab = (np.array((K.ORIGINAL, 0, 1)) if cfg.sequence.labeling_common is Labeling.ORIGINAL
           else np.array(_ordered(pool, cfg.split))).astype(np.int64)
    K._no_support_kernel(base, start, pool, lab, *pools, n_ex, *arrays)


def _strategy(cfg: BuildConfig, base: np.uint64, start: int, pools: tuple, n_ex: int, arrays: tuple) -> None:
    sq = cfg.sequence
    K._strategy_kernel(base, start, cfg.seq_type is SeqType.FLIP, sq.fs_shots, sq.ways, sq.grouped,
                       _trained_labeling(cfg), *pools, n_ex, *arrays)


def _fewshot(cfg: BuildConfig, base: np.uint64, start: int, pools: tuple, n_ex: int, arrays: tuple) -> None:
    sq = cfg.sequence
    mixed = cfg.seq_type.layout == "mixed"
    fs_pool = K.RARE if mixed else _POOL_OF[SPECS[cfg.seq_type].pool]
    grouped = sq.grouped and not mixed  # the original's get_mixed_seq does not pass grouped
    fs_lab = np.array((K.UNFIXED, 0, 1), dtype=np.int64)
    rnd_lab = np.array(_ordered(K.COMMON, cfg.split), dtype=np.int64)
    K._fewshot_kernel(base, start, fs_pool, sq.fs_shots, sq.ways, grouped, fs_lab, mixed,
                      sq.p_fewshot, rnd_lab, *pools, n_ex, *arrays)


# Each layout's generator (seqgen.seqtypes): it fills rows start.. of `arrays` (example, label, is_rare,
# exemplar) with its kernel. A new layout adds its kernel (seqgen.kernels) and its entry here.
LAYOUTS: dict[Layout, Callable[..., None]] = {
    "bursty": _bursty, "no_support": _no_support, "strategy": _strategy, "fewshot": _fewshot, "mixed": _fewshot,
}


def _trained_labeling(cfg: BuildConfig) -> np.ndarray:
    """The (mode, K, X) labeling row of the trained label of a zipfian-pool class (validated: one rule)."""
    if cfg.sequence.labeling_common is Labeling.ORIGINAL:
        return np.array((K.ORIGINAL, 0, 1), dtype=np.int64)
    return np.array(_ordered(K.ZIPFIAN, cfg.split), dtype=np.int64)


def trained_label_table(cfg: BuildConfig, rare: np.ndarray, common: np.ndarray) -> np.ndarray:
    """int64 [num_dataset_classes]: the label a set of this config trains each rare / common class with
    (ordered: its index in rare + common; original: its class id); -1 for classes without one (holdout,
    unused). For flip / copy_available: `table[example]` is what following the weights answers."""
    table = np.full(cfg.dataset.num_dataset_classes, -1, dtype=np.int64)
    non_holdout = np.concatenate([np.asarray(rare, np.int64), np.asarray(common, np.int64)])
    if cfg.sequence.labeling_common is Labeling.ORIGINAL:
        table[non_holdout] = non_holdout
    else:
        table[non_holdout] = np.arange(len(non_holdout))
    return table


def warmup() -> None:
    """Compile (or load from cache) every kernel on a tiny config."""
    from seqgen.config import DatasetConfig, ExampleType, SequenceConfig
    from seqgen.split import make_split

    ds = DatasetConfig(example_type=ExampleType.OMNIGLOT)
    sp = SplitConfig(n_rare_classes=20, n_common_classes=5, n_holdout_classes=5)
    for t in (SeqType.BURSTY, SeqType.FEWSHOT_HOLDOUT, SeqType.NO_SUPPORT_ZIPFIAN, SeqType.FLIP):
        cfg = BuildConfig(seq_type=t, num_seqs=4, dataset=ds, split=sp,
                          sequence=SequenceConfig(noise_scale=0.1))
        generate(cfg, make_split(cfg), 0, 4)
