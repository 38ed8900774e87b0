"""Building shard sets: content, manifest last, resume, corruption, refusal, workers, ranges, pixels."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from seqgen import build as B
from seqgen import shards as fmt
from seqgen.verify import verify
from seqgen.config import BuildConfig, DatasetConfig, ExampleType, Exemplars, SeqType
from seqgen.configio import ConfigError
from seqgen.sampling import generate
from seqgen.split import make_split
from tests.test_shards import symbolic_cfg


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[BuildConfig, Path]:
    """A finished 4-shard symbolic bursty set (1,800 rows: the last shard is short)."""
    cfg = symbolic_cfg(num_seqs=1800)
    folder = tmp_path_factory.mktemp("reference")
    res = B.build(cfg, folder, progress=False)
    assert res.built == (0, 1, 2, 3) and res.finalized
    return cfg, folder


def test_manifest_follows_the_readme_format(reference):
    cfg, folder = reference
    m = json.loads((folder / "manifest.json").read_text())
    assert set(m) == {"format", "format_version", "config", "length", "num_labels", "split", "image_table",
                      "materialized", "shards"}
    assert (m["format"], m["format_version"], m["length"], m["num_labels"]) == (
        "emergent-icl/seqgen-shards", 1, 9, 180)
    assert BuildConfig.from_dict(m["config"]) == cfg
    assert m["image_table"] is None and m["materialized"] is False
    assert m["split"] == make_split(cfg).to_dict()
    assert [(e["file"], e["start"], e["rows"]) for e in m["shards"]] == [
        ("shard-00000.h5", 0, 500), ("shard-00001.h5", 500, 500), ("shard-00002.h5", 1000, 500),
        ("shard-00003.h5", 1500, 300)]
    assert all(e["sha256"] == fmt.file_sha256(folder / e["file"]) for e in m["shards"])


def test_shards_hold_exactly_the_generated_rows(reference):
    cfg, folder = reference
    split = make_split(cfg)
    for i in range(cfg.num_shards):
        want = generate(cfg, split, i * cfg.shard_size, cfg.shard_rows(i))
        got = fmt.read_shard(folder / fmt.shard_file(i))
        for k in fmt.INDEX_KEYS:
            np.testing.assert_array_equal(got[k], want[k])


def test_rerun_of_a_finished_build_does_nothing(reference):
    cfg, folder = reference
    before = digests(folder)
    res = B.build(cfg, folder, progress=False)
    assert res.built == () and res.reused == (0, 1, 2, 3) and res.finalized
    assert digests(folder) == before


def test_interrupted_build_is_unfinished_and_resumes(reference, tmp_path: Path, monkeypatch):
    cfg, ref = reference
    real = fmt.write_shard
    calls = []

    def dying(path, **kw):
        calls.append(kw["shard"])
        if len(calls) == 3:
            (path.with_name(path.name + ".tmp")).write_bytes(b"half a shard")  # what a kill leaves
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(fmt, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        B.build(cfg, tmp_path, progress=False)
    monkeypatch.setattr(fmt, "write_shard", real)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(fmt.ShardError, match="has no manifest.json: an unfinished build"):
        fmt.read_manifest(tmp_path)
    res = B.build(cfg, tmp_path, progress=False)
    assert res.reused == (0, 1) and res.built == (2, 3) and res.finalized
    assert {k: v for k, v in digests(tmp_path).items() if not k.endswith(".tmp")} == digests(ref)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete_sidecar"])
def test_corrupt_shard_is_detected_and_rebuilt(reference, tmp_path: Path, damage: str):
    cfg, ref = reference
    shutil.copytree(ref, tmp_path, dirs_exist_ok=True)
    shard = tmp_path / fmt.shard_file(1)
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        (tmp_path / fmt.sidecar_file(1)).unlink()
    if damage != "delete_sidecar":
        _, problems = verify(tmp_path)
        assert problems == ["shard-00001.h5: sha256 differs from the manifest (corrupt or truncated)"]
    res = B.build(cfg, tmp_path, progress=False)
    assert res.built == (1,) and res.reused == (0, 2, 3)
    assert digests(tmp_path) == digests(ref)
    assert verify(tmp_path)[1] == []


def test_different_config_is_refused_without_overwrite(reference, tmp_path: Path):
    _, ref = reference
    shutil.copytree(ref, tmp_path, dirs_exist_ok=True)
    other = symbolic_cfg(num_seqs=1000, p_bursty=0.5)
    with pytest.raises(B.BuildError) as e:
        B.build(other, tmp_path, progress=False)
    msg = str(e.value)
    assert "--overwrite" in msg and "num_seqs: 1800 -> 1000" in msg and "\n" not in msg
    assert digests(tmp_path) == digests(ref)  # untouched
    res = B.build(other, tmp_path, overwrite=True, progress=False)
    assert res.built == (0, 1) and sorted(p.name for p in tmp_path.glob("shard-*.h5")) == [
        "shard-00000.h5", "shard-00001.h5"]
    assert fmt.manifest_config(fmt.read_manifest(tmp_path)) == other


def test_unknown_shard_files_are_refused(tmp_path: Path):
    (tmp_path / "shard-00000.h5").write_bytes(b"something else")
    with pytest.raises(B.BuildError, match="unknown build.*--overwrite"):
        B.build(symbolic_cfg(num_seqs=100), tmp_path, progress=False)
    (tmp_path / "notes.txt").write_text("kept")
    B.build(symbolic_cfg(num_seqs=100), tmp_path, overwrite=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "kept"


def test_unwritable_output_is_a_build_error(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(B.BuildError, match="cannot create output folder .*choose another --out"):
        B.build(symbolic_cfg(num_seqs=10), tmp_path / "file" / "out", progress=False)


def test_workers_give_byte_identical_output(reference, tmp_path: Path):
    cfg, ref = reference
    res = B.build(cfg, tmp_path, workers=2, progress=False)
    assert res.built == (0, 1, 2, 3)
    assert digests(tmp_path) == digests(ref)


def test_single_shard_rebuilt_alone_is_identical(reference, tmp_path: Path):
    cfg, ref = reference
    shutil.copytree(ref, tmp_path, dirs_exist_ok=True)
    (tmp_path / fmt.shard_file(2)).unlink()
    res = B.build(cfg, tmp_path, shards=range(2, 3), progress=False)
    assert res.built == (2,) and not res.finalized
    assert not (tmp_path / "manifest.json").exists()  # the set was unfinished; the range does not finish it
    assert (tmp_path / fmt.shard_file(2)).read_bytes() == (ref / fmt.shard_file(2)).read_bytes()
    res = B.finalize(tmp_path, progress=False)
    assert res.built == () and res.finalized
    assert digests(tmp_path) == digests(ref)


def test_ranges_then_finalize_equal_a_single_build(reference, tmp_path: Path):
    cfg, ref = reference
    assert B.build(cfg, tmp_path, shards=range(2), progress=False).built == (0, 1)
    assert not (tmp_path / "manifest.json").exists()
    assert B.build(cfg, tmp_path, shards=range(2, 4), progress=False).built == (2, 3)
    assert not (tmp_path / "manifest.json").exists()
    res = B.finalize(tmp_path, progress=False)
    assert res.reused == (0, 1, 2, 3) and res.finalized
    assert digests(tmp_path) == digests(ref)


def test_finalize_rebuilds_missing_ranges(reference, tmp_path: Path):
    cfg, ref = reference
    B.build(cfg, tmp_path, shards=range(1, 2), progress=False)
    res = B.finalize(tmp_path, progress=False)
    assert res.built == (0, 2, 3) and res.reused == (1,)
    assert digests(tmp_path) == digests(ref)


def test_finalize_needs_a_started_build(tmp_path: Path):
    with pytest.raises(B.BuildError, match="no seqgen build.*seqgen build"):
        B.finalize(tmp_path, progress=False)


def test_parse_shard_range():
    assert B.parse_shard_range("0:2", 4) == range(2)
    assert B.parse_shard_range("2:", 4) == range(2, 4)
    assert B.parse_shard_range(":1", 4) == range(1)
    for bad in ("3", "2:2", "3:9", "a:b", "-1:2"):
        with pytest.raises(ConfigError, match="not a range A:B with 0 <= A < B <= 4"):
            B.parse_shard_range(bad, 4)


def test_materialize_symbolic_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="symbolic examples have no pixels"):
        B.build(symbolic_cfg(num_seqs=10), tmp_path, materialize=True, progress=False)


def _fake_images(n_classes: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n_classes, 20, 105, 105), dtype=np.uint8)


def test_pixels_follow_the_readme_mapping():
    images = _fake_images(6)
    aug = BuildConfig(dataset=DatasetConfig(augment=True))
    ids = np.array([[8 * 5 + 7, 8 * 2 + 0, 8 * 3 + 1, 8 * 4 + 6]])
    exm = np.array([[3, 4, 19, 0]], dtype=np.uint8)
    got = B.pixels_of(images, aug, ids, exm)
    assert got.shape == (1, 4, 105, 105) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0, 0], np.rot90(images[5, 3][:, ::-1], 3))  # t=7: flip, then rot90 x3
    np.testing.assert_array_equal(got[0, 1], images[2, 4])
    np.testing.assert_array_equal(got[0, 2], np.rot90(images[3, 19], 1))  # counter-clockwise
    np.testing.assert_array_equal(got[0, 3], np.rot90(np.fliplr(images[4, 0]), 2))
    sep = BuildConfig(dataset=DatasetConfig(exemplars=Exemplars.SEPARATED, augment=True))
    got = B.pixels_of(images, sep, np.array([(5 * 20 + 13) * 8 + 4]), np.array([0], dtype=np.uint8))
    np.testing.assert_array_equal(got[0], images[5, 13][:, ::-1])  # separated: drawing = base % 20
    plain = BuildConfig(dataset=DatasetConfig(example_type=ExampleType.OMNIGLOT))
    np.testing.assert_array_equal(B.pixels_of(images, plain, np.array([1]), np.array([7]))[0], images[1, 7])


def test_materialized_shards_store_the_mapped_pixels(tmp_path: Path, monkeypatch):
    """--materialize end to end without real Omniglot: the image table is replaced by a fake one."""
    from seqgen import omniglot

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(1623, 20, 1, 1), dtype=np.uint8).repeat(105, 2).repeat(105, 3)
    images[:, :, 0, 1] = 7  # make the flips and rotations visible
    table = omniglot.ImageTable(images, ("a",) * 1623, ("c",) * 1623, "f" * 64)
    monkeypatch.setattr(B, "ensure_omniglot", lambda d, progress=True: Path("unused"))
    monkeypatch.setattr(omniglot, "load_image_table", lambda *a, **k: table)
    cfg = BuildConfig(num_seqs=40, shard_size=16, dataset=DatasetConfig(augment=True))
    B.build(cfg, tmp_path, materialize=True, progress=False)
    m = fmt.read_manifest(tmp_path)
    assert m["materialized"] and m["image_table"] == {"fingerprint": "f" * 64, "shape": [1623, 20, 105, 105]}
    assert verify(tmp_path)[1] == []
    data = fmt.read_shard(tmp_path / fmt.shard_file(2), ["example", "exemplar", "pixels"])
    assert data["pixels"].shape == (8, 9, 105, 105)
    np.testing.assert_array_equal(data["pixels"], B.pixels_of(images, cfg, data["example"], data["exemplar"]))


def test_bad_workers_is_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="--workers"):
        B.build(symbolic_cfg(num_seqs=10), tmp_path, workers=0, progress=False)


def test_seq_types_build_and_verify(tmp_path: Path):
    for t in SeqType:
        cfg = symbolic_cfg(t, num_seqs=300, shard_size=200)
        B.build(cfg, tmp_path / t.value, progress=False)
        assert verify(tmp_path / t.value, expected_split=make_split(cfg))[1] == [], t
