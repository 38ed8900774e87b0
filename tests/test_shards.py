"""The shard format: round trip, dtype narrowing, atomic writes, manifest reading, verify's checks."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from seqgen import shards as fmt
from seqgen.verify import check_invariants, verify
from seqgen.atomic import atomic_write_json
from seqgen.build import build
from seqgen.config import (
    BuildConfig,
    DatasetConfig,
    ExampleType,
    Labeling,
    SeqType,
    SequenceConfig,
    SplitConfig,
)
from seqgen.sampling import generate
from seqgen.split import make_split


def symbolic_cfg(seq_type: SeqType = SeqType.BURSTY, **kw) -> BuildConfig:
    return BuildConfig(
        seq_type=seq_type, num_seqs=kw.pop("num_seqs", 1200), shard_size=kw.pop("shard_size", 500),
        dataset=DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=kw.pop("symbolic_size", 200)),
        split=SplitConfig(n_rare_classes=150, n_common_classes=20, n_holdout_classes=10),
        sequence=SequenceConfig(**kw),
    )


def test_dtype_narrowing_follows_the_value_range():
    assert fmt.narrow_int_dtype(32767) == np.int16
    assert fmt.narrow_int_dtype(32768) == np.int32
    small = fmt.storage_dtypes(symbolic_cfg())
    assert (small["example"], small["label"]) == (np.int16, np.int16)
    big = BuildConfig(
        dataset=DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=40_000),
        split=SplitConfig(n_rare_classes=100, n_common_classes=10, n_holdout_classes=10),
        sequence=SequenceConfig(labeling_common=Labeling.ORIGINAL),
    )
    dt = fmt.storage_dtypes(big)
    assert (dt["example"], dt["label"]) == (np.int32, np.int32)  # labels = dataset ids up to 39,999
    assert (dt["exemplar"], dt["is_rare"], dt["noise_seed"]) == (np.uint8, np.uint8, np.uint32)


def test_write_read_round_trip_is_atomic_and_deterministic(tmp_path: Path):
    cfg = symbolic_cfg()
    arrays = generate(cfg, make_split(cfg), 500, 300)
    path = tmp_path / fmt.shard_file(1)
    sha = fmt.write_shard(path, shard=1, start=500, arrays=arrays, dtypes=fmt.storage_dtypes(cfg))
    assert sha == fmt.file_sha256(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00001.h5"]  # no .tmp left behind
    back = fmt.read_shard(path)
    assert sorted(back) == sorted(fmt.INDEX_KEYS)
    for k in fmt.INDEX_KEYS:
        assert back[k].dtype == fmt.storage_dtypes(cfg)[k]
        np.testing.assert_array_equal(back[k], arrays[k])
    with h5py.File(path, "r") as f:
        assert {k: int(v) for k, v in f.attrs.items()} == {"format_version": 1, "shard": 1, "start": 500, "rows": 300}
    again = tmp_path / "again.h5"
    assert fmt.write_shard(again, shard=1, start=500, arrays=arrays, dtypes=fmt.storage_dtypes(cfg)) == sha


def test_noise_seed_is_stored_when_the_config_needs_it(tmp_path: Path):
    cfg = BuildConfig(num_seqs=10, split=SplitConfig(n_rare_classes=50, n_common_classes=5, n_holdout_classes=5),
                      sequence=SequenceConfig(noise_scale=0.1))
    arrays = generate(cfg, make_split(cfg), 0, 10)
    fmt.write_shard(tmp_path / "s.h5", shard=0, start=0, arrays=arrays, dtypes=fmt.storage_dtypes(cfg))
    back = fmt.read_shard(tmp_path / "s.h5")
    assert back["noise_seed"].dtype == np.uint32 and back["noise_seed"].shape == (10,)
    assert fmt.expected_keys(cfg, False) == fmt.INDEX_KEYS + ("noise_seed",)


def test_read_manifest_errors_are_one_line(tmp_path: Path):
    with pytest.raises(fmt.ShardError, match="is an empty directory.*seqgen build"):
        fmt.read_manifest(tmp_path)  # described as it is (docs/reliability.md, "Paths described as they are")
    (tmp_path / fmt.BUILD_FILE).write_text("{}")
    with pytest.raises(fmt.ShardError, match="has no manifest.json: an unfinished build.*seqgen finalize"):
        fmt.read_manifest(tmp_path)
    (tmp_path / fmt.BUILD_FILE).unlink()
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other", "format_version": 7}))
    with pytest.raises(fmt.ShardError, match="expected 'emergent-icl/seqgen-shards' v1"):
        fmt.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(fmt.ShardError, match="unreadable") as e:
        fmt.read_manifest(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(fmt.ShardError, match="cannot read"):
        fmt.read_shard(tmp_path / "missing.h5")


def test_atomic_write_json_leaves_no_tmp(tmp_path: Path):
    atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("seq_type", list(SeqType))
def test_invariants_hold_on_generated_data(seq_type: SeqType):
    cfg = symbolic_cfg(seq_type)
    split = make_split(cfg)
    header = fmt.build_header(cfg, split, None, False)
    assert check_invariants(cfg, header, generate(cfg, split, 0, 600), sample=600) == []


def _tampered(seq_type: SeqType, edit) -> list[str]:
    cfg = symbolic_cfg(seq_type)
    split = make_split(cfg)
    data = generate(cfg, split, 0, 300)
    edit(data, split, cfg)
    return check_invariants(cfg, fmt.build_header(cfg, split, None, False), data, sample=300)


def test_invariant_checks_catch_each_kind_of_damage():
    def label_out(d, s, c):
        d["label"][5, 2] = c.num_labels

    def holdout_class(d, s, c):
        d["example"][7, 0] = s.holdout[0]

    def exemplar(d, s, c):
        d["exemplar"][3, 3] = 1  # symbolic: one exemplar per class

    def class_out(d, s, c):
        d["example"][0, 0] = c.dataset.num_dataset_classes

    def rare_flag(d, s, c):
        d["example"][1, :] = s.common[0]
        d["is_rare"][1, :] = 1

    assert any("labels outside" in p for p in _tampered(SeqType.BURSTY, label_out))
    assert any("outside the zipfian pool" in p for p in _tampered(SeqType.BURSTY, holdout_class))
    assert any("exemplar >=" in p for p in _tampered(SeqType.BURSTY, exemplar))
    assert _tampered(SeqType.BURSTY, class_out) == ["example class ids outside [0, 200)"]
    assert any("is_rare = 1" in p for p in _tampered(SeqType.BURSTY, rare_flag))

    def no_support(d, s, c):
        d["example"][4, 0] = d["example"][4, -1]

    def fewshot(d, s, c):
        d["label"][9, -1] = (d["label"][9, -1] + 1) % c.sequence.ways + c.sequence.ways  # a label not in context

    assert any("no-support" in p for p in _tampered(SeqType.NO_SUPPORT_ZIPFIAN, no_support))
    assert any("few-shot" in p for p in _tampered(SeqType.FEWSHOT_RARE, fewshot))

    def mixed_common(d, s, c):
        rows = np.flatnonzero(d["is_rare"][:, -1] == 0)
        d["example"][rows[0], 0] = s.rare[0]

    assert any("mixed" in p for p in _tampered(SeqType.MIXED, mixed_common))


def test_verify_reports_hash_shape_and_invariant_problems(tmp_path: Path):
    cfg = symbolic_cfg()
    build(cfg, tmp_path, progress=False)
    manifest, problems = verify(tmp_path, expected_split=make_split(cfg))
    assert problems == [] and len(manifest["shards"]) == 3

    # a shard rewritten with a bad label and a re-signed manifest: only the invariant check can see it
    path = tmp_path / fmt.shard_file(1)
    with h5py.File(path, "r+") as f:
        f["label"][0, 0] = cfg.num_labels
    manifest["shards"][1]["sha256"] = fmt.file_sha256(path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    _, problems = verify(tmp_path)
    assert problems == [f"shard-00001.h5: labels outside [0, num_labels={cfg.num_labels})"]

    with path.open("r+b") as f:  # flipped bytes
        f.seek(2000)
        b = f.read(1)
        f.seek(2000)
        f.write(bytes([b[0] ^ 0xFF]))
    _, problems = verify(tmp_path)
    assert problems == ["shard-00001.h5: sha256 differs from the manifest (corrupt or truncated)"]

    (tmp_path / fmt.shard_file(2)).unlink()
    _, problems = verify(tmp_path)
    assert problems[-1] == "shard-00002.h5: missing"

    manifest["split"]["rare"] = manifest["split"]["rare"][::-1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    _, problems = verify(tmp_path, expected_split=make_split(cfg))
    assert "manifest split differs from the split its config produces" in problems


def test_verify_checks_dtypes_and_attributes(tmp_path: Path):
    cfg = symbolic_cfg(num_seqs=500)
    build(cfg, tmp_path, progress=False)
    path = tmp_path / fmt.shard_file(0)
    with h5py.File(path, "r+") as f:
        f.attrs["start"] = np.int64(7)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = fmt.file_sha256(path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    _, problems = verify(tmp_path)
    assert len(problems) == 1 and "attributes" in problems[0]
    with h5py.File(path, "r+") as f:
        f.attrs["start"] = np.int64(0)
        data = f["label"][()]
        del f["label"]
        f.create_dataset("label", data=data.astype(np.int32))
    manifest["shards"][0]["sha256"] = fmt.file_sha256(path)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    _, problems = verify(tmp_path)
    assert problems == ["shard-00000.h5: label is int32[500, 9], expected int16[500, 9]"]
