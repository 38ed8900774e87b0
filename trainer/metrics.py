"""Every loss / accuracy metric of the original, per sequence, and their 95% confidence intervals.

Mirrors `_compute_loss_and_accuracy` of the original (Chan et al. 2022, experiment/experiment.py), with
values per sequence ([B]) so that an evaluation can sum them over exactly n sequences (the original's
evaluation averaged per-sequence values too: it ran batches of one sequence).

Inputs: logits [B, T, C] and targets [B, T] with T = 2L - 1 (examples and labels interleaved; targets
are `[l_0, 0, l_1, 0, ..., l_{L-1}]`, the original's `prepare_seqs_for_transformer`). The prediction at
position t is scored against targets[t]: "interim" positions are `[:-1:2]` (the support examples),
the query is position -1.

Headline numbers (say them plainly in outputs):
- ICL (in-context learning) = `accuracy_closed` on `fewshot_holdout` sequences: the query's label
  among the `ways` labels 0..ways-1 used in the context; chance = 1 / ways. Its CEILING is below 1: the
  ways' classes are drawn with replacement (as in the original), so with 10 holdout classes and 2 ways
  one sequence in 10 shows a single class under both labels, where even a perfect in-context learner
  can only guess: the ceiling is 0.95 (`icl_ceiling`).
- IWL (in-weights learning) = `accuracy_query` on `no_support_zipfian` sequences (the query's class
  never appears in the context, so only knowledge stored in the weights helps).
- The original's logged `eval_accuracy` was `accuracy_query`: open vocabulary (argmax over all C
  labels), on whatever sequence type was evaluated.

Faithful quirks of the original, kept on purpose (so numbers compare):
- With `w_interim > 0`, `loss_query` / `loss_interim` are means of the WEIGHTED losses (query loss times
  1 - w; interim losses times w / n_interim); with `w_interim == 0`, `loss_interim` and
  `accuracy_interim` are 0.
- Targets outside [0, C) have an all-zero one-hot vector, hence zero loss (`hk.one_hot`).
- `accuracy_closed` on `bursty` sequences uses the labels 0..ways-1, and is 0 on `mixed` sequences.
- Polysemy (`labeling_rare = ordered`, polysemy P > 1), evaluation of `no_support_*` sequences only:
  rare / zipfian count a prediction correct when it lies in `[t // P * P, t // P * P + P)` for target t;
  common shifts the target by `n_rare * (P - 1)` (and that shifted target is used for
  `accuracy_closed` and `from_support*` too). The common label set is then
  `range(n_rare * P, n_rare + n_common)`, which is EMPTY for P > 1 unless n_common is large: the
  original's arithmetic, reproduced.
- Label sets come from the TRAINING set's config; `labeling_rare = original` needs
  `labeling_common = original` (the original raises otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqgen.config import BuildConfig, Labeling, SeqType
from seqgen.errors import UserError
from seqgen.seqtypes import SPECS, spec

__all__ = [
    "BINARY_METRICS", "DESCRIPTIONS", "HEADLINES", "METRICS", "STRATEGY_METRICS", "LabelSets", "MetricsError",
    "column_of", "headline", "icl_ceiling", "label_of", "masked_sums", "metric_key_of", "per_sequence_metrics",
    "strategy_metrics", "summarize",
]

# Every metric, declared once: {name: (kind, description)}. Kind "binary": a 0/1 value per sequence
# (`summarize` gives it a Wilson score interval); "mean": any other per-sequence value (a normal interval).
_METRIC_TABLE = {
    "loss": ("mean", "training loss: cross-entropy at the query (plus interim predictions when w_interim > 0)"),
    "loss_query": ("mean", "(weighted) cross-entropy at the query"),
    "loss_interim": ("mean", "(weighted) cross-entropy at the support examples (0 when w_interim = 0)"),
    "accuracy_query": ("binary", "open-vocabulary query accuracy (argmax over all labels); the original's "
                                 "eval_accuracy"),
    "accuracy_interim": ("mean", "accuracy at the support examples (0 when w_interim = 0)"),
    "accuracy_closed": ("binary", "query accuracy with the argmax restricted to the sequence type's valid labels "
                                  "(fewshot/bursty: 0..ways-1); ICL = this on fewshot_holdout"),
    "from_common": ("binary", "query prediction is a common-class label"),
    "from_rare": ("binary", "query prediction is a rare-class label"),
    "from_fewshot": ("binary", "query prediction is one of the labels 0..ways-1"),
    "from_support": ("binary", "query prediction is a label present in the context"),
    "from_support_common": ("binary", "query prediction is in the context and a common label"),
    "from_support_rare": ("binary", "query prediction is in the context and a rare label"),
    "from_support_fewshot": ("binary", "query prediction is in the context and in 0..ways-1"),
}
# Strategy evaluations (flip / copy_available sets only; `strategy_metrics`): which answer the query got.
_STRATEGY_TABLE = {
    "from_context": ("binary", "query prediction is the label its class carries in the context (open vocabulary)"),
    "from_weights": ("binary", "query prediction is its class's trained label (open vocabulary)"),
    "neither": ("binary", "query prediction is neither (on flip sets the two differ, so the three add up to 1)"),
}
DESCRIPTIONS = {name: text for name, (_, text) in _METRIC_TABLE.items()}
METRICS = tuple(DESCRIPTIONS)
STRATEGY_DESCRIPTIONS = {name: text for name, (_, text) in _STRATEGY_TABLE.items()}
STRATEGY_METRICS = tuple(STRATEGY_DESCRIPTIONS)
BINARY_METRICS = frozenset(name for table in (_METRIC_TABLE, _STRATEGY_TABLE)
                           for name, (kind, _) in table.items() if kind == "binary")
Z95 = 1.959963984540054


class MetricsError(UserError, ValueError):
    """Metrics undefined for this configuration; the message is one line naming the fix."""


@dataclass(frozen=True, eq=False)
class LabelSets:
    """Label ids the metrics need, from the training set's BuildConfig (as the original computes them)."""

    common: np.ndarray  # int64 labels of the common classes
    rare: np.ndarray  # int64 labels of the rare classes
    ways: int
    polysemy: int  # P > 1 only with labeling_rare = ordered (the original's ordered_polysemyP)
    n_rare: int

    @classmethod
    def from_config(cls, cfg: BuildConfig) -> "LabelSets":
        sp, sq = cfg.split, cfg.sequence
        n_rare = sp.n_rare_classes
        poly = sq.polysemy if sq.labeling_rare is Labeling.ORDERED and sq.polysemy > 1 else 1
        split = None
        if Labeling.ORIGINAL in (sq.labeling_common, sq.labeling_rare):
            from seqgen.split import make_split

            split = make_split(cfg)
        if sq.labeling_common is Labeling.ORDERED:
            start = n_rare * poly
            common = np.arange(start, sp.n_classes - sp.n_holdout_classes, dtype=np.int64)
        elif sq.labeling_common is Labeling.ORIGINAL:
            common = np.asarray(split.common, np.int64)
        else:
            raise MetricsError(
                f"labeling_common={sq.labeling_common.value} has no common label set; use ordered or original")
        if poly > 1:
            rare = np.arange(n_rare * poly, dtype=np.int64)
        elif sq.labeling_rare in (Labeling.ORDERED, Labeling.UNFIXED):
            rare = np.arange(n_rare, dtype=np.int64)
        elif sq.labeling_common is Labeling.ORIGINAL:
            rare = np.asarray(split.rare, np.int64)
        else:
            raise MetricsError("labeling_rare=original needs labeling_common=original for the rare label set "
                               "(as the original); change labeling_common")
        return cls(common, rare, sq.ways, poly, n_rare)

    from_build_config = from_config


def _label_mask(labels: np.ndarray, num_classes: int) -> jax.Array:
    """bool [C]: which of the model's outputs are in `labels` (labels >= C can never be predicted)."""
    mask = np.zeros(num_classes, bool)
    labels = np.asarray(labels)
    mask[labels[(labels >= 0) & (labels < num_classes)]] = True
    return jnp.asarray(mask)


def _closed_labels(seq_type: SeqType, ls: LabelSets) -> np.ndarray | None:
    """The original's `valid_labels` for accuracy_closed (None: accuracy_closed = 0)."""
    if seq_type is SeqType.BURSTY or seq_type.is_fewshot:
        return np.arange(ls.ways)
    if seq_type.is_no_support:  # the labels of the type's pool
        pool = spec(seq_type).pool
        return {"common": ls.common, "rare": ls.rare, "zipfian": np.concatenate([ls.common, ls.rare])}[pool]
    return None


def _cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """[B, T] softmax cross-entropy against one-hot targets (all-zero, so zero loss, outside [0, C))."""
    one_hot = jax.nn.one_hot(jnp.asarray(targets).astype(jnp.int32), logits.shape[-1], dtype=logits.dtype)
    return optax.softmax_cross_entropy(logits, one_hot)


def _position_weights(t_len: int, w_interim: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(interim mask [:-1:2], query mask [-1], loss weights) over the T positions, as the original."""
    interim = np.zeros(t_len, np.float32)
    interim[:-1:2] = 1.0
    query = np.zeros(t_len, np.float32)
    query[-1] = 1.0
    if not w_interim:
        return interim, query, query
    n_interim = int((t_len - 1) / 2)
    return interim, query, (interim * w_interim / n_interim + query * (1 - w_interim)).astype(np.float32)


def per_sequence_metrics(logits: jax.Array, targets: jax.Array, label_sets: LabelSets, seq_type: SeqType,
                         w_interim: float = 0.0) -> dict[str, jax.Array]:
    """Every metric of the original, one float32 value per sequence: {name: [B]} (accuracies are 0/1).

    `logits` are [B, T, C] for the T positions of `targets` [B, T], or [B, 1, C] for the query alone when
    `w_interim` is 0: then nothing reads the other positions (their loss weight is 0 and accuracy_interim
    is defined as 0), and the metrics are the same.
    """
    seq_type = SeqType(seq_type)
    _, t_len, n_cls = logits.shape
    targets = jnp.asarray(targets).astype(jnp.int32)
    if t_len != targets.shape[1] and (t_len != 1 or w_interim):
        raise MetricsError(f"logits cover {t_len} positions and targets {targets.shape[1]}: pass every "
                           "position's logits, or the query's alone with w_interim_predictions = 0")
    poly = label_sets.polysemy
    if seq_type is SeqType.NO_SUPPORT_COMMON and poly > 1:
        targets = targets + (label_sets.n_rare * poly - label_sets.n_rare)
    aligned = targets[:, targets.shape[1] - t_len:]  # the targets of the positions `logits` cover
    losses = _cross_entropy(logits, aligned)  # [B, t_len]
    interim, query, weights = _position_weights(t_len, w_interim)
    weighted = losses * weights

    def masks(values: jax.Array) -> tuple[jax.Array, jax.Array]:
        values = values.astype(jnp.float32)
        at_query = (values * query).sum(-1) / query.sum()
        at_interim = (values * interim).sum(-1) / interim.sum() if w_interim else jnp.zeros_like(at_query)
        return at_query, at_interim

    out: dict[str, jax.Array] = {"loss": weighted.sum(-1) / weights.sum()}
    out["loss_query"], out["loss_interim"] = masks(weighted)

    pred = jnp.argmax(logits, axis=-1)  # [B, t_len]
    if seq_type.is_no_support and poly > 1 and seq_type is not SeqType.NO_SUPPORT_COMMON:
        start = aligned // poly * poly
        correct = (pred >= start) & (pred < start + poly)
    else:
        correct = pred == aligned
    out["accuracy_query"], out["accuracy_interim"] = masks(correct)

    valid = _closed_labels(seq_type, label_sets)
    if seq_type.is_strategy:  # the labels shown in this sequence's context (flip: the ways' trained labels)
        shown = jnp.any(jax.nn.one_hot(targets[:, :-2:2], n_cls, dtype=jnp.bool_), axis=1)
        closed = jnp.where(shown, logits[:, -1], -jnp.inf)
        out["accuracy_closed"] = (jnp.argmax(closed, axis=-1) == targets[:, -1]).astype(jnp.float32)
    elif valid is None:
        out["accuracy_closed"] = jnp.zeros_like(out["loss"])
    else:
        closed = jnp.where(_label_mask(valid, n_cls), logits[:, -1], -jnp.inf)
        out["accuracy_closed"] = (jnp.argmax(closed, axis=-1) == targets[:, -1]).astype(jnp.float32)

    q = pred[:, -1]
    from_common = _label_mask(label_sets.common, n_cls)[q]
    from_rare = _label_mask(label_sets.rare, n_cls)[q]
    from_fewshot = q < label_sets.ways
    support = targets[:, :-2:2]  # the support examples' labels
    from_support = jnp.any(q[:, None] == support, axis=-1)
    for name, value in [("from_common", from_common), ("from_rare", from_rare), ("from_fewshot", from_fewshot),
                        ("from_support", from_support), ("from_support_common", from_support & from_common),
                        ("from_support_rare", from_support & from_rare),
                        ("from_support_fewshot", from_support & from_fewshot)]:
        out[name] = value.astype(jnp.float32)
    return {name: out[name] for name in METRICS}


def strategy_metrics(logits: jax.Array, labels: jax.Array, examples: jax.Array,
                     trained_table: jax.Array) -> dict[str, jax.Array]:
    """from_context / from_weights / neither per sequence ([B] float 0/1) for flip / copy_available sets.

    `logits` [B, T, C] (the query's are the last), `labels` / `examples` [B, L] as stored (the query's
    label is its in-context label), `trained_table` [num_dataset_classes]: each class's trained label
    (`seqgen.sampling.trained_label_table`). Open vocabulary (argmax over all labels), as accuracy_query.
    On flip sets the context and trained labels of a query always differ, so exactly one of the three is
    1; on copy_available sets they coincide (from_context = from_weights = accuracy_query).
    """
    pred = jnp.argmax(logits[:, -1], axis=-1)
    from_context = pred == jnp.asarray(labels)[:, -1]
    from_weights = pred == jnp.asarray(trained_table)[jnp.asarray(examples)[:, -1]]
    return {"from_context": from_context.astype(jnp.float32), "from_weights": from_weights.astype(jnp.float32),
            "neither": (~from_context & ~from_weights).astype(jnp.float32)}


@jax.jit
def masked_sums(per: dict[str, jax.Array], valid: jax.Array) -> tuple[dict, dict, jax.Array]:
    """(sums, sums of squares, count) of per-sequence metrics `per` {name: [B]} over the sequences whose
    `valid` [B] is 1 (float 0/1: the padding of an evaluation's last batch is 0), as float32 device scalars;
    `summarize` turns the totals over every batch into means and intervals."""
    per = {k: v.astype(jnp.float32) for k, v in per.items()}
    return ({k: jnp.sum(v * valid) for k, v in per.items()},
            {k: jnp.sum(v * v * valid) for k, v in per.items()},
            jnp.sum(valid))


def _wilson(p: float, n: int) -> tuple[float, float]:
    z2 = Z95 * Z95
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = Z95 * math.sqrt(max(p * (1 - p), 0.0) / n + z2 / (4 * n * n)) / denom
    return max(centre - half, 0.0), min(centre + half, 1.0)


def summarize(sums: dict[str, float], sumsq: dict[str, float], n: int) -> dict[str, dict[str, object]]:
    """{name: {"mean", "ci95": [lo, hi], "n"}} over n sequences.

    0/1 metrics (BINARY_METRICS): Wilson score interval. Others (losses, accuracy_interim): normal
    approximation mean +- 1.96 * s / sqrt(n) with the sample standard deviation s (NaN bounds for n = 1).
    """
    if n < 1:
        raise MetricsError(f"cannot summarise metrics over {n} sequences; evaluate at least one")
    out: dict[str, dict[str, object]] = {}
    for name, total in sums.items():
        mean = float(total) / n
        if name in BINARY_METRICS:
            lo, hi = _wilson(min(max(mean, 0.0), 1.0), n)
        elif n > 1:
            var = max((float(sumsq[name]) - n * mean * mean) / (n - 1), 0.0)
            half = Z95 * math.sqrt(var / n)
            lo, hi = mean - half, mean + half
        else:
            lo = hi = float("nan")
        out[name] = {"mean": mean, "ci95": [lo, hi], "n": n}
    return out


# The one table of headline numbers: the column name (in sweep tables, checks and plots) and the metric
# key (`metric_key_of`) of each evaluation type. Types not named here get a column named after the type.
# The paper's two (HEADLINES): ICL = accuracy_closed on fewshot_holdout, IWL = accuracy_query on
# no_support_zipfian.
_COLUMNS = {t: s.column for t, s in SPECS.items() if s.column is not None}  # seqgen/seqtypes.py


HEADLINES = (SeqType.FEWSHOT_HOLDOUT, SeqType.NO_SUPPORT_ZIPFIAN)

# A derived column of sweeps that evaluate fewshot_holdout: ICL divided by its setting's ICL ceiling
# (`icl_ceiling`), so that settings with different holdout class counts (10 vs 80) compare on one scale.
ICL_OF_CEILING = "icl_of_ceiling"


def metric_key_of(seq_type: SeqType | str) -> str:
    """The metric that is an evaluation type's headline: accuracy_closed on few-shot sets, else accuracy_query."""
    return "accuracy_closed" if SeqType(seq_type).is_fewshot else "accuracy_query"


def column_of(seq_type: SeqType | str) -> str:
    """The column of an evaluation type's headline number: icl, iwl, iwl_common, iwl_rare or the type itself."""
    seq_type = SeqType(seq_type)
    return _COLUMNS.get(seq_type, seq_type.value)


def label_of(seq_type: SeqType | str) -> str:
    """E.g. 'ICL: accuracy_closed on fewshot_holdout', for plot legends and tables."""
    seq_type = SeqType(seq_type)
    column, key = column_of(seq_type), metric_key_of(seq_type)
    if column == seq_type.value:
        return f"{key} on {seq_type.value}"
    return f"{column.upper().replace('_', ' ')}: {key} on {seq_type.value}"


def icl_ceiling(ways: int, n_classes: int) -> float:
    """The best expected accuracy_closed of a perfect in-context learner on few-shot sequences whose `ways`
    classes are drawn uniformly WITH replacement from `n_classes` (the original's fewshot_holdout).

    The query's class then stands under k >= 1 of the ways' labels (k - 1 ~ Binomial(ways - 1, 1 / n_classes)),
    and the context cannot tell those labels apart: the best guess is right with probability 1 / k. For 2
    ways of 10 holdout classes: 0.9 + 0.1 / 2 = 0.95."""
    if ways < 1 or n_classes < 1:
        raise ValueError(f"ways and n_classes must be >= 1, got {ways}, {n_classes}")
    p = 1.0 / n_classes
    return sum(math.comb(ways - 1, j) * p**j * (1 - p) ** (ways - 1 - j) / (j + 1) for j in range(ways))


def headline(seq_type: SeqType | str, summary: dict[str, dict[str, object]]) -> str | None:
    """The paper's name for the number that matters on this set (ICL / IWL, `HEADLINES`) with its 95 %
    interval, e.g. 'ICL (accuracy_closed on fewshot_holdout) = 0.812 [0.795, 0.828]'; None for other types."""
    try:
        seq_type = SeqType(seq_type)
    except ValueError:
        return None
    key = metric_key_of(seq_type)
    if seq_type not in HEADLINES or key not in summary:
        return None
    s = summary[key]
    said = "accuracy" if key == "accuracy_query" else key  # open-vocabulary accuracy, the original's eval_accuracy
    lo, hi = s["ci95"]
    return f"{column_of(seq_type).upper()} ({said} on {seq_type.value}) = {s['mean']:.3f} [{lo:.3f}, {hi:.3f}]"
