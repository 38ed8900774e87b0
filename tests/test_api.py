"""The Python API (docs/api.md): `seqgen.open_shards` and `trainer.load_run`, against the readers and the
commands they sit on; docs/api.md's examples run as doctests on the same tiny run."""

from __future__ import annotations

import doctest
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import seqgen
import trainer
from seqgen.build import build
from seqgen.config import BuildConfig, SeqType, SequenceConfig
from seqgen.errors import UserError
from seqgen.shards import ShardError, read_manifest, read_shard
from tests.trainkit import DATASET, SPLIT, tiny_config
from trainer.checkpoint import CheckpointError
from trainer.data import DataError
from trainer.fit import fit
from trainer.run import RunDir, RunError
from trainer.runtime.platform import resolve_compute

REPO = Path(__file__).resolve().parents[1]
SETS = {"bursty": (SeqType.BURSTY, 4096, 0), "fewshot_holdout": (SeqType.FEWSHOT_HOLDOUT, 256, 1),
        "no_support_zipfian": (SeqType.NO_SUPPORT_ZIPFIAN, 256, 2), "fewshot_rare": (SeqType.FEWSHOT_RARE, 256, 3)}
SHARD_SIZE = 1000  # bursty: shards of 1000, 1000, 1000, 1000 and 96 rows; the others: one shard


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """docs/api.md's folder: data/shards/{bursty,fewshot_holdout,no_support_zipfian,fewshot_rare} (symbolic) and
    runs/tiny (20 steps, evaluated and checkpointed at 10 and 20)."""
    root = tmp_path_factory.mktemp("api")
    for name, (seq_type, num_seqs, seed) in SETS.items():
        cfg = BuildConfig(seq_type=seq_type, num_seqs=num_seqs, seed=seed, shard_size=SHARD_SIZE,
                          dataset=DATASET, split=SPLIT, sequence=SequenceConfig())
        build(cfg, root / "data" / "shards" / name, progress=False)
    shards = root / "data" / "shards"
    fit(tiny_config(steps=20), shards / "bursty", [shards / "fewshot_holdout", shards / "no_support_zipfian"],
        root / "runs" / "tiny", progress=False)
    return root


@pytest.fixture
def in_workspace(workspace, monkeypatch) -> Path:
    monkeypatch.chdir(workspace)
    return workspace


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert isinstance(e.value, UserError)
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ---- seqgen.open_shards ---------------------------------------------------------------------------------
def test_open_shards_rows_are_what_the_shard_reader_returns(workspace):
    path = workspace / "data" / "shards" / "bursty"
    s = seqgen.open_shards(path)
    manifest = read_manifest(path)
    assert s.manifest == manifest and s.config.to_dict() == manifest["config"] and s.split == manifest["split"]
    assert len(s) == 4096 and len(manifest["shards"]) == 5 and s.length == 9 and s.num_labels == manifest["num_labels"]
    whole = [read_shard(path / e["file"]) for e in manifest["shards"]]
    full = {k: np.concatenate([w[k] for w in whole]) for k in whole[0]}
    assert sorted(full) == sorted(s[0])
    for i in (0, 1, 999, 1000, 2001, 3999, 4000, 4095, -1, -4096):
        row = s[i]
        for k, v in full.items():
            assert row[k].dtype == v.dtype and np.array_equal(row[k], v[i]), (i, k)
    for sl in (slice(950, 2050), slice(None, None, 997), slice(3990, None), slice(5, 5), slice(None, None, -512)):
        got = s[sl]
        for k, v in full.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v[sl]), (sl, k)
    rows = list(s)
    assert len(rows) == 4096
    assert all(np.array_equal(rows[i][k], full[k][i]) for i in (0, 2000, 4095) for k in full)
    with pytest.raises(IndexError):
        s[4096]
    with pytest.raises(TypeError):
        s["0"]


def test_open_shards_refuses_bad_paths_in_one_line(workspace, tmp_path):
    with pytest.raises(ShardError) as e:
        seqgen.open_shards(tmp_path / "nope")
    assert "does not exist" in _one_line(e) and "seqgen build" in str(e.value)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(ShardError) as e:
        seqgen.open_shards(tmp_path / "unfinished")
    assert "empty directory" in _one_line(e)
    broken = tmp_path / "broken"
    shutil.copytree(workspace / "data" / "shards" / "bursty", broken)
    shard = broken / "shard-00001.h5"
    shard.write_bytes(shard.read_bytes()[:-1] + b"\x01")
    s = seqgen.open_shards(broken)
    assert s[0]["example"].shape == (9,)  # shard 0 is intact
    with pytest.raises(ShardError) as e:
        s[1500]
    assert "sha256" in _one_line(e) and "shard-00001.h5" in str(e.value)
    (broken / "shard-00004.h5").unlink()
    with pytest.raises(ShardError) as e:
        s[-1]
    assert "missing" in _one_line(e)


def test_the_package_roots_stay_cheap():
    code = ("import sys, seqgen, trainer; heavy = [m for m in ('jax', 'numpy', 'h5py', 'numba') if m in sys.modules];"
            "assert not heavy, heavy; assert 'load_run' in dir(trainer) and 'open_shards' in dir(seqgen)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    with pytest.raises(AttributeError):
        trainer.no_such_name  # noqa: B018


# ---- trainer.load_run -----------------------------------------------------------------------------------
def test_load_run_reads_config_checkpoints_and_metrics(workspace):
    run_dir = workspace / "runs" / "tiny"
    run = trainer.load_run(run_dir)
    assert run.config == RunDir(run_dir).train_config() == resolve_compute(tiny_config(steps=20))
    assert run.checkpoints == [10, 20]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert set(run.metrics) == set(train[0]["metrics"])
    for name in ("loss", "accuracy_query", "grad_norm"):
        steps, values = run.metrics[name]
        assert steps.tolist() == [r["step"] for r in train] == [5, 10, 15, 20]
        assert values.tolist() == [r["metrics"][name] for r in train]
    evals = [r for r in records if r["kind"] == "eval"]
    assert {r["set"] for r in evals} == set(run.metrics.evals) == {"fewshot_holdout", "no_support_zipfian"}
    for r in evals:
        for metric, summary in r["metrics"].items():
            c = run.metrics.evals[r["set"]][metric]
            at = c.steps.tolist().index(r["step"])
            assert (c.mean[at], [c.lo[at], c.hi[at]], c.n[at]) == (summary["mean"], summary["ci95"], summary["n"])
    for got, want in ((run.metrics.icl, run.metrics.evals["fewshot_holdout"]["accuracy_closed"]),
                      (run.metrics.iwl, run.metrics.evals["no_support_zipfian"]["accuracy_query"])):
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    with pytest.raises(KeyError, match="evals"):
        run.metrics["accuracy_closed_fewshot"]


def test_run_evaluate_gives_what_trainer_evaluate_records(workspace, tmp_path):
    from trainer.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(workspace / "runs" / "tiny", run_dir)
    shards = workspace / "data" / "shards"
    paths = [shards / "fewshot_rare", shards / "no_support_zipfian"]
    run = trainer.load_run(run_dir)
    before = (run_dir / "metrics.jsonl").read_bytes()
    ours = run.evaluate(paths, step=10, max_seqs=100, batch_size=32)
    assert (run_dir / "metrics.jsonl").read_bytes() == before and not (run_dir / "evaluations").exists()
    result = CliRunner().invoke(main, ["evaluate", *map(str, paths), "--run-dir", str(run_dir), "--step", "10",
                                       "--max-seqs", "100", "--batch-size", "32"])
    assert result.exit_code == 0, result.output
    recorded = {e.set: e.metrics for e in RunDir(run_dir).evaluations(10) if e.source == "evaluate"}
    assert set(ours) == {"fewshot_rare", "no_support_zipfian"} and ours == recorded
    assert ours["fewshot_rare"]["accuracy_closed"]["n"] == 100
    # record=True records what `trainer evaluate` records, at the latest step by default
    latest = run.evaluate(str(shards / "fewshot_rare"), record=True)
    [stored] = [e for e in RunDir(run_dir).evaluations(20) if e.source == "evaluate"]
    assert (stored.set, stored.metrics, stored.max_seqs) == ("fewshot_rare", latest["fewshot_rare"], None)


def test_the_model_is_the_checkpoint_that_evaluate_scores(workspace):
    run = trainer.load_run(workspace / "runs" / "tiny")
    s = seqgen.open_shards(workspace / "data" / "shards" / "no_support_zipfian")
    model = run.model()
    assert model.step == 20 and run.model(10).step == 10
    predicted = model.predict(s[0:64], s.config)
    accuracy = float(np.mean(predicted == s[0:64]["label"][:, -1]))
    expected = run.evaluate(s.path, max_seqs=64)["no_support_zipfian"]["accuracy_query"]["mean"]
    assert accuracy == pytest.approx(expected, abs=1 / 64 + 1e-9)  # float rounding may flip a near tie, no more
    assert np.allclose(model.logits(s[3], s.config)[0], model.logits(s[0:8], s.config)[3], atol=1e-5)  # one sequence
    attention = model.attention(s[0:4], s.config)
    assert attention.shape == (4, 2, 2, 17, 17)
    assert np.allclose(attention.sum(-1), 1, atol=1e-5) and np.all(np.triu(attention, 1) == 0)  # causal
    early = run.model(10).logits(s[0:4], s.config)
    assert not np.allclose(early, model.logits(s[0:4], s.config))


def test_bad_runs_and_steps_are_one_line_errors(workspace, tmp_path):
    with pytest.raises(RunError) as e:
        trainer.load_run(tmp_path / "missing")
    assert "not found" in _one_line(e)
    with pytest.raises(RunError) as e:
        trainer.load_run(workspace / "data" / "shards" / "bursty")
    assert "not a run directory" in _one_line(e)
    run = trainer.load_run(workspace / "runs" / "tiny")
    with pytest.raises(CheckpointError) as e:
        run.model(step=7)
    assert "available steps: 10, 20" in _one_line(e)
    with pytest.raises(DataError) as e:
        run.evaluate(tmp_path / "no-set")
    assert "seqgen build" in _one_line(e)
    with pytest.raises(RunError) as e:
        trainer.load_run(workspace / "runs" / "tiny", train=tmp_path / "moved").model()
    assert "train=" in _one_line(e)
    fresh = tmp_path / "fresh"
    shutil.copytree(workspace / "runs" / "tiny", fresh)
    shutil.rmtree(fresh / "checkpoints")
    with pytest.raises(RunError) as e:
        trainer.load_run(fresh).model()
    assert "no complete checkpoint" in _one_line(e)


def test_docs_api_examples_run(in_workspace):
    result = doctest.testfile(str(REPO / "docs" / "api.md"), module_relative=False, report=True,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 40 and result.failed == 0, result
