"""trainer.data: shard set validation, deterministic batch stream, resume, per-host slices, errors, eval batches."""

from __future__ import annotations

import dataclasses
import json
import threading

import h5py
import numpy as np
import pytest

from seqgen.config import BuildConfig, DatasetConfig, ExampleType, SequenceConfig, SplitConfig
from tests.shardkit import write_shard_set
from trainer import data as data_mod
from trainer.data import BatchStream, DataError, check_compatible, eval_batches, open_shard_set

N, L = 37, 9
SYMBOLIC = BuildConfig(
    dataset=DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=60),
    split=SplitConfig(n_rare_classes=40, n_common_classes=10, n_holdout_classes=10),
)
NOISY = BuildConfig(split=SplitConfig(n_rare_classes=1600, n_common_classes=13, n_holdout_classes=10),
                    sequence=SequenceConfig(noise_scale=0.1))


def _arrays(n: int, seed: bool = False) -> dict[str, np.ndarray]:
    r = np.arange(n * L).reshape(n, L)
    out = {"example": r % 50, "exemplar": r % 20, "label": r % 7 + 40 * (r // L), "is_rare": r % 2}
    if seed:
        out["noise_seed"] = np.arange(n, dtype=np.uint32) * 7 + 3
    return out


@pytest.fixture
def sset(tmp_path):
    arrays = _arrays(N, seed=True)
    write_shard_set(tmp_path / "s", NOISY, arrays, shard_size=10)
    return open_shard_set(tmp_path / "s", check_checksums=True), arrays


def slow_rows(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[rows] for k, v in arrays.items()}


def _assert_batch(batch, arrays, rows):
    ref = slow_rows(arrays, rows)
    np.testing.assert_array_equal(batch["row"], rows)
    for k in ref:
        np.testing.assert_array_equal(batch[k], ref[k], err_msg=k)


# ---- open / validate -------------------------------------------------------------------------
def test_open_reads_manifest(sset):
    ss, _ = sset
    assert (ss.num_seqs, ss.length, ss.num_labels) == (N, L, NOISY.num_labels)
    assert ss.config.sequence.noise_scale == 0.1 and ss.image_table_fingerprint == "test-table"
    assert len(ss.shards) == 4 and ss.shards[-1].rows == 7
    assert len(ss.split["rare"]) == 1600


def test_unfinished_set_refused(tmp_path):
    write_shard_set(tmp_path, SYMBOLIC, _arrays(5), 4, manifest=False)
    with pytest.raises(DataError, match="unfinished build") as e:
        open_shard_set(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        open_shard_set(tmp_path / "nope")


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format_version=2), "format_version 2"),
    (lambda m: m.update(format="other"), "not a seqgen shard manifest"),
    (lambda m: m["shards"][0].update(rows=3), "shape|starts at"),
    (lambda m: m["shards"].pop(), "hold 4 sequences"),
    (lambda m: m["config"]["sequence"].update(ways=-1), "config is invalid"),
    (lambda m: m.update(length=4), "disagree"),
])
def test_bad_manifest_refused(tmp_path, edit, match):
    write_shard_set(tmp_path, SYMBOLIC, _arrays(7), 4)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(DataError, match=match) as e:
        open_shard_set(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_shard_and_checksum(tmp_path):
    write_shard_set(tmp_path, SYMBOLIC, _arrays(7), 4)
    with h5py.File(tmp_path / "shard-00001.h5", "r+") as f:
        f["label"][0, 0] = 99
    open_shard_set(tmp_path)  # structure fine
    with pytest.raises(DataError, match="sha256"):
        open_shard_set(tmp_path, check_checksums=True)
    (tmp_path / "shard-00001.h5").unlink()
    with pytest.raises(DataError, match="missing"):
        open_shard_set(tmp_path)


def test_missing_noise_seed_refused(tmp_path):
    write_shard_set(tmp_path, NOISY, _arrays(5, seed=False), 5)
    with pytest.raises(DataError, match="noise_seed"):
        open_shard_set(tmp_path)


def test_check_compatible(tmp_path):
    write_shard_set(tmp_path / "a", SYMBOLIC, _arrays(5), 5)
    a = open_shard_set(tmp_path / "a")
    same = dataclasses.replace(SYMBOLIC, seed=5)
    write_shard_set(tmp_path / "b", same, _arrays(5), 5)
    check_compatible(a, open_shard_set(tmp_path / "b"))
    other_split = dataclasses.replace(SYMBOLIC, split=dataclasses.replace(SYMBOLIC.split, split_seed=1))
    write_shard_set(tmp_path / "c", other_split, _arrays(5), 5)
    with pytest.raises(DataError, match="class split differs") as e:
        check_compatible(a, open_shard_set(tmp_path / "c"))
    assert "\n" not in str(e.value)
    bigger = dataclasses.replace(SYMBOLIC, dataset=dataclasses.replace(SYMBOLIC.dataset, symbolic_size=61))
    write_shard_set(tmp_path / "d", bigger, _arrays(5), 5)
    with pytest.raises(DataError, match="dataset config differs"):
        check_compatible(a, open_shard_set(tmp_path / "d"))
    poly = dataclasses.replace(SYMBOLIC, sequence=dataclasses.replace(SYMBOLIC.sequence, polysemy=2))
    write_shard_set(tmp_path / "p", poly, _arrays(5), 5)
    with pytest.raises(DataError, match="num_labels differs"):
        check_compatible(a, open_shard_set(tmp_path / "p"))
    write_shard_set(tmp_path / "e", NOISY, _arrays(5, True), 5, image_fingerprint="x")
    write_shard_set(tmp_path / "f", NOISY, _arrays(5, True), 5, image_fingerprint="y")
    with pytest.raises(DataError, match="image table differs"):
        check_compatible(open_shard_set(tmp_path / "e"), open_shard_set(tmp_path / "f"))


# ---- the stream ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size, block_rows", [(8, 1 << 16), (5, 3), (80, 4)])
def test_batch_k_is_rows_mod_n(sset, batch_size, block_rows):
    ss, arrays = sset
    with BatchStream(ss, batch_size, block_rows=block_rows) as s:
        for k in range(12):  # several epochs: wraps around, across shard boundaries
            b = next(s)
            rows = (k * batch_size + np.arange(batch_size)) % N
            _assert_batch(b, arrays, rows)
            assert b["example"].dtype == np.int32 and b["exemplar"].dtype == np.int32
            assert b["noise_seed"].dtype == np.uint32 and b["row"].dtype == np.int64
            assert s.step == k + 1


def test_resume_gives_same_stream(sset):
    ss, _ = sset
    with BatchStream(ss, 6) as s:
        full = [next(s) for _ in range(15)]
    with BatchStream(ss, 6, start_step=9) as s:
        assert s.step == 9
        for k in range(9, 15):
            b = next(s)
            for key in full[k]:
                np.testing.assert_array_equal(b[key], full[k][key])


def test_host_slices_concatenate(sset):
    ss, _ = sset
    with BatchStream(ss, 12) as s:
        full = [next(s) for _ in range(5)]
    parts = []
    for p in range(3):
        with BatchStream(ss, 12, process_index=p, process_count=3, start_step=0) as s:
            parts.append([next(s) for _ in range(5)])
    for k in range(5):
        for key in full[k]:
            np.testing.assert_array_equal(np.concatenate([parts[p][k][key] for p in range(3)]), full[k][key])


def test_noise_seed_zeros_when_absent(tmp_path):
    arrays = _arrays(9)
    arrays.update(label=arrays["label"] % 60, exemplar=np.zeros_like(arrays["exemplar"]))  # symbolic ranges
    write_shard_set(tmp_path, SYMBOLIC, arrays, 4)
    with BatchStream(open_shard_set(tmp_path), 4) as s:
        b = next(s)
    np.testing.assert_array_equal(b["noise_seed"], np.zeros(4, np.uint32))
    np.testing.assert_array_equal(b["example"], arrays["example"][:4])


def test_bad_stream_arguments(sset):
    ss, _ = sset
    for kw in ({"batch_size": 0}, {"batch_size": 10, "process_count": 3}, {"batch_size": 4, "process_index": 2,
               "process_count": 2}, {"batch_size": 4, "start_step": -1}):
        with pytest.raises(DataError):
            BatchStream(ss, **kw)


def test_thread_error_reraised_and_close(sset, monkeypatch):
    ss, _ = sset
    calls = {"n": 0}
    real = data_mod._RowReader.read

    def flaky(self, start, count):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(self, start, count)

    monkeypatch.setattr(data_mod._RowReader, "read", flaky)
    s = BatchStream(ss, 4)
    next(s), next(s)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(s)
    with pytest.raises(RuntimeError, match="disk on fire"):  # stays failed
        next(s)
    s.close()
    assert not s._thread.is_alive()


def test_close_stops_thread_and_iteration(sset):
    ss, _ = sset
    before = threading.active_count()
    s = BatchStream(ss, 4, prefetch=2)
    next(s)
    s.close()
    s.close()  # idempotent
    assert not s._thread.is_alive() and threading.active_count() == before
    with pytest.raises(StopIteration):
        next(s)


def test_stop_step_ends_stream(sset):
    ss, _ = sset
    with BatchStream(ss, 4, start_step=2, stop_step=5) as s:
        assert [int(b["row"][0]) for b in s] == [8, 12, 16]


# ---- evaluation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_seqs, batch_size", [(None, 8), (20, 8), (16, 8), (100, 64)])
def test_eval_batches_cover_set_once(sset, max_seqs, batch_size):
    ss, arrays = sset
    n = N if max_seqs is None else min(max_seqs, N)
    batches = list(eval_batches(ss, batch_size, max_seqs))
    assert len(batches) == -(-n // batch_size)
    assert all(len(b["row"]) == batch_size for b in batches)
    rows = np.concatenate([b["row"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(rows, np.arange(n))
    valid_labels = np.concatenate([b["label"][b["valid"]] for b in batches])
    np.testing.assert_array_equal(valid_labels, arrays["label"][:n])
    assert sum(int(b["valid"].sum()) for b in batches) == n


def test_eval_batches_per_host(sset):
    ss, _ = sset
    whole = list(eval_batches(ss, 8, 20))
    halves = [list(eval_batches(ss, 8, 20, process_index=p, process_count=2)) for p in range(2)]
    for k, b in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([halves[0][k]["valid"], halves[1][k]["valid"]]), b["valid"])
        np.testing.assert_array_equal(np.concatenate([halves[0][k]["row"], halves[1][k]["row"]]), b["row"])


def test_eval_batches_abandoned_generator_closes_thread(sset):
    ss, _ = sset
    before = threading.active_count()
    gen = eval_batches(ss, 4)
    next(gen)
    gen.close()
    assert threading.active_count() == before
