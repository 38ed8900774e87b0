"""seqgen.sampling: kernels == the slow reference (tests/naive.py), invariants per type, determinism."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqgen.config import BuildConfig, DatasetConfig, ExampleType, Exemplars, Labeling, NonBurstyType, SeqType, SequenceConfig, SplitConfig
from seqgen.configio import ConfigError
from seqgen.rng import base_key
from seqgen.sampling import SEQ_TYPE_TAGS, generate
from seqgen.split import make_split
from tests.naive import naive_generate

pytestmark = pytest.mark.usefixtures("warm_kernels")
ROOT = Path(__file__).resolve().parents[1]

SYMBOLIC = DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=50)
OMNIGLOT = DatasetConfig()  # 20 exemplars per class, drawn without replacement
SEPARATED = DatasetConfig(exemplars=Exemplars.SEPARATED)
SINGLE = DatasetConfig(exemplars=Exemplars.SINGLE)
AUGMENT = DatasetConfig(augment=True)
SMALL = SplitConfig(n_rare_classes=30, n_common_classes=8, n_holdout_classes=6)
ZIPF = dataclasses.replace(SMALL, zipf_exponent=1.0)

# (name, dataset, split, sequence options): run for every sequence type that accepts them
CASES = [
    ("default-symbolic", SYMBOLIC, SMALL, SequenceConfig()),
    ("omniglot-zipf", OMNIGLOT, ZIPF, SequenceConfig()),
    ("separated-zipf", SEPARATED, ZIPF, SequenceConfig()),
    ("single", SINGLE, SMALL, SequenceConfig(p_bursty=0.5)),
    ("augment-blocks", AUGMENT, SplitConfig(n_rare_classes=80, n_common_classes=16, n_holdout_classes=16,
                                           zipf_exponent=0.7, preserve_ordering_every_n=8), SequenceConfig()),
    ("zipf-common-rare", OMNIGLOT, dataclasses.replace(ZIPF, zipf_exponent=1.3, use_zipf_for_common_rare=True),
     SequenceConfig(p_bursty_zipfian=0.0, p_bursty_common=0.4)),
    ("polysemy", OMNIGLOT, ZIPF, SequenceConfig(polysemy=3, p_bursty_common=0.3, p_bursty_zipfian=0.3)),
    ("polysemy-no-remainder", SYMBOLIC, ZIPF,
     SequenceConfig(polysemy=2, seq_len=7, p_bursty_common=0.5, p_bursty_zipfian=0.2, grouped=True)),
    ("original-labels", OMNIGLOT, ZIPF, SequenceConfig(labeling_common=Labeling.ORIGINAL,
                                                       labeling_rare=Labeling.ORIGINAL, p_bursty_zipfian=0.5)),
    ("unfixed-rare", SYMBOLIC, ZIPF, SequenceConfig(labeling_rare=Labeling.UNFIXED, p_bursty_zipfian=0.0)),
    ("unfixed-zipf-no-remainder", SYMBOLIC, ZIPF,
     SequenceConfig(labeling_rare=Labeling.UNFIXED, seq_len=7, p_bursty=0.7)),
    ("grouped-3way", OMNIGLOT, ZIPF, SequenceConfig(grouped=True, ways=3, fs_shots=3, bursty_shots=2, seq_len=11)),
    ("common-uniform", SYMBOLIC, ZIPF, SequenceConfig(non_bursty_type=NonBurstyType.COMMON_UNIFORM, p_bursty=0.3)),
    ("common-no-support", OMNIGLOT, ZIPF,
     SequenceConfig(non_bursty_type=NonBurstyType.COMMON_NO_SUPPORT, p_bursty=0.4, p_fewshot=0.6)),
    ("p-bursty-1", SEPARATED, SMALL, SequenceConfig(p_bursty=1.0, p_bursty_zipfian=0.0, p_fewshot=1.0)),
    ("p-bursty-0", OMNIGLOT, ZIPF, SequenceConfig(p_bursty=0.0, p_fewshot=0.0)),
    ("noise-seeds", OMNIGLOT, SMALL, SequenceConfig(noise_scale=0.2, randomly_generate_rare=True)),
    ("steep-zipf", SYMBOLIC, dataclasses.replace(SMALL, zipf_exponent=4.0), SequenceConfig(ways=1, seq_len=4)),
]


def _cfg(seq_type, dataset=SYMBOLIC, split=SMALL, sequence=None, seed=0, **kw):
    return BuildConfig(seq_type=seq_type, num_seqs=1000, seed=seed, dataset=dataset, split=split,
                       sequence=sequence or SequenceConfig(), **kw)


def _valid(cfg):
    try:
        cfg.validate()
        from seqgen.sampling import check_supported

        check_supported(cfg, make_split(cfg))
    except ConfigError:
        return False
    return True


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name,dataset,split,sequence", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_naive_reference(name, dataset, split, sequence):
    ran = 0
    for t in SeqType:
        cfg = _cfg(t, dataset, split, sequence, seed=11)
        if not _valid(cfg):
            continue
        s = make_split(cfg)
        _assert_same(generate(cfg, s, 5, 150), naive_generate(cfg, s, 5, 150))
        ran += 1
    assert ran >= 5, f"only {ran} sequence types accepted case {name}"


def test_naive_comparison_detects_a_changed_stream():
    cfg = _cfg(SeqType.BURSTY)
    s = make_split(cfg)
    a = generate(cfg, s, 0, 50)
    b = naive_generate(dataclasses.replace(cfg, seed=1), s, 0, 50)
    assert not np.array_equal(a["example"], b["example"])


def test_output_shapes_and_dtypes():
    for t in SeqType:
        cfg = _cfg(t, OMNIGLOT, SMALL, SequenceConfig(noise_scale=0.1))
        out = generate(cfg, make_split(cfg), 0, 7)
        L = 9
        assert {k: (v.shape, v.dtype.name) for k, v in out.items()} == {
            "example": ((7, L), "int32"), "exemplar": ((7, L), "uint8"), "label": ((7, L), "int32"),
            "is_rare": ((7, L), "uint8"), "noise_seed": ((7,), "uint32")}
    cfg = _cfg(SeqType.FEWSHOT_RARE, sequence=SequenceConfig(fs_shots=2, ways=3))
    out = generate(cfg, make_split(cfg), 3, 4)
    assert out["example"].shape == (4, 7) and "noise_seed" not in out
    assert generate(cfg, make_split(cfg), 0, 0)["label"].shape == (0, 7)


# ---- invariants (hypothesis) -------------------------------------------------------------------
_seq_options = st.fixed_dictionaries({
    "ways": st.integers(1, 4), "fs_shots": st.integers(1, 4), "grouped": st.booleans(),
    "p_bursty": st.sampled_from([0.0, 0.5, 1.0]), "p_fewshot": st.sampled_from([0.0, 0.5, 1.0]),
})
_datasets = st.sampled_from([SYMBOLIC, OMNIGLOT, SEPARATED])
_splits = st.sampled_from([SMALL, ZIPF, dataclasses.replace(ZIPF, use_zipf_for_common_rare=True)])
_hyp = settings(deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])


@_hyp
@given(t=st.sampled_from([t for t in SeqType if t.is_fewshot]), opts=_seq_options, ds=_datasets, sp=_splits,
       seed=st.integers(0, 2**40))
def test_fewshot_invariants(t, opts, ds, sp, seed):
    cfg = _cfg(t, ds, sp, SequenceConfig(**opts), seed=seed)
    s = make_split(cfg)
    out = generate(cfg, s, 0, 200)
    ways, shots = opts["ways"], opts["fs_shots"]
    pool = {"fewshot_rare": s.rare, "fewshot_common": s.common, "fewshot_holdout": s.holdout,
            "fewshot_zipfian": s.non_holdout}[t.value]
    assert np.isin(out["example"], pool).all()
    assert ((out["label"] >= 0) & (out["label"] < ways)).all()
    assert (out["is_rare"] == (t is SeqType.FEWSHOT_RARE)).all()
    for ex, lb in zip(out["example"], out["label"]):
        support_ex, support_lb = ex[:-1], lb[:-1]
        assert lb[-1] in support_lb
        for w in range(ways):  # every label `w` marks one class, `shots` times
            cls = set(support_ex[support_lb == w].tolist())
            assert (support_lb == w).sum() == shots and len(cls) == 1
        assert ex[-1] in support_ex[support_lb == lb[-1]]
        if len(set(support_ex.tolist())) == ways:  # distinct classes: each exactly `shots` times
            assert all((support_ex == c).sum() == shots for c in set(support_ex.tolist()))
        if opts["grouped"]:
            assert (np.sort(support_lb.reshape(shots, ways), axis=1) == np.arange(ways)).all()


@_hyp
@given(t=st.sampled_from([t for t in SeqType if t.is_no_support]), ds=_datasets, sp=_splits,
       seq_len=st.integers(2, 12), original=st.booleans(), seed=st.integers(0, 2**40))
def test_no_support_invariants(t, ds, sp, seq_len, original, seed):
    lab = Labeling.ORIGINAL if original else Labeling.ORDERED
    cfg = _cfg(t, ds, sp, SequenceConfig(seq_len=seq_len, labeling_common=lab), seed=seed)
    s = make_split(cfg)
    out = generate(cfg, s, 0, 200)
    pool = {"no_support_rare": s.rare, "no_support_common": s.common, "no_support_zipfian": s.non_holdout}[t.value]
    offset = sp.n_rare_classes if t is SeqType.NO_SUPPORT_COMMON else 0
    index = {int(c): i for i, c in enumerate(pool)}
    for ex, lb in zip(out["example"], out["label"]):
        assert ex[-1] not in ex[:-1]
        expected = ex if original else np.array([index[int(c)] + offset for c in ex])
        np.testing.assert_array_equal(lb, expected)
    assert (out["is_rare"] == (t is SeqType.NO_SUPPORT_RARE)).all()


@_hyp
@given(t=st.sampled_from(list(SeqType)), ds=_datasets, sp=_splits, opts=_seq_options, seed=st.integers(0, 2**40))
def test_exemplars_distinct_within_class(t, ds, sp, opts, seed):
    cfg = _cfg(t, ds, sp, SequenceConfig(**opts), seed=seed)
    if not _valid(cfg):
        return
    out = generate(cfg, make_split(cfg), 0, 100)
    n_ex = ds.exemplars_per_class
    assert (out["exemplar"] < n_ex).all()
    for ex, exm in zip(out["example"], out["exemplar"]):
        pairs = set(zip(ex.tolist(), exm.tolist()))
        assert len(pairs) == len(ex) or n_ex == 1


@_hyp
@given(t=st.sampled_from(list(SeqType)), start=st.integers(0, 10**12), a=st.integers(0, 60), b=st.integers(0, 60),
       seed=st.integers(0, 2**63 - 1))
def test_rows_independent_of_slicing(t, start, a, b, seed):
    lo, hi = min(a, b), max(a, b)
    cfg = _cfg(t, OMNIGLOT, ZIPF, SequenceConfig(noise_scale=0.5), seed=seed)
    s = make_split(cfg)
    whole = generate(cfg, s, start, 60)
    part = generate(cfg, s, start + lo, hi - lo)
    _assert_same({k: v[lo:hi] for k, v in whole.items()}, part)


def test_slicing_example_from_the_brief():
    cfg = _cfg(SeqType.BURSTY, OMNIGLOT, ZIPF)
    s = make_split(cfg)
    _assert_same({k: v[37:60] for k, v in generate(cfg, s, 0, 100).items()}, generate(cfg, s, 37, 23))


# ---- labelings ---------------------------------------------------------------------------------
def test_bursty_ordered_labels_are_the_non_holdout_index():
    cfg = _cfg(SeqType.BURSTY, OMNIGLOT, ZIPF, SequenceConfig(p_bursty_zipfian=0.3, p_bursty_common=0.3))
    s = make_split(cfg)
    out = generate(cfg, s, 0, 2000)
    index = {int(c): i for i, c in enumerate(s.non_holdout)}
    np.testing.assert_array_equal(out["label"], np.vectorize(index.__getitem__)(out["example"]))
    rare = np.isin(out["example"], s.rare)
    assert rare[out["is_rare"] == 1].all()
    assert (out["is_rare"][rare] == 0).any()  # zipfian parts flag no example as rare (original _get_is_rare_seq)


def test_bursty_polysemy_labels():
    X = 3
    seq = SequenceConfig(polysemy=X, p_bursty=0.8, p_bursty_zipfian=0.0, non_bursty_type=NonBurstyType.COMMON_UNIFORM)
    cfg = _cfg(SeqType.BURSTY, OMNIGLOT, ZIPF, seq)
    s = make_split(cfg)
    out = generate(cfg, s, 0, 3000)
    rare_idx = {int(c): i for i, c in enumerate(s.rare)}
    common_idx = {int(c): i for i, c in enumerate(s.common)}
    offsets = []
    for ex, lb in zip(out["example"].ravel(), out["label"].ravel()):
        if int(ex) in rare_idx:
            assert lb // X == rare_idx[int(ex)]
            offsets.append(lb % X)
        else:
            assert lb == common_idx[int(ex)] + SMALL.n_rare_classes * X  # the original's ordered{n_rare*X}
    assert set(offsets) == set(range(X))
    # one label per few-shot class within a sequence (the label offset is drawn per class, not per example)
    for lb, rr in zip(out["label"], out["is_rare"]):
        if rr.any():  # a rare burst: `ways` labels, `shots` times each in the support
            labels, counts = np.unique(lb[:-1][rr[:-1] == 1], return_counts=True)
            assert len(labels) <= 2 and lb[-1] in labels
            assert set(counts.tolist()) <= {3, 6}
    assert cfg.num_labels == X * SMALL.n_rare_classes + SMALL.n_common_classes
    assert out["label"].max() < cfg.num_labels


def test_original_labels_are_class_ids():
    seq = SequenceConfig(labeling_common=Labeling.ORIGINAL, labeling_rare=Labeling.ORIGINAL)
    for t in (SeqType.BURSTY, SeqType.NO_SUPPORT_ZIPFIAN):
        cfg = _cfg(t, SEPARATED, ZIPF, seq)
        out = generate(cfg, make_split(cfg), 0, 500)
        np.testing.assert_array_equal(out["label"], out["example"])


def test_mixed_sequences():
    cfg = _cfg(SeqType.MIXED, OMNIGLOT, ZIPF, SequenceConfig(p_fewshot=0.5))
    s = make_split(cfg)
    out = generate(cfg, s, 0, 1000)
    fewshot = out["is_rare"][:, 0] == 1
    assert 0.4 < fewshot.mean() < 0.6
    assert (out["is_rare"] == fewshot[:, None]).all()
    assert np.isin(out["example"][fewshot], s.rare).all() and (out["label"][fewshot] < 2).all()
    common_idx = {int(c): i + SMALL.n_rare_classes for i, c in enumerate(s.common)}
    expected = np.vectorize(common_idx.__getitem__)(out["example"][~fewshot])
    np.testing.assert_array_equal(out["label"][~fewshot], expected)


def test_holdout_types_use_only_holdout_classes():
    cfg = _cfg(SeqType.FEWSHOT_HOLDOUT, OMNIGLOT, SMALL)
    s = make_split(cfg)
    out = generate(cfg, s, 0, 2000)
    assert set(np.unique(out["example"]).tolist()) == set(s.holdout.tolist())


# ---- determinism -------------------------------------------------------------------------------
def _digest(out):
    h = hashlib.sha256()
    for k in sorted(out):
        h.update(k.encode() + out[k].tobytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_or_type_differs():
    cfg = _cfg(SeqType.BURSTY, OMNIGLOT, ZIPF)
    s = make_split(cfg)
    assert _digest(generate(cfg, s, 0, 5000)) == _digest(generate(cfg, s, 0, 5000))
    assert _digest(generate(dataclasses.replace(cfg, seed=1), s, 0, 5000)) != _digest(generate(cfg, s, 0, 5000))
    assert len({int(base_key(0, tag)) for tag in SEQ_TYPE_TAGS.values()}) == len(SeqType)
    a = generate(_cfg(SeqType.FEWSHOT_ZIPFIAN, OMNIGLOT, ZIPF), s, 0, 500)
    b = generate(_cfg(SeqType.NO_SUPPORT_ZIPFIAN, OMNIGLOT, ZIPF), s, 0, 500)
    assert (a["example"][:, -1] != b["example"][:, -1]).mean() > 0.5


_SUBPROCESS = """
import hashlib, json, sys
from seqgen.config import BuildConfig
from seqgen.sampling import generate
from seqgen.split import make_split
res = {}
for d in json.loads(sys.argv[1]):
    cfg = BuildConfig.from_dict(d["cfg"])
    out = generate(cfg, make_split(cfg), d["start"], d["count"])
    h = hashlib.sha256()
    for k in sorted(out):
        h.update(k.encode() + out[k].tobytes())
    res[cfg.seq_type.value] = h.hexdigest()
print(json.dumps(res))
"""


def _jobs(count):
    jobs = []
    for t in SeqType:
        seq = SequenceConfig(polysemy=1 if t.is_strategy else 2, noise_scale=0.3)  # strategy types refuse polysemy
        cfg = _cfg(t, OMNIGLOT, ZIPF, seq, seed=99)
        jobs.append({"cfg": cfg.to_dict(), "start": 1234, "count": count})
    return jobs


def _run_subprocess(jobs, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    r = subprocess.run([sys.executable, "-W", "error", "-c", _SUBPROCESS, json.dumps(jobs)], cwd=ROOT,
                       env=full_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _in_process(jobs):
    res = {}
    for d in jobs:
        cfg = BuildConfig.from_dict(d["cfg"])
        res[cfg.seq_type.value] = _digest(generate(cfg, make_split(cfg), d["start"], d["count"]))
    return res


def test_one_thread_equals_two_threads():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs >= 2 numba threads")
    jobs = _jobs(20_000)
    numba.set_num_threads(2)
    assert _run_subprocess(jobs, NUMBA_NUM_THREADS="1") == _in_process(jobs)


def test_disable_jit_equals_compiled():
    jobs = _jobs(40)
    assert _run_subprocess(jobs, NUMBA_DISABLE_JIT="1") == _in_process(jobs)


# ---- bad input ---------------------------------------------------------------------------------
def test_too_many_repeats_for_the_exemplars_is_a_config_error():
    cfg = _cfg(SeqType.BURSTY, OMNIGLOT, SMALL, SequenceConfig(seq_len=21))
    with pytest.raises(ConfigError, match="exemplars"):
        generate(cfg, make_split(cfg), 0, 1)
    ok = _cfg(SeqType.NO_SUPPORT_RARE, OMNIGLOT, SMALL, SequenceConfig(seq_len=21))  # query never repeats
    assert generate(ok, make_split(ok), 0, 3)["example"].shape == (3, 21)
    sym = _cfg(SeqType.BURSTY, SYMBOLIC, SMALL, SequenceConfig(seq_len=40))
    assert (generate(sym, make_split(sym), 0, 3)["exemplar"] == 0).all()


def test_unfixed_remainder_is_a_config_error():
    cfg = _cfg(SeqType.BURSTY, SYMBOLIC, SMALL, SequenceConfig(labeling_rare=Labeling.UNFIXED))
    with pytest.raises(ConfigError, match="unfixed"):
        generate(cfg, make_split(cfg), 0, 1)


def test_bad_arguments_are_config_errors():
    cfg = _cfg(SeqType.BURSTY)
    s = make_split(cfg)
    with pytest.raises(ConfigError, match="start"):
        generate(cfg, s, -1, 3)
    with pytest.raises(ConfigError, match="make_split"):
        generate(_cfg(SeqType.BURSTY, split=ZIPF), make_split(_cfg(SeqType.BURSTY, split=SMALL, dataset=OMNIGLOT)),
                 0, 3)
    with pytest.raises(ConfigError, match="make_split"):  # same sizes, other Zipf exponent
        generate(_cfg(SeqType.BURSTY, split=ZIPF), make_split(_cfg(SeqType.BURSTY, split=SMALL)), 0, 3)
    with pytest.raises(ConfigError, match="p_bursty"):
        generate(_cfg(SeqType.BURSTY, sequence=SequenceConfig(p_bursty=1.5)), s, 0, 3)
