"""`trainer fit --resume`: owed evaluations are redone, changed options and too few steps are refused,
a run without a checkpoint is refused (and starts afresh without --resume), config.json never shrinks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tests.trainkit import paper_like_sets, tiny_config
from trainer import checkpoint
from trainer import evaluate as evaluate_module
from trainer.cli import main
from trainer.config import with_overrides
from trainer.fit import fit
from trainer.run import RunDir, RunError
from trainer.runtime.signals import GracefulInterrupt


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return paper_like_sets(tmp_path_factory.mktemp("resume-shards"), train_seqs=512)


class _Flag(GracefulInterrupt):
    """An interrupt that a test raises by hand (no signal handlers involved)."""

    def __init__(self) -> None:
        super().__init__()
        self.raised = False

    @property
    def stop_requested(self) -> bool:
        return self.raised

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _interrupt_during_evaluation(monkeypatch, stop: _Flag, nth: int = 1) -> None:
    """Raise `stop` when fit starts its nth evaluation of a set: that evaluation is cut short."""
    calls = {"n": 0}
    real = evaluate_module.evaluate_set

    def evaluate_set(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            stop.raised = True
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_set", evaluate_set)


def _evals(run_dir) -> list[tuple[int, str, dict]]:
    return [(r["step"], r["set"], r["metrics"]) for r in RunDir(run_dir).read_metrics()
            if r["kind"] == "eval" and r.get("source") == "fit"]


def test_interrupted_final_evaluation_is_redone_on_resume_exactly(sets, tmp_path, monkeypatch):
    """The final evaluation (step 10) is interrupted on its second set; --resume evaluates that set from
    the step-10 checkpoint instead of reporting the run done, with the numbers an uninterrupted run got."""
    train, icl, iwl = sets
    cfg = tiny_config(steps=10, eval_every=10, checkpoint_every=10)
    fit(cfg, train, [icl, iwl], tmp_path / "straight", progress=False)
    stop = _Flag()
    _interrupt_during_evaluation(monkeypatch, stop, nth=2)
    cut = fit(cfg, train, [icl, iwl], tmp_path / "cut", progress=False, interrupt=stop)
    monkeypatch.undo()
    assert cut.interrupted and cut.step == 10 and checkpoint.latest_step(tmp_path / "cut") == 10
    assert [(s, n) for s, n, _ in _evals(tmp_path / "cut")] == [(10, icl.name)]  # iwl's was cut short
    done = fit(cfg, train, [icl, iwl], tmp_path / "cut", resume=True, progress=False)
    assert done.step == 10 and not done.interrupted
    assert _evals(tmp_path / "cut") == _evals(tmp_path / "straight")  # each set once, the same numbers
    # nothing owed any more: a further resume evaluates nothing
    fit(cfg, train, [icl, iwl], tmp_path / "cut", resume=True, progress=False)
    assert len(_evals(tmp_path / "cut")) == 2


def test_resume_refusals_and_steps(sets, tmp_path, monkeypatch):
    train, icl, _ = sets
    cfg = tiny_config(steps=20, eval_every=10, checkpoint_every=10)
    stop = _Flag()
    _interrupt_during_evaluation(monkeypatch, stop, nth=1)  # the evaluation at step 10
    assert fit(cfg, train, [icl], tmp_path / "run", progress=False, interrupt=stop).step == 10
    monkeypatch.undo()
    run = RunDir(tmp_path / "run")
    stored = run.read()["trainer"]
    # changed model / optimizer options: one line naming the option and both values
    for key, value, flag in (("optimizer.max_lr", 5e-3, "--lr"), ("model.num_layers", 3, "--num-layers"),
                             ("training.seed", 7, "--seed")):
        with pytest.raises(RunError) as e:
            fit(with_overrides(cfg, {key: value}), train, [icl], run.path, resume=True, progress=False)
        msg = str(e.value)
        assert "\n" not in msg and flag in msg and repr(value) in msg, msg
    with pytest.raises(RunError, match=r"--lr is 0.001 .* but 0.005"):
        fit(with_overrides(cfg, {"optimizer.max_lr": 5e-3}), train, [icl], run.path, resume=True, progress=False)
    # bookkeeping options: kept from the stored config by the library (sweeps), refused when strict (CLI)
    with pytest.raises(RunError, match="--eval-every"):
        fit(with_overrides(cfg, {"training.eval_every": 5}), train, [icl], run.path, resume=True, progress=False,
            strict_resume=True)
    # fewer steps than the checkpoint's: refused
    with pytest.raises(RunError, match="--steps 5 is below the step of the checkpoint to resume from \\(10\\)"):
        fit(tiny_config(steps=5, eval_every=10, checkpoint_every=10), train, [icl], run.path, resume=True,
            progress=False)
    assert run.read()["trainer"] == stored  # refusals wrote nothing
    # between the checkpoint and the stored steps: trains that far, config.json keeps 20 (never shrinks)
    short = fit(tiny_config(steps=15, eval_every=10, checkpoint_every=10), train, [icl], run.path, resume=True,
                progress=False)
    assert short.step == 15 and run.read()["trainer"]["training"]["steps"] == 20
    assert [(s, n) for s, n, _ in _evals(run.path)] == [(10, icl.name), (15, icl.name)]  # 10 was owed
    # more steps extend the run and change nothing else in config.json
    longer = fit(tiny_config(steps=25, eval_every=10, checkpoint_every=10), train, [icl], run.path, resume=True,
                 progress=False)
    assert longer.step == 25
    after = run.read()["trainer"]
    assert after["training"].pop("steps") == 25 and stored["training"].pop("steps") == 20 and after == stored


def test_resume_without_a_checkpoint_is_refused_and_a_fresh_start_replaces_it(sets, tmp_path):
    train, icl, _ = sets
    cfg = tiny_config(steps=5, eval_every=5, checkpoint_every=5)
    fit(cfg, train, [], tmp_path / "run", progress=False)
    run = RunDir(tmp_path / "run")
    for step in checkpoint.list_steps(run.path):  # as if it had stopped before its first save
        (checkpoint.checkpoint_dir(run.path) / f"step-{step}" / "metadata.json").unlink()
    before = run.metrics_path.read_text()
    with pytest.raises(RunError, match="no complete checkpoint .*drop --resume to start afresh"):
        fit(cfg, train, [], run.path, resume=True, progress=False)
    assert run.metrics_path.read_text() == before
    fit(cfg, train, [], run.path, progress=False)  # the fix the message names
    steps = [r["step"] for r in run.read_metrics() if r["kind"] == "train"]
    assert steps == [5] and checkpoint.latest_step(run.path) == 5  # no duplicated records


def test_cli_resume_keeps_the_stored_config(sets, tmp_path):
    """`--resume` without --steps continues to the stored step count (not the default 500,000); a changed
    option given on the command line is one `error:` line."""
    train, icl, _ = sets
    tiny = ["--batch-size", "8", "--log-every", "3", "--eval-every", "3", "--checkpoint-every", "3",
            "--eval-seqs", "16", "--num-layers", "1", "--num-heads", "2", "--emb-dim", "16",
            "--example-encoding", "embedding", "--no-progress"]
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run),
                                  "--steps", "3", *tiny])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run),
                                  "--resume", "--no-progress"])
    assert r.exit_code == 0 and "done: 3 steps" in r.output, r.output
    assert json.loads((run / "config.json").read_text())["trainer"]["training"]["steps"] == 3
    r = CliRunner().invoke(main, ["fit", "--train", str(train), "--run-dir", str(run), "--resume",
                                  "--num-layers", "2"])
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --resume continues"), r.output
    assert "--num-layers is 1" in lines[0] and "but 2 here" in lines[0]
