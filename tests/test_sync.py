"""When a run's processes synchronise (issue 28): the training loop agrees on stopping only at the dispatch
boundaries that log, evaluate or checkpoint, never before every dispatch, and a stop still ends every
process at one step with a checkpoint. The loop is tested alone (its callbacks recorded), then `fit` with
its agreement function counted (1 process here; 2 real processes in tests/test_multiprocess.py)."""

from __future__ import annotations

import shutil

import pytest

import trainer.fit
from tests.trainkit import paper_like_sets, tiny_config
from trainer import checkpoint
from trainer.config import ScheduleKind
from trainer.fit import fit
from trainer.loop import dispatch_size, stop_boundaries, train_loop


def _loop(t, *, stop_at=None, alone=False):
    """train_loop with recording callbacks; a stop is requested (on "one process") once `stop_at` is reached."""
    seen = {"asked": [], "saved": [], "logged": [], "evaluated": [], "dispatches": []}
    step = {"now": 0}

    def advance(k):
        seen["dispatches"].append(k)
        step["now"] += k
        return {}

    def requested():
        return stop_at is not None and step["now"] >= stop_at

    def should_stop():
        seen["asked"].append(step["now"])
        return requested()

    reached, interrupted = train_loop(
        t, 0, advance=advance, log=lambda pending, bar: seen["logged"].append(step["now"]),
        evaluate=lambda s: seen["evaluated"].append(s) or True, save=seen["saved"].append,
        should_stop=should_stop, stop_now=requested if alone else None, progress=False)
    return reached, interrupted, seen


SCHEDULES = {
    "every": dict(steps=40, steps_per_dispatch=3, log_every=10, eval_every=20, checkpoint_every=15),
    "log": dict(steps=60, steps_per_dispatch=4, log_every=25, eval_schedule=ScheduleKind.LOG,
                checkpoint_schedule=ScheduleKind.LOG),
    "list": dict(steps=30, steps_per_dispatch=5, log_every=7, eval_schedule=ScheduleKind.LIST, eval_steps=(3, 11),
                 checkpoint_schedule=ScheduleKind.LIST, checkpoint_steps=(13,)),
}


@pytest.mark.parametrize("name", SCHEDULES)
def test_stopping_is_agreed_only_at_log_eval_and_checkpoint_boundaries(name):
    t = tiny_config(**SCHEDULES[name]).training
    reached, interrupted, seen = _loop(t)
    assert (reached, interrupted) == (t.steps, False)
    boundaries = sorted((set(seen["logged"]) | set(seen["evaluated"]) | set(seen["saved"])) - {t.steps})
    assert seen["asked"] == boundaries == stop_boundaries(t, 0)
    assert len(seen["dispatches"]) > len(seen["asked"]) + 1  # dispatches in between asked nothing


def test_a_stop_between_boundaries_waits_for_the_next_one_with_a_checkpoint():
    t = tiny_config(steps=40, steps_per_dispatch=2, log_every=10, eval_every=40, checkpoint_every=40).training
    # several processes (no local stop): requested at step 13, agreed at the next boundary, 20
    reached, interrupted, seen = _loop(t, stop_at=13)
    assert (reached, interrupted) == (20, True) and seen["saved"] == [20] and seen["asked"] == [10, 20]
    # one process alone stops at the next dispatch boundary
    reached, interrupted, seen = _loop(t, stop_at=13, alone=True)
    assert (reached, interrupted) == (14, True) and seen["saved"] == [14]
    # a stop at a checkpoint step saves it once
    t = tiny_config(steps=40, steps_per_dispatch=5, log_every=10, eval_every=40, checkpoint_every=10).training
    reached, interrupted, seen = _loop(t, stop_at=10)
    assert (reached, interrupted) == (10, True) and seen["saved"] == [10]


def test_fit_agrees_once_per_boundary(tmp_path, monkeypatch):
    """fit's agreement (`any_process`, the collective of a multi-process run) is called exactly at the
    boundaries, on a log schedule whose dispatches the boundaries cut to every length; a resume too."""
    train, icl, _ = paper_like_sets(tmp_path / "shards", train_seqs=512)
    calls = []
    real = trainer.fit.any_process
    monkeypatch.setattr(trainer.fit, "any_process", lambda topo, flag: calls.append(flag) or real(topo, flag))
    cfg = tiny_config(steps=30, steps_per_dispatch=2, log_every=7, eval_schedule=ScheduleKind.LOG,
                      checkpoint_schedule=ScheduleKind.LOG, eval_seqs=32)
    t = cfg.training
    dispatches, step = 0, 0
    while step < t.steps:
        step += dispatch_size(step, t)
        dispatches += 1
    fit(cfg, train, [icl], tmp_path / "run", progress=False)
    assert calls == [False] * len(stop_boundaries(t, 0)) and 0 < len(calls) < dispatches - 1
    start = checkpoint.list_steps(tmp_path / "run")[len(checkpoint.list_steps(tmp_path / "run")) // 2]
    for later in [s for s in checkpoint.list_steps(tmp_path / "run") if s > start]:
        shutil.rmtree(checkpoint.checkpoint_dir(tmp_path / "run") / f"step-{later}")
    calls.clear()
    fit(cfg, train, [icl], tmp_path / "run", resume=True, progress=False)
    assert len(calls) == len(stop_boundaries(t, start)) > 0


def test_a_checkpoint_due_with_an_evaluation_is_written_before_it():
    """An evaluation that fails (or is cut short) at a step that also checkpoints costs no steps: the
    checkpoint is already written (a resume then redoes the evaluation it owes: trainer.resume)."""
    t = tiny_config(steps=8, steps_per_dispatch=2, log_every=2, eval_every=4, checkpoint_every=4).training
    order = []

    def evaluate(step):
        order.append(("evaluate", step))
        raise RuntimeError("evaluation set unreadable")

    with pytest.raises(RuntimeError):
        train_loop(t, 0, advance=lambda k: {}, log=lambda pending, bar: None, evaluate=evaluate,
                   save=lambda step: order.append(("save", step)), should_stop=lambda: False, progress=False)
    assert order == [("save", 4), ("evaluate", 4)]
