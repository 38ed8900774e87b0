"""flip / copy_available: kernels == the slow reference, their invariants, verify, refusals, the metrics."""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqgen.config import BuildConfig, DatasetConfig, ExampleType, Labeling, SeqType, SequenceConfig, SplitConfig
from seqgen.configio import ConfigError
from seqgen.sampling import generate, trained_label_table
from seqgen.verify import check_invariants
from seqgen.split import make_split
from tests.naive import naive_generate
from trainer.metrics import LabelSets, per_sequence_metrics, strategy_metrics

pytestmark = pytest.mark.usefixtures("warm_kernels")

SYMBOLIC = DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=50)
OMNIGLOT = DatasetConfig()
SMALL = SplitConfig(n_rare_classes=30, n_common_classes=8, n_holdout_classes=6)
ZIPF = dataclasses.replace(SMALL, zipf_exponent=1.2)
ORIGINAL = dict(labeling_common=Labeling.ORIGINAL, labeling_rare=Labeling.ORIGINAL)
STRATEGY = [SeqType.FLIP, SeqType.COPY_AVAILABLE]


def _cfg(t, dataset=SYMBOLIC, split=SMALL, seed=0, **seq):
    return BuildConfig(seq_type=t, num_seqs=1000, seed=seed, dataset=dataset, split=split,
                       sequence=SequenceConfig(**seq)).validate()


def _header(cfg):
    return {"split": make_split(cfg).to_dict()}


@pytest.mark.parametrize("t", STRATEGY)
@pytest.mark.parametrize("dataset,split,seq", [
    (SYMBOLIC, SMALL, {}),
    (OMNIGLOT, ZIPF, {"ways": 3, "fs_shots": 3}),
    (OMNIGLOT, ZIPF, {"ways": 5, "fs_shots": 2, "grouped": True}),
    (SYMBOLIC, ZIPF, {"ways": 2, "fs_shots": 1, **ORIGINAL}),
    (SYMBOLIC, SplitConfig(n_rare_classes=1, n_common_classes=2, n_holdout_classes=0, zipf_exponent=2.0),
     {"ways": 3}),  # every class of the pool in every sequence: redraws until distinct
], ids=["symbolic", "omniglot-zipf-3way", "grouped-5way", "original-1shot", "whole-pool"])
def test_kernel_matches_naive_reference(t, dataset, split, seq):
    cfg = _cfg(t, dataset, split, seed=7, **seq)
    s = make_split(cfg)
    a, b = generate(cfg, s, 11, 120), naive_generate(cfg, s, 11, 120)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


_hyp = settings(deadline=None, max_examples=20, suppress_health_check=[HealthCheck.too_slow])


@_hyp
@given(t=st.sampled_from(STRATEGY), ways=st.integers(2, 5), shots=st.integers(1, 3), grouped=st.booleans(),
       original=st.booleans(), zipf=st.booleans(), seed=st.integers(0, 2**40))
def test_invariants(t, ways, shots, grouped, original, zipf, seed):
    cfg = _cfg(t, OMNIGLOT, ZIPF if zipf else SMALL, seed=seed, ways=ways, fs_shots=shots, grouped=grouped,
               **(ORIGINAL if original else {}))
    s = make_split(cfg)
    out = generate(cfg, s, 0, 150)
    trained = trained_label_table(cfg, s.rare, s.common)
    assert np.isin(out["example"], s.non_holdout).all() and (out["is_rare"] == 0).all()
    assert (out["label"] < cfg.num_labels).all()
    for ex, lb in zip(out["example"], out["label"]):
        ctx, ctxl = ex[:-1], lb[:-1]
        classes = np.unique(ctx)
        assert len(classes) == ways and all((ctx == c).sum() == shots for c in classes)
        ctx_label = {int(c): set(ctxl[ctx == c].tolist()) for c in classes}
        assert all(len(v) == 1 for v in ctx_label.values())
        ctx_label = {c: v.pop() for c, v in ctx_label.items()}
        assert lb[-1] == ctx_label[int(ex[-1])]
        if t is SeqType.FLIP:  # a derangement of the ways' trained labels
            assert all(ctx_label[c] != trained[c] for c in ctx_label)
            assert sorted(ctx_label.values()) == sorted(int(trained[c]) for c in ctx_label)
            assert lb[-1] != trained[ex[-1]]
        else:
            assert all(ctx_label[c] == trained[c] for c in ctx_label)
        if grouped:
            blocks = ctx.reshape(shots, ways)
            assert all(len(set(b.tolist())) == ways for b in blocks)
    assert not check_invariants(cfg, _header(cfg), out, sample=150)


def test_trained_labels_are_the_training_sets_labels():
    """What a bursty training set labels each class with is what trained_label_table says."""
    for labeling in ({}, ORIGINAL):
        train = _cfg(SeqType.BURSTY, SYMBOLIC, ZIPF, p_bursty_zipfian=0.5, **labeling)
        s = make_split(train)
        out = generate(train, s, 0, 3000)
        table = trained_label_table(train, s.rare, s.common)
        np.testing.assert_array_equal(table[out["example"]], out["label"])
        assert (table[s.holdout] == -1).all()


def test_two_ways_is_a_swap_and_derangements_are_uniform():
    cfg = _cfg(SeqType.FLIP, SYMBOLIC, SMALL, ways=2)
    s = make_split(cfg)
    out = generate(cfg, s, 0, 200)
    trained = trained_label_table(cfg, s.rare, s.common)
    for ex, lb in zip(out["example"], out["label"]):
        a, b = np.unique(ex)
        assert lb[ex == a][0] == trained[b] and lb[ex == b][0] == trained[a]
    cfg3 = _cfg(SeqType.FLIP, SYMBOLIC, SMALL, ways=3, fs_shots=1)
    out = generate(cfg3, s, 0, 4000)
    # 3 ways have two derangements: (1 2 0) and (2 0 1); map each row to which one it is
    counts = {}
    for ex, lb in zip(out["example"], out["label"]):
        pos = {int(trained[c]): k for k, c in enumerate(ex[:-1])}
        perm = tuple(pos[int(l)] for l in lb[:-1])
        counts[perm] = counts.get(perm, 0) + 1
    assert set(counts) <= {p for p in itertools.permutations(range(3)) if all(p[i] != i for i in range(3))}
    assert len(counts) == 2 and min(counts.values()) > 1800


def test_flip_and_copy_available_differ_only_in_the_draws_they_make():
    flip, copy = _cfg(SeqType.FLIP), _cfg(SeqType.COPY_AVAILABLE)
    s = make_split(flip)
    a, b = generate(flip, s, 0, 300), generate(copy, s, 0, 300)
    assert not np.array_equal(a["example"], b["example"])  # independent sets (own type tags)


@pytest.mark.parametrize("t", STRATEGY)
def test_verify_catches_broken_rows(t):
    cfg = _cfg(t, SYMBOLIC, SMALL, ways=3)
    s = make_split(cfg)
    good = generate(cfg, s, 0, 40)
    assert not check_invariants(cfg, _header(cfg), good, sample=40)
    trained = trained_label_table(cfg, s.rare, s.common)
    bad = {k: v.copy() for k, v in good.items()}
    row = bad["example"][5]
    c = row[0]
    if t is SeqType.FLIP:  # give one class its trained label back everywhere (context and query)
        other = np.unique(row[row != c])[0]
        bad["label"][5][row == c], bad["label"][5][row == other] = trained[c], bad["label"][5][row == c][0]
        assert check_invariants(cfg, _header(cfg), bad, sample=40)
    else:
        bad["label"][5][row == c] = (trained[c] + 1) % cfg.num_labels
        assert any("trained label" in p for p in check_invariants(cfg, _header(cfg), bad, sample=40))
    worse = {k: v.copy() for k, v in good.items()}
    worse["label"][3, -1] = (worse["label"][3, -1] + 1) % cfg.num_labels
    assert any("query" in p for p in check_invariants(cfg, _header(cfg), worse, sample=40))


def test_refusals_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="ways >= 2"):
        _cfg(SeqType.FLIP, ways=1)
    _cfg(SeqType.COPY_AVAILABLE, ways=1)  # one way is a fine copy_available sequence
    with pytest.raises(ConfigError, match="distinct"):
        _cfg(SeqType.FLIP, SYMBOLIC, SplitConfig(n_rare_classes=1, n_common_classes=1, n_holdout_classes=3), ways=3)
    with pytest.raises(ConfigError, match="polysemy"):
        _cfg(SeqType.FLIP, polysemy=2)
    with pytest.raises(ConfigError, match="labeling_rare"):
        _cfg(SeqType.COPY_AVAILABLE, labeling_rare=Labeling.UNFIXED)
    with pytest.raises(ConfigError, match="labeling_rare"):
        _cfg(SeqType.FLIP, labeling_rare=Labeling.ORIGINAL)
    assert _cfg(SeqType.FLIP, ways=3, fs_shots=2).length == 7


# ---- the strategy metrics ----------------------------------------------------------------------
def test_strategy_metrics_count_context_weights_neither():
    cfg = _cfg(SeqType.FLIP, SYMBOLIC, SMALL)
    s = make_split(cfg)
    out = generate(cfg, s, 0, 6)
    trained = trained_label_table(cfg, s.rare, s.common)
    C = cfg.num_labels
    q_ctx, q_trained = out["label"][:, -1], trained[out["example"][:, -1]]
    answers = np.array([q_ctx[0], q_trained[1], q_ctx[2], q_trained[3], (q_ctx[4] + q_trained[4]) % C + 0, 0])
    answers[4] = next(c for c in range(C) if c not in (q_ctx[4], q_trained[4]))
    answers[5] = next(c for c in range(C) if c not in (q_ctx[5], q_trained[5]))
    logits = jnp.asarray(np.eye(C, dtype=np.float32)[answers][:, None, :])
    m = strategy_metrics(logits, jnp.asarray(out["label"]), jnp.asarray(out["example"]), jnp.asarray(trained))
    np.testing.assert_array_equal(m["from_context"], [1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(m["from_weights"], [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(m["neither"], [0, 0, 0, 0, 1, 1])
    # accuracy_closed of a strategy set: the argmax among the labels shown in the context
    targets = np.zeros((6, 2 * cfg.length - 1), np.int64)
    targets[:, ::2] = out["label"]
    closed_logits = np.full((6, 1, C), -5.0, np.float32)
    closed_logits[np.arange(6), 0, answers] = 0.0
    closed_logits[np.arange(6), 0, q_ctx] = -1.0  # second best: the context label
    per = per_sequence_metrics(jnp.asarray(closed_logits), jnp.asarray(targets), LabelSets.from_config(cfg),
                               SeqType.FLIP)
    # rows 0, 2: answered the context label; 1, 3: the trained label, which is in the context too (a
    # derangement) so the restricted argmax stays there; 4, 5: a label outside the context -> the context one
    np.testing.assert_array_equal(per["accuracy_closed"], [1, 0, 1, 0, 1, 1])
