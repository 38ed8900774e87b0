"""trainer.metrics: every metric against hand-computed tiny cases, polysemy branches, label sets, intervals,
and the evaluation's reduction (masked sums over valid sequences -> summary -> the ICL / IWL headline)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from seqgen.config import (BuildConfig, DatasetConfig, ExampleType, Labeling, SeqType, SequenceConfig,
                           SplitConfig)
from seqgen.split import make_split
from trainer.metrics import (METRICS, LabelSets, MetricsError, headline, masked_sums, per_sequence_metrics,
                             summarize)

LN = np.log
# 6 labels: rare {0,1,2,3}, common {4,5}; ways 2.  L = 3 examples -> T = 5 positions.
SETS = LabelSets(common=np.array([4, 5]), rare=np.arange(4), ways=2, polysemy=1, n_rare=4)
TARGETS = np.array([[1, 0, 0, 0, 1],   # support labels (positions 0, 2): 1, 0; query label 1
                    [0, 0, 5, 0, 5]])  # support labels 0, 5; query label 5


def _logits(query_probs: list[list[float]], t_len: int = 5, c: int = 6) -> jnp.ndarray:
    """Zero logits (uniform: pred 0, loss ln C) everywhere except the query: log of given unnormalised probs."""
    x = np.zeros((len(query_probs), t_len, c), np.float32)
    x[:, -1] = LN(np.array(query_probs, np.float64))
    return jnp.asarray(x)


LOGITS = _logits([[1, 2, 1, 4, 1, 1],   # seq 0: open pred 3; among {0,1} pred 1; loss(target 1) = ln(10/2)
                  [1, 1, 1, 1, 1, 3]])  # seq 1: open pred 5; among {0,1} pred 0 (tie -> first); loss(5) = ln(8/3)


def _m(seq_type, w=0.0, logits=LOGITS, targets=TARGETS, sets=SETS):
    out = per_sequence_metrics(logits, jnp.asarray(targets), sets, seq_type, w)
    assert tuple(out) == METRICS and all(v.shape == (len(targets),) for v in out.values())
    if not w:  # the query's logits alone (what training computes) give every metric the same
        query_only = per_sequence_metrics(logits[:, -1:], jnp.asarray(targets), sets, seq_type, w)
        for k in METRICS:
            np.testing.assert_allclose(query_only[k], out[k], rtol=1e-6, err_msg=k)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def test_fewshot_query_only_by_hand():
    m = _m(SeqType.FEWSHOT_HOLDOUT)
    np.testing.assert_allclose(m["loss"], [LN(5), LN(8 / 3)], rtol=1e-5)
    np.testing.assert_allclose(m["loss_query"], [LN(5), LN(8 / 3)], rtol=1e-5)
    expected = {
        "loss_interim": [0, 0], "accuracy_interim": [0, 0],  # w_interim = 0: the original reports 0
        "accuracy_query": [0, 1], "accuracy_closed": [1, 0],
        "from_common": [0, 1], "from_rare": [1, 0], "from_fewshot": [0, 0],
        "from_support": [0, 1], "from_support_common": [0, 1], "from_support_rare": [0, 0],
        "from_support_fewshot": [0, 0],
    }
    for k, v in expected.items():
        np.testing.assert_array_equal(m[k], v, err_msg=k)


def test_query_only_logits_need_zero_interim_weight():
    with pytest.raises(MetricsError, match="w_interim_predictions = 0"):
        per_sequence_metrics(LOGITS[:, -1:], jnp.asarray(TARGETS), SETS, SeqType.BURSTY, 0.5)
    with pytest.raises(MetricsError, match="positions"):
        per_sequence_metrics(LOGITS[:, -3:], jnp.asarray(TARGETS), SETS, SeqType.BURSTY, 0.0)


def test_interim_weighting_by_hand():
    m = _m(SeqType.FEWSHOT_HOLDOUT, w=0.5)
    # weights: 0.5/2 at positions 0 and 2 (uniform logits: loss ln 6), 0.5 at the query
    np.testing.assert_allclose(m["loss"], [0.5 * LN(6) + 0.5 * LN(5), 0.5 * LN(6) + 0.5 * LN(8 / 3)], rtol=1e-5)
    # the original averages the WEIGHTED losses over each mask
    np.testing.assert_allclose(m["loss_query"], [0.5 * LN(5), 0.5 * LN(8 / 3)], rtol=1e-5)
    np.testing.assert_allclose(m["loss_interim"], [0.25 * LN(6)] * 2, rtol=1e-5)
    # interim predictions are 0 (uniform logits): seq 0 targets (1, 0) -> 1/2, seq 1 targets (0, 5) -> 1/2
    np.testing.assert_allclose(m["accuracy_interim"], [0.5, 0.5])
    # the training loss is the batch mean of "loss" (trainer.step); query only: the mean of the query losses
    np.testing.assert_allclose(_m(SeqType.FEWSHOT_HOLDOUT)["loss"].mean(), (LN(5) + LN(8 / 3)) / 2, rtol=1e-5)


@pytest.mark.parametrize("seq_type, closed", [
    (SeqType.BURSTY, [1, 0]),  # the original's first branch: labels 0..ways-1
    (SeqType.FEWSHOT_COMMON, [1, 0]),
    (SeqType.NO_SUPPORT_COMMON, [0, 1]),  # among {4, 5}: seq 0 -> 4 (tie), seq 1 -> 5
    (SeqType.NO_SUPPORT_RARE, [0, 0]),  # among {0..3}: seq 0 -> 3, seq 1 -> 0
    (SeqType.NO_SUPPORT_ZIPFIAN, [0, 1]),  # all six labels: open vocabulary
    (SeqType.MIXED, [0, 0]),  # not computed by the original
])
def test_accuracy_closed_per_type(seq_type, closed):
    np.testing.assert_array_equal(_m(seq_type)["accuracy_closed"], closed)


def test_out_of_range_target_has_zero_loss():
    t = TARGETS.copy()
    t[0, -1] = 7  # >= C: hk.one_hot gives zeros
    assert _m(SeqType.BURSTY, targets=t)["loss"][0] == 0.0


# ---- polysemy ----------------------------------------------------------------------------------
POLY_CFG = BuildConfig(
    dataset=DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=20),
    split=SplitConfig(n_rare_classes=2, n_common_classes=3, n_holdout_classes=1),
    sequence=SequenceConfig(polysemy=2),
)


def test_polysemy_label_sets_reproduce_original_arithmetic():
    ls = LabelSets.from_config(POLY_CFG)
    assert POLY_CFG.num_labels == 7 and ls.polysemy == 2 and ls.n_rare == 2
    np.testing.assert_array_equal(ls.rare, [0, 1, 2, 3])
    np.testing.assert_array_equal(ls.common, [4])  # range(n_rare*P, n_classes - n_holdout) = range(4, 5)


def _one_hot_logits(preds: list[int], c: int = 7) -> jnp.ndarray:
    x = np.zeros((len(preds), 5, c), np.float32)
    for b, p in enumerate(preds):
        x[b, -1, p] = 5.0
    return jnp.asarray(x)


@pytest.mark.parametrize("seq_type", [SeqType.NO_SUPPORT_RARE, SeqType.NO_SUPPORT_ZIPFIAN])
def test_polysemy_rare_counts_block_of_labels(seq_type):
    ls = LabelSets.from_config(POLY_CFG)
    targets = np.array([[0, 0, 0, 0, 1]] * 4)  # query target 1: block [1 // 2 * 2, +2) = {0, 1}
    m = _m(seq_type, logits=_one_hot_logits([0, 1, 2, 3]), targets=targets, sets=ls)
    np.testing.assert_array_equal(m["accuracy_query"], [1, 1, 0, 0])
    # closed accuracy is not polysemy-aware (exact match), as the original
    assert m["accuracy_closed"][1] == 1 and m["accuracy_closed"][0] == 0
    # outside the no_support eval branch: plain equality
    np.testing.assert_array_equal(_m(SeqType.BURSTY, logits=_one_hot_logits([0, 1, 2, 3]), targets=targets,
                                     sets=ls)["accuracy_query"], [0, 1, 0, 0])


def test_polysemy_common_shifts_targets():
    ls = LabelSets.from_config(POLY_CFG)
    # common class 0 has the eval label n_rare + 0 = 2; the model's label is n_rare * P + 0 = 4
    targets = np.array([[3, 0, 2, 0, 2]] * 3)
    m = _m(SeqType.NO_SUPPORT_COMMON, logits=_one_hot_logits([4, 2, 5]), targets=targets, sets=ls)
    np.testing.assert_array_equal(m["accuracy_query"], [1, 0, 0])
    np.testing.assert_array_equal(m["accuracy_closed"], [1, 1, 1])  # valid labels {4}: always 4 = shifted target
    # support labels shifted too: (3, 2) -> (5, 4)
    np.testing.assert_array_equal(m["from_support"], [1, 0, 1])
    np.testing.assert_array_equal(m["from_common"], [1, 0, 0])
    np.testing.assert_array_equal(m["from_support_common"], [1, 0, 0])


# ---- label sets ---------------------------------------------------------------------------------
def test_label_sets_default_and_original():
    ls = LabelSets.from_config(BuildConfig())
    np.testing.assert_array_equal(ls.rare, np.arange(1603))
    np.testing.assert_array_equal(ls.common, np.arange(1603, 1613))
    assert ls.ways == 2 and ls.polysemy == 1
    cfg = BuildConfig(sequence=SequenceConfig(labeling_common=Labeling.ORIGINAL, labeling_rare=Labeling.ORIGINAL))
    ls = LabelSets.from_config(cfg)
    split = make_split(cfg)
    np.testing.assert_array_equal(ls.common, split.common)
    np.testing.assert_array_equal(ls.rare, split.rare)
    cfg = BuildConfig(sequence=SequenceConfig(labeling_rare=Labeling.ORIGINAL))
    with pytest.raises(MetricsError, match="labeling_common=original") as e:
        LabelSets.from_config(cfg)
    assert "\n" not in str(e.value)


# ---- aggregation and intervals --------------------------------------------------------------------
def test_masked_sums_count_only_valid_sequences():
    per = {"accuracy_query": jnp.array([1.0, 0.0, 1.0]), "loss": jnp.array([1.0, 2.0, 3.0]),
           "flag": jnp.array([True, False, True])}  # any dtype: summed as float32
    sums, sq, n = masked_sums(per, jnp.array([1.0, 1.0, 0.0]))
    assert {k: float(v) for k, v in sums.items()} == {"accuracy_query": 1.0, "loss": 3.0, "flag": 1.0}
    assert float(sq["loss"]) == 5.0 and float(sq["accuracy_query"]) == 1.0 and float(n) == 2.0
    sums, sq, n = masked_sums(per, jnp.ones(3))
    assert float(sums["loss"]) == 6.0 and float(sq["loss"]) == 14.0 and float(n) == 3.0


def test_evaluation_of_hand_made_logits_end_to_end():
    """per-sequence metrics of hand-made logits -> masked sums (the 2nd sequence is padding) -> summary ->
    headline: the numbers `trainer evaluate` prints and records."""
    logits = _logits([[1, 2, 1, 4, 1, 1],   # open pred 3 (wrong: target 1); among {0, 1}: 1 (right)
                      [1, 1, 1, 1, 1, 3],   # padding: must not count
                      [9, 1, 1, 1, 1, 1]])  # open pred 0 (right: target 0); among {0, 1}: 0 (right)
    targets = jnp.asarray(np.array([[1, 0, 0, 0, 1], [0, 0, 5, 0, 5], [0, 0, 1, 0, 0]]))
    per = per_sequence_metrics(logits, targets, SETS, SeqType.FEWSHOT_HOLDOUT)
    sums, sq, n = masked_sums(per, jnp.array([1.0, 0.0, 1.0]))
    assert float(n) == 2.0
    summary = summarize({k: float(v) for k, v in sums.items()}, {k: float(v) for k, v in sq.items()}, int(n))
    assert summary["accuracy_closed"]["mean"] == 1.0 and summary["accuracy_query"]["mean"] == 0.5
    assert summary["accuracy_closed"]["n"] == summary["accuracy_query"]["n"] == 2
    np.testing.assert_allclose(summary["loss"]["mean"], (LN(5) + LN(14 / 9)) / 2, rtol=1e-5)
    lo, hi = summary["accuracy_closed"]["ci95"]
    assert hi == 1.0 and round(lo, 4) == 0.3424  # Wilson 2/2
    assert headline(SeqType.FEWSHOT_HOLDOUT, summary) == \
        f"ICL (accuracy_closed on fewshot_holdout) = 1.000 [{lo:.3f}, 1.000]"
    lo, hi = summary["accuracy_query"]["ci95"]
    assert headline("no_support_zipfian", summary) == \
        f"IWL (accuracy on no_support_zipfian) = 0.500 [{lo:.3f}, {hi:.3f}]"


def test_summarize_wilson_and_normal():
    s = summarize({"accuracy_query": 5, "from_rare": 0, "loss": 10.0},
                  {"accuracy_query": 5, "from_rare": 0, "loss": 30.0}, 10)
    lo, hi = s["accuracy_query"]["ci95"]
    assert s["accuracy_query"]["mean"] == 0.5 and s["accuracy_query"]["n"] == 10
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # Wilson 5/10 (textbook value)
    lo, hi = s["from_rare"]["ci95"]
    assert lo == 0.0 and round(hi, 4) == 0.2775  # Wilson 0/10
    s = summarize({"loss": 10.0}, {"loss": 30.0}, 4)  # values 1, 2, 3, 4
    half = 1.959964 * math.sqrt((30 - 4 * 2.5**2) / 3) / 2
    np.testing.assert_allclose(s["loss"]["ci95"], [2.5 - half, 2.5 + half], rtol=1e-6)
    assert all(math.isnan(x) for x in summarize({"loss": 1.0}, {"loss": 1.0}, 1)["loss"]["ci95"])
    with pytest.raises(MetricsError):
        summarize({"loss": 0.0}, {"loss": 0.0}, 0)


def test_headline_names_only_the_papers_two_numbers():
    s = {"accuracy_closed": {"mean": 0.8125, "ci95": [0.75, 0.875], "n": 64},
         "accuracy_query": {"mean": 0.25, "ci95": [0.1, 0.4], "n": 64}}
    assert headline(SeqType.FEWSHOT_HOLDOUT, s) == "ICL (accuracy_closed on fewshot_holdout) = 0.812 [0.750, 0.875]"
    assert headline(SeqType.NO_SUPPORT_ZIPFIAN, s) == "IWL (accuracy on no_support_zipfian) = 0.250 [0.100, 0.400]"
    assert headline(SeqType.BURSTY, s) is None and headline(SeqType.FEWSHOT_COMMON, s) is None
    assert headline("no_support_common", s) is None and headline("not a type", s) is None
    assert headline(SeqType.FEWSHOT_HOLDOUT, {"accuracy_query": s["accuracy_query"]}) is None


def test_icl_ceiling_formula_and_the_generator():
    """The ceiling is E[1 / k], k = the number of ways showing the query's class; checked by hand and
    against fewshot_holdout sequences from the generator (its ways are drawn with replacement)."""
    from seqgen.config import BuildConfig, DatasetConfig, ExampleType, SplitConfig
    from seqgen.sampling import generate
    from seqgen.split import make_split
    from trainer.metrics import icl_ceiling

    assert icl_ceiling(2, 10) == pytest.approx(0.95)
    assert icl_ceiling(1, 10) == 1.0 and icl_ceiling(2, 1) == 0.5
    assert icl_ceiling(3, 4) == pytest.approx((3 / 4) ** 2 + 2 * (1 / 4) * (3 / 4) / 2 + (1 / 4) ** 2 / 3)
    cfg = BuildConfig(seq_type=SeqType.FEWSHOT_HOLDOUT, num_seqs=20000, seed=3,
                      dataset=DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=60),
                      split=SplitConfig(n_rare_classes=40, n_common_classes=10, n_holdout_classes=10)).validate()
    seqs = generate(cfg, make_split(cfg), 0, cfg.num_seqs)
    ex, lab = seqs["example"], seqs["label"]
    best = []
    for e, l in zip(ex, lab):
        labels_of_query_class = {int(b) for a, b in zip(e[:-1], l[:-1]) if a == e[-1]}
        best.append(1.0 / len(labels_of_query_class))
    assert np.mean(best) == pytest.approx(icl_ceiling(cfg.sequence.ways, 10), abs=0.006)


@pytest.mark.parametrize("seq_type", [SeqType.BURSTY, SeqType.FEWSHOT_HOLDOUT, SeqType.NO_SUPPORT_ZIPFIAN])
def test_metrics_declared_binary_are_zero_or_one_per_sequence(seq_type):
    """A metric's kind is declared where it is defined (`trainer.metrics._METRIC_TABLE`); the declaration must
    match what the metric computes: binary metrics are 0 or 1 for every sequence, on random logits."""
    from trainer.metrics import BINARY_METRICS

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(64, 5, 6)).astype(np.float32))
    targets = np.tile(TARGETS, (32, 1))
    out = _m(seq_type, logits=logits, targets=targets)
    binary = [k for k in METRICS if k in BINARY_METRICS]
    assert {"accuracy_query", "accuracy_closed", "from_rare"} <= set(binary) and "loss" not in binary
    for k in binary:
        assert set(np.unique(out[k])) <= {0.0, 1.0}, k
    assert not set(np.unique(out["loss"])) <= {0.0, 1.0}
