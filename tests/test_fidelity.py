"""Fidelity to the original (Chan et al. 2022), found by reading it: example dropout at evaluation,
polysemy labels of zipfian pools, num_labels under `original` labeling, randomly_generate_rare in mixed."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from seqgen import shards as fmt
from seqgen.verify import verify
from seqgen.config import BuildConfig, DatasetConfig, ExampleType, Labeling, SeqType, SequenceConfig, SplitConfig
from seqgen.configio import ConfigError
from seqgen.sampling import generate
from seqgen.split import make_split
from tests.naive import naive_generate
from tests.trainkit import DATASET, SPLIT, symbolic_set, tiny_config
from trainer.config import with_overrides
from trainer.runtime.distributed import make_topology
from trainer.evaluate import evaluate_run
from trainer.fit import fit
from trainer.images import make_examples, prepare_table
from trainer.run import RunDir

SMALL = SplitConfig(n_rare_classes=30, n_common_classes=8, n_holdout_classes=6, zipf_exponent=1.0)
SYMBOLIC = DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=50)


# ---- example dropout acts at evaluation too, with a deterministic key ----------------------------------
def test_example_dropout_evaluates_reproducibly(tmp_path):
    """The original applies example dropout at train AND test; `trainer fit` used to crash at its first
    evaluation (no key). Now the evaluation key is a function of (seed, step, batch): evaluating the same
    checkpoint twice gives the same numbers, and the dropout really acts at evaluation."""
    train = symbolic_set(tmp_path, SeqType.BURSTY, 256)
    icl = symbolic_set(tmp_path, SeqType.FEWSHOT_HOLDOUT, 64, seed=1)
    cfg = tiny_config(steps=5, eval_every=5, checkpoint_every=5)
    cfg = with_overrides(cfg, {"model.example_dropout_prob": 0.5})
    fit(cfg, train, [icl], tmp_path / "run", progress=False)
    fitted = [r["metrics"] for r in RunDir(tmp_path / "run").read_metrics() if r["kind"] == "eval"]
    assert len(fitted) == 1 and fitted[0]["loss"]["n"] == 64

    def again(run):
        return evaluate_run(run, [icl], step=5, train_dir=None, max_seqs=None, batch_size=32, omniglot_dir=None,
                            cache_dir=None, topo=make_topology(), echo=lambda s: None)[0][2]

    assert again(tmp_path / "run") == again(tmp_path / "run") == fitted[0]  # same batches, same key
    # the same parameters without example dropout score differently: the dropout acts at evaluation
    run = RunDir(tmp_path / "run")
    stored = json.loads(run.config_path.read_text())
    stored["trainer"]["model"]["example_dropout_prob"] = 0.0
    run.config_path.write_text(json.dumps(stored))
    assert again(tmp_path / "run")["loss"]["mean"] != fitted[0]["loss"]["mean"]


# ---- polysemy: every label below num_labels, each class with its own labels -----------------------------
def _label_ranges(cfg: BuildConfig):
    s = make_split(cfg)
    X, n_rare = cfg.sequence.polysemy, cfg.split.n_rare_classes
    lo, hi = {}, {}
    for i, c in enumerate(s.rare):
        lo[int(c)], hi[int(c)] = i * X, i * X + X
    for j, c in enumerate(s.common):
        lo[int(c)], hi[int(c)] = n_rare * X + j, n_rare * X + j + 1
    return lo, hi


@pytest.mark.parametrize("X", [2, 3])
def test_zipfian_polysemy_labels_stay_in_range_and_with_their_class(X):
    """Non-bursty zipfian sequences and zipfian bursts under polysemy X: the original labels them beyond
    its own num_labels (and gives one label to two classes); here rare class i keeps its X labels
    [i*X, i*X+X) and common class j its label n_rare*X + j, everywhere in the sequence."""
    seq = SequenceConfig(polysemy=X, p_bursty=0.6, p_bursty_zipfian=0.5, p_bursty_common=0.2)
    cfg = BuildConfig(seq_type=SeqType.BURSTY, num_seqs=4000, dataset=SYMBOLIC, split=SMALL, sequence=seq)
    out = generate(cfg, make_split(cfg), 0, 4000)
    assert cfg.num_labels == X * 30 + 8
    assert 0 <= out["label"].min() and out["label"].max() < cfg.num_labels
    lo, hi = _label_ranges(cfg)
    ex, lab = out["example"].ravel(), out["label"].ravel()
    assert all(lo[int(e)] <= int(l) < hi[int(e)] for e, l in zip(ex, lab))
    rare_offsets = {int(l) % X for e, l in zip(ex, lab) if hi[int(e)] - lo[int(e)] == X}
    assert rare_offsets == set(range(X))
    # the slow reference implements the same labeling, draw for draw
    ref = naive_generate(cfg, make_split(cfg), 0, 200)
    for k in ("example", "label", "is_rare"):
        np.testing.assert_array_equal(out[k][:200], ref[k])


def test_augmented_polysemy_fits_the_label_dtype():
    """The issue's case: augmented Omniglot (12,700 rare + 100 common) with polysemy 2 gave labels up to
    38,199 in an int16 label dataset (max 32,767)."""
    cfg = BuildConfig(seq_type=SeqType.BURSTY, num_seqs=20000, dataset=DatasetConfig(augment=True),
                      split=SplitConfig(n_rare_classes=12700, n_common_classes=100, n_holdout_classes=80,
                                        preserve_ordering_every_n=8),
                      sequence=SequenceConfig(polysemy=2))
    out = generate(cfg, make_split(cfg), 0, 20000)
    dtype = fmt.storage_dtypes(cfg)["label"]
    assert cfg.num_labels == 25500 and dtype == np.int16
    assert 0 <= out["label"].min() and out["label"].max() < cfg.num_labels <= np.iinfo(dtype).max + 1
    assert out["label"].max() >= 25400  # common classes are in these sequences (labels 25400..25499)


def test_verify_checks_each_class_label(tmp_path):
    """`seqgen verify` passes a polysemy set and finds a label that is in range but not its class's."""
    folder = symbolic_set(tmp_path, SeqType.BURSTY, 300, polysemy=2, p_bursty_zipfian=0.5)
    manifest, problems = verify(folder)
    assert problems == []
    cfg = fmt.manifest_config(manifest)
    lo, hi = _label_ranges(cfg)
    path = folder / manifest["shards"][0]["file"]
    with h5py.File(path, "r+") as f:
        c = int(f["example"][0, 0])
        f["label"][0, 0] = (lo[c] + 2) % cfg.num_labels if hi[c] - lo[c] == 2 else (lo[c] + 1) % cfg.num_labels
    manifest["shards"][0]["sha256"] = fmt.file_sha256(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _, problems = verify(folder)
    assert len(problems) == 1 and "labels disagree with their classes' labeling" in problems[0], problems


def test_polysemy_sweep_sets_train(tmp_path):
    """The label-multiplicity sweep's sets (bursty with polysemy 2, and the matching fewshot_holdout and
    no_support_zipfian sets) verify, agree on num_labels, and train."""
    poly = {"polysemy": 2}
    train = symbolic_set(tmp_path, SeqType.BURSTY, 256, **poly)
    icl = symbolic_set(tmp_path, SeqType.FEWSHOT_HOLDOUT, 64, seed=1, **poly)
    iwl = symbolic_set(tmp_path, SeqType.NO_SUPPORT_ZIPFIAN, 64, seed=2, **poly)
    for folder in (train, icl, iwl):
        manifest, problems = verify(folder)
        assert problems == [] and manifest["num_labels"] == 2 * SPLIT.n_rare_classes + SPLIT.n_common_classes
    result = fit(tiny_config(steps=5, eval_every=5, checkpoint_every=5), train, [icl, iwl], tmp_path / "run",
                 progress=False)
    assert result.step == 5
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["num_labels"] == 65


def test_polysemy_needs_ordered_common_labels():
    seq = SequenceConfig(polysemy=2, labeling_common=Labeling.ORIGINAL)
    with pytest.raises(ConfigError, match="labeling_common = ordered"):
        BuildConfig(dataset=DATASET, split=SPLIT, sequence=seq).validate()


# ---- num_labels under `original` labeling ----------------------------------------------------------------
def test_original_labeling_counts_every_dataset_class():
    """Documented deviation: labels are dataset class ids, so the label space is the dataset's class
    count (the original's n_rare + n_common + n_holdout is too small when the split leaves classes out;
    the same number for the paper's full 1603 + 10 + 10 split)."""
    seq = SequenceConfig(labeling_common=Labeling.ORIGINAL, labeling_rare=Labeling.ORIGINAL)
    cfg = BuildConfig(seq_type=SeqType.NO_SUPPORT_ZIPFIAN, dataset=SYMBOLIC, split=SMALL, sequence=seq, num_seqs=500)
    out = generate(cfg, make_split(cfg), 0, 500)
    assert cfg.num_labels == 50 > SMALL.n_classes and out["label"].max() >= SMALL.n_classes
    assert BuildConfig(sequence=seq).num_labels == 1623 == SplitConfig().n_classes


# ---- randomly_generate_rare never applies to mixed sets ----------------------------------------------------
def test_mixed_sets_show_real_images_even_with_randomly_generate_rare():
    table = prepare_table(np.random.default_rng(0).integers(0, 256, (12, 20, 105, 105), dtype=np.uint8), 28)
    rare = np.zeros(1623, bool)
    rare[[3, 5]] = True
    batch = {"example": np.array([[3, 1, 5, 3, 5]], np.int32), "exemplar": np.array([[0, 1, 2, 3, 4]], np.int32),
             "noise_seed": np.array([11], np.uint32)}

    def images(seq_type, random_rare):
        cfg = BuildConfig(seq_type=seq_type, sequence=SequenceConfig(randomly_generate_rare=random_rare))
        return np.asarray(make_examples(table, batch, cfg, rare=rare))

    np.testing.assert_array_equal(images(SeqType.MIXED, True), images(SeqType.MIXED, False))
    assert not np.array_equal(images(SeqType.BURSTY, True), images(SeqType.BURSTY, False))  # elsewhere it acts
