"""Statistics of generated sequences: burst rates, Zipf class frequencies, query / exemplar uniformity.

Fixed seeds, so every test is deterministic; thresholds are generous (several standard deviations, or a
chi-square statistic below dof + 8*sqrt(2*dof)), and each test also checks that its statistic does
reject a wrong distribution, so it can fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from seqgen.config import BuildConfig, DatasetConfig, ExampleType, NonBurstyType, SeqType, SequenceConfig, SplitConfig
from seqgen.sampling import generate, pool_weights
from seqgen.split import make_split

pytestmark = pytest.mark.usefixtures("warm_kernels")


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "draws of zero-probability categories"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _chi2_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    dof = int((probs > 0).sum()) - 1
    return _chi2(counts, probs) < dof + 8 * np.sqrt(2 * dof)


def _binomial_ok(hits: int, n: int, p: float, sds: float = 5.0) -> bool:
    return abs(hits - n * p) <= sds * np.sqrt(n * p * (1 - p)) + 1


def test_bursty_fraction_and_kind():
    seq = SequenceConfig(p_bursty=0.9, p_bursty_common=0.3, p_bursty_zipfian=0.0,
                         non_bursty_type=NonBurstyType.COMMON_UNIFORM)
    cfg = BuildConfig(seq_type=SeqType.BURSTY, seed=3, sequence=seq)
    n = 200_000
    out = generate(cfg, make_split(cfg), 0, n)
    bursty = out["is_rare"].any(axis=1)  # non-bursty sequences are all common
    assert _binomial_ok(int(bursty.sum()), n, 0.9)
    assert not _binomial_ok(int(bursty.sum()), n, 0.89)
    common_burst = bursty & (out["is_rare"][:, -1] == 0)  # the query of a common few-shot block is common
    assert _binomial_ok(int(common_burst.sum()), int(bursty.sum()), 0.3)
    # a rare burst: shots*ways rare support examples + rare query; a common burst: the 2 remainder are rare
    rare_counts = out["is_rare"][bursty].sum(axis=1)
    assert set(np.unique(rare_counts).tolist()) == {2, 7}


def test_mixed_fraction():
    cfg = BuildConfig(seq_type=SeqType.MIXED, seed=4, sequence=SequenceConfig(p_fewshot=0.1))
    n = 100_000
    fewshot = generate(cfg, make_split(cfg), 0, n)["is_rare"][:, 0] == 1
    assert _binomial_ok(int(fewshot.sum()), n, 0.1)


@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
def test_zipfian_class_frequencies(exponent):
    """Non-bursty zipfian sequences over the default 1613 classes draw classes by the Zipf weights."""
    seq = SequenceConfig(p_bursty=0.0)
    cfg = BuildConfig(seq_type=SeqType.BURSTY, seed=5, split=SplitConfig(zipf_exponent=exponent), sequence=seq)
    s = make_split(cfg)
    out = generate(cfg, s, 0, 150_000)
    pos = np.searchsorted(np.sort(s.non_holdout), out["example"].ravel())
    order = np.argsort(s.non_holdout)
    counts = np.bincount(order[pos], minlength=len(s.non_holdout))
    assert _chi2_ok(counts, s.zipf_weights)
    ramp = np.arange(1.0, len(s.zipf_weights) + 1)
    wrong = np.full(len(ramp), 1 / len(ramp)) if exponent else ramp / ramp.sum()
    assert not _chi2_ok(counts, wrong)


def test_zipf_for_common_rare_few_shot_classes():
    sp = SplitConfig(n_rare_classes=50, n_common_classes=10, n_holdout_classes=5, zipf_exponent=1.0,
                     use_zipf_for_common_rare=True)
    ds = DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=100)
    cfg = BuildConfig(seq_type=SeqType.FEWSHOT_RARE, seed=6, dataset=ds, split=sp)
    s = make_split(cfg)
    out = generate(cfg, s, 0, 50_000)
    support, labels = out["example"][:, :-1], out["label"][:, :-1]
    first_way = support[labels == 0].reshape(-1, 4)[:, 0]  # the class of way 0: one draw per sequence
    index = {int(c): i for i, c in enumerate(s.rare)}
    counts = np.bincount([index[int(c)] for c in first_way], minlength=50)
    w = pool_weights(s, sp)[0]
    np.testing.assert_allclose(w, s.zipf_weights[:50] / s.zipf_weights[:50].sum())
    assert _chi2_ok(counts, w)
    assert not _chi2_ok(counts, np.full(50, 1 / 50))


def test_no_support_support_follows_renormalised_weights():
    """Support class c given query q has probability w_c / (1 - w_q): marginally sum_q w_q w_c / (1 - w_q)."""
    sp = SplitConfig(n_rare_classes=12, n_common_classes=4, n_holdout_classes=2, zipf_exponent=1.5)
    ds = DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=20)
    cfg = BuildConfig(seq_type=SeqType.NO_SUPPORT_ZIPFIAN, seed=7, dataset=ds, split=sp)
    s = make_split(cfg)
    out = generate(cfg, s, 0, 40_000)
    w = s.zipf_weights
    index = np.full(20, -1)
    index[s.non_holdout] = np.arange(16)
    query = index[out["example"][:, -1]]
    assert _chi2_ok(np.bincount(query, minlength=16), w)
    support = index[out["example"][:, :-1]].ravel()
    expected = np.array([sum(w[q] * w[c] / (1 - w[q]) for q in range(16) if q != c) for c in range(16)])
    counts = np.bincount(support, minlength=16)
    assert _chi2_ok(counts, expected)
    assert not _chi2_ok(counts, w)


def test_fewshot_query_way_and_exemplars_uniform():
    cfg = BuildConfig(seq_type=SeqType.FEWSHOT_HOLDOUT, seed=8, sequence=SequenceConfig(ways=5, fs_shots=2))
    out = generate(cfg, make_split(cfg), 0, 50_000)
    assert _chi2_ok(np.bincount(out["label"][:, -1], minlength=5), np.full(5, 0.2))
    counts = np.bincount(out["exemplar"].ravel(), minlength=20)
    assert _chi2_ok(counts, np.full(20, 0.05))
    skewed = np.full(20, 0.05)
    skewed[0], skewed[19] = 0.06, 0.04
    assert not _chi2_ok(counts, skewed)
