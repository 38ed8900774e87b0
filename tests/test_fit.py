"""End to end: build small shards -> fit -> evaluate -> plot; exact resume; Ctrl+C; refusals."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from seqgen.config import SeqType
from dataclasses import replace

from tests.trainkit import SPLIT, paper_like_sets, symbolic_set, tiny_config
from trainer import checkpoint
from trainer.data import DataError
from trainer.evaluate import evaluate_run
from trainer.fit import fit
from trainer.runtime.distributed import make_topology
from trainer.plots import plot_run
from trainer.run import RunDir, RunError
from trainer.runtime.signals import GracefulInterrupt
from trainer.state import learning_rate, state_skeleton
from trainer.config import OptimizerConfig


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return paper_like_sets(tmp_path_factory.mktemp("shards"))


def _leaves(run_dir, step, cfg):
    state = checkpoint.load(run_dir, step, state_skeleton(cfg, 40))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def test_schedule_matches_the_original_formula():
    lr = learning_rate(OptimizerConfig(max_lr=3e-4, warmup_steps=4000))
    for step in (0, 1, 2000, 4000, 4001, 16000, 500000):
        expected = min(3e-4 / 4000 * step, np.sqrt(4000) * 3e-4 * (step ** -0.5 if step else np.inf))
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert float(lr(4000)) == pytest.approx(3e-4) and float(lr(16000)) == pytest.approx(1.5e-4)


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(sets, tmp_path):
    train, icl, _ = sets
    cfg = tiny_config(steps=20)
    fit(cfg, train, [icl], tmp_path / "straight", progress=False)
    fit(tiny_config(steps=10), train, [icl], tmp_path / "split", progress=False)
    fit(cfg, train, [icl], tmp_path / "split", resume=True, progress=False)
    a, b = _leaves(tmp_path / "straight", 20, cfg), _leaves(tmp_path / "split", 20, cfg)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    # the resumed run's log has each step once, and the same final training metrics
    steps = [r["step"] for r in RunDir(tmp_path / "split").read_metrics() if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 20


def test_a_checkpoint_of_another_format_version_is_refused_in_one_line(sets, tmp_path):
    """Format 1 (one optimizer-state array per parameter array, before 2026-12) is no longer read: resuming
    from it is one line naming the fix, and nothing is trained or written."""
    train, icl, _ = sets
    fit(tiny_config(steps=10), train, [icl], tmp_path / "old", progress=False)
    meta_path = checkpoint.checkpoint_dir(tmp_path / "old") / "step-10" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    before = (tmp_path / "old" / "metrics.jsonl").read_bytes()
    with pytest.raises(checkpoint.CheckpointError, match=r"format v1; this version reads v2 only: retrain"):
        fit(tiny_config(steps=20), train, [icl], tmp_path / "old", resume=True, progress=False)
    assert checkpoint.list_steps(tmp_path / "old") == [10]
    assert (tmp_path / "old" / "metrics.jsonl").read_bytes() == before


def test_steps_per_dispatch_gives_the_same_parameters(sets, tmp_path):
    train, icl, _ = sets
    fit(tiny_config(steps=10, steps_per_dispatch=1), train, [], tmp_path / "one", progress=False)
    fit(tiny_config(steps=10, steps_per_dispatch=5), train, [], tmp_path / "five", progress=False)
    a, b = _leaves(tmp_path / "one", 10, tiny_config()), _leaves(tmp_path / "five", 10, tiny_config())
    assert all(np.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b))


def test_interrupt_saves_a_loadable_checkpoint(sets, tmp_path):
    train, icl, _ = sets

    class StopAfterFirstCheck(GracefulInterrupt):
        calls = 0

        @property
        def stop_requested(self):
            StopAfterFirstCheck.calls += 1
            return StopAfterFirstCheck.calls > 3

    result = fit(tiny_config(steps=20), train, [icl], tmp_path / "run", progress=False,
                 interrupt=StopAfterFirstCheck())
    assert result.interrupted and 0 < result.step < 20
    assert checkpoint.latest_step(tmp_path / "run") == result.step
    _leaves(tmp_path / "run", result.step, tiny_config())  # loads
    done = fit(tiny_config(steps=20), train, [icl], tmp_path / "run", resume=True, progress=False)
    assert done.step == 20 and not done.interrupted


def test_run_dir_and_eval_set_refusals(sets, tmp_path):
    train, icl, _ = sets
    fit(tiny_config(steps=5, eval_every=5, checkpoint_every=5), train, [], tmp_path / "run", progress=False)
    with pytest.raises(RunError, match="--resume"):
        fit(tiny_config(steps=5), train, [], tmp_path / "run", progress=False)
    with pytest.raises(RunError, match="holds no run"):
        fit(tiny_config(steps=5), train, [], tmp_path / "other", resume=True, progress=False)
    other_split = symbolic_set(tmp_path, SeqType.FEWSHOT_HOLDOUT, 64, split=replace(SPLIT, split_seed=7))
    with pytest.raises(DataError, match="split"):
        fit(tiny_config(steps=5), train, [other_split], tmp_path / "third", progress=False)
    with pytest.raises(DataError):
        fit(tiny_config(steps=5), train, [tmp_path / "nope"], tmp_path / "fourth", progress=False)
    assert not (tmp_path / "third").exists() and not (tmp_path / "fourth").exists()


def test_end_to_end_learns_and_writes_everything(sets, tmp_path):
    """Loss falls and in-weights accuracy rises far above chance (1/40) on 40 symbolic classes.

    (ICL itself emerges only after a long plateau, thousands of steps even on this toy: it is the subject
    of the reproduction sweeps, not of a unit test.)
    """
    train, icl, iwl = sets
    cfg = tiny_config(steps=300, eval_every=150, checkpoint_every=150, log_every=25, eval_seqs=256)
    result = fit(cfg, train, [icl, iwl], tmp_path / "run", progress=False)
    assert result.step == 300
    run = RunDir(tmp_path / "run")
    records = list(run.read_metrics())
    train_loss = [r["metrics"]["loss"] for r in records if r["kind"] == "train"]
    assert train_loss[-1] < train_loss[0] * 0.7
    evals = [r for r in records if r["kind"] == "eval"]
    assert {(r["step"], r["seq_type"]) for r in evals} == {
        (s, t) for s in (150, 300) for t in ("fewshot_holdout", "no_support_zipfian")}
    iwl_acc = [r for r in evals if r["seq_type"] == "no_support_zipfian"][-1]["metrics"]["accuracy_query"]
    assert iwl_acc["n"] == 256 and iwl_acc["ci95"][0] > 0.3, iwl_acc
    results = evaluate_run(tmp_path / "run", [icl, iwl], step=None, train_dir=None, max_seqs=128, batch_size=64,
                           omniglot_dir=None, cache_dir=None, topo=make_topology(), echo=lambda s: None)
    assert [r[1] for r in results] == ["fewshot_holdout", "no_support_zipfian"]
    assert results[1][2]["accuracy_query"]["n"] == 128 and results[1][2]["accuracy_query"]["mean"] > 0.3
    written = json.loads((run.evaluations_dir / "step-300.json").read_text())
    assert written["sets"][0]["metrics"]["accuracy_closed"]["n"] == 128
    paths = plot_run(tmp_path / "run")
    assert [p.name for p in paths] == ["icl_iwl.png", "loss.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
