"""The rare / common / holdout split and the Zipf weights (seqgen.split) against the original's procedure."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from seqgen.config import BuildConfig, DatasetConfig, ExampleType, Exemplars, SeqType, SplitConfig
from seqgen.configio import ConfigError
from seqgen.split import ClassSplit, make_split, zipf_weights


def test_default_split_is_the_originals_seeded_permutation():
    s = make_split(BuildConfig())
    order = np.random.default_rng(1337).choice(range(1623), size=1623, replace=False)
    np.testing.assert_array_equal(s.rare, order[:1603])
    np.testing.assert_array_equal(s.common, order[1603:1613])
    np.testing.assert_array_equal(s.holdout, order[1613:])
    np.testing.assert_array_equal(s.non_holdout, order[:1613])
    # hard-coded values of that permutation (numpy's PCG64 + Generator.choice are stable)
    assert s.rare[:5].tolist() == [318, 1589, 543, 304, 851]
    assert s.common.tolist() == [580, 243, 1316, 493, 171, 1006, 524, 864, 387, 170]
    assert s.holdout.tolist() == [198, 184, 1152, 480, 336, 583, 614, 575, 168, 585]


def test_pools_are_disjoint_and_holdout_comes_from_the_end():
    cfg = BuildConfig(split=SplitConfig(n_rare_classes=100, n_common_classes=7, n_holdout_classes=13))
    s = make_split(cfg)
    order = np.random.default_rng(1337).choice(range(1623), size=1623, replace=False)
    assert (len(s.rare), len(s.common), len(s.holdout)) == (100, 7, 13)
    np.testing.assert_array_equal(s.holdout, order[-13:])
    all_ids = np.concatenate([s.rare, s.common, s.holdout])
    assert len(np.unique(all_ids)) == 120
    # holdout does not move when n_rare / n_common change
    s2 = make_split(BuildConfig(split=SplitConfig(n_rare_classes=5, n_common_classes=50, n_holdout_classes=13)))
    np.testing.assert_array_equal(s.holdout, s2.holdout)


def test_split_identical_for_every_sequence_type():
    dicts = {json.dumps(make_split(BuildConfig(seq_type=t)).to_dict()) for t in SeqType}
    assert len(dicts) == 1


def test_preserve_ordering_keeps_blocks_together():
    ds = DatasetConfig(augment=True)
    sp = SplitConfig(n_rare_classes=1603 * 8, n_common_classes=80, n_holdout_classes=80,
                     preserve_ordering_every_n=8)
    s = make_split(BuildConfig(dataset=ds, split=sp))
    groups = np.random.default_rng(1337).choice(range(1623), size=1623, replace=False)
    expected = (groups[:, None] * 8 + np.arange(8)).reshape(-1)
    np.testing.assert_array_equal(np.concatenate([s.rare, s.common, s.holdout]), expected)
    for pool in (s.rare, s.common, s.holdout):
        blocks = pool.reshape(-1, 8)
        assert (blocks // 8 == blocks[:, :1] // 8).all()
        assert (blocks % 8 == np.arange(8)).all()


def test_symbolic_and_separated_class_counts():
    s = make_split(BuildConfig(dataset=DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=50),
                               split=SplitConfig(n_rare_classes=30, n_common_classes=10, n_holdout_classes=5)))
    np.testing.assert_array_equal(
        np.concatenate([s.rare, s.common]), np.random.default_rng(1337).choice(range(50), size=50,
                                                                                replace=False)[:40])
    sep = make_split(BuildConfig(dataset=DatasetConfig(exemplars=Exemplars.SEPARATED)))
    assert sep.rare.max() < 1623 * 20 and sep.rare.max() >= 1623


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0, 2.5])
def test_zipf_weights_follow_the_formula(a):
    sp = SplitConfig(n_rare_classes=40, n_common_classes=5, n_holdout_classes=3, zipf_exponent=a)
    s = make_split(BuildConfig(split=sp))
    j = np.arange(45, 0, -1, dtype=np.float64)
    expected = j**-a / np.sum(j**-a)
    np.testing.assert_allclose(s.zipf_weights, expected, rtol=1e-12)
    assert s.zipf_weights.dtype == np.float64
    assert abs(s.zipf_weights.sum() - 1) < 1e-12
    if a > 0:
        assert (np.diff(s.zipf_weights) > 0).all()  # common classes (at the end) are the most frequent
    else:
        assert (s.zipf_weights == s.zipf_weights[0]).all()


def test_to_dict_is_json_with_weights_fingerprint():
    s = make_split(BuildConfig(split=SplitConfig(zipf_exponent=1.0)))
    d = json.loads(json.dumps(s.to_dict()))
    assert set(d) == {"rare", "common", "holdout", "zipf_weights_sha256"}
    assert all(isinstance(c, int) for c in d["rare"])
    assert d["zipf_weights_sha256"] == hashlib.sha256(s.zipf_weights.astype("<f8").tobytes()).hexdigest()
    other = make_split(BuildConfig(split=SplitConfig(zipf_exponent=1.1)))
    assert other.to_dict()["zipf_weights_sha256"] != d["zipf_weights_sha256"]


def test_split_is_frozen_and_read_only():
    s = make_split(BuildConfig())
    assert isinstance(s, ClassSplit)
    with pytest.raises(AttributeError):
        s.rare = s.common  # type: ignore[misc]
    with pytest.raises(ValueError):
        s.rare[0] = 1


def test_bad_split_options_raise_config_error():
    with pytest.raises(ConfigError, match="dataset has only"):
        make_split(BuildConfig(split=SplitConfig(n_rare_classes=2000)))
    with pytest.raises(ConfigError, match="must divide"):
        make_split(BuildConfig(split=SplitConfig(preserve_ordering_every_n=7)))
    with pytest.raises(ConfigError, match="zipf_exponent"):
        zipf_weights(1613, 1e6)
