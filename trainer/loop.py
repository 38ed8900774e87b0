"""The training loop of `trainer fit` and of vectorized groups (`trainer.group`), and what it does for a run
at each step boundary.

`train_loop` runs dispatches of up to `steps_per_dispatch` steps, never crossing a logging, evaluation or
checkpoint boundary (`dispatch_size`): after each dispatch it logs the window of metrics when a logging
step is reached, evaluates at the evaluation schedule's steps, saves at the checkpoint schedule's
(`trainer.schedule`), and at a stop request saves the step reached. What a dispatch computes (one run, or R
runs vmapped) and what logging, evaluating and saving do (for one run, or for each run of a group) are
the caller's; `TrainingRun` does them for one run: its metrics window, its evaluations (`Evaluator`) into
the run's evaluation store (`trainer.runlog`), its checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from trainer import checkpoint
from trainer.config import TrainConfig, TrainingConfig
from trainer.evaluate import Evaluator, evaluation
from trainer.run import RunDir
from trainer.runtime.distributed import Topology
from trainer.schedule import StepSchedule
from trainer.state import TrainState, restore

# (first step of the dispatch, steps it ran, its metrics {name: [K, ...] device array}; rows past the steps
# it ran are padding) of the dispatches since the last log
Pending = list[tuple[int, int, dict[str, Any]]]


@dataclass(frozen=True)
class FitResult:
    step: int
    interrupted: bool
    run_dir: str


def dispatch_size(step: int, t: TrainingConfig) -> int:
    """Steps in the next jitted call: up to steps_per_dispatch, never crossing a log/eval/save boundary."""
    k = min(t.steps_per_dispatch, t.log_every - step % t.log_every)
    for what in ("eval", "checkpoint"):
        k = min(k, StepSchedule.of(t, what).until_next(step))
    return max(1, min(k, t.steps - step))


def train_loop(t: TrainingConfig, start: int, *, advance: Callable[[int], dict[str, Any]],
               log: Callable[[Pending, tqdm | None], None], evaluate: Callable[[int], bool], save: Callable[[int], None],
               should_stop: Callable[[], bool], stop_now: Callable[[], bool] | None = None,
               on_dispatch: Callable[[int, dict[str, Any]], None] | None = None, progress: bool | None,
               desc: str | None = None) -> tuple[int, bool]:
    """Train from `start` to `t.steps`; return (step reached, interrupted).

    `advance(k)` runs the next k steps (always as one dispatch of `steps_per_dispatch` padded batches, the
    first k of them used: one compiled program whatever the schedules; `pad_batches`) and returns their
    metrics; `log(pending, bar)` records a window (`bar` None for the last, partial one); `evaluate(step)`
    is False when a stop cut it short; `save(step)` checkpoints; `on_dispatch(i, metrics)` sees dispatch i
    (0, 1, ... of this call) once it is issued (`trainer.runtime.profile`).

    Stopping: `should_stop()` is asked only at the boundaries that log, evaluate or checkpoint (before
    training on past them, never after the last step): in a multi-process run it is the collective that
    makes every process stop at the same step, and the only one the loop makes between those boundaries'
    own work, so dispatches in between queue up on the device without waiting for the host.
    `stop_now()` (a local flag, for one process alone: None in multi-process runs) is asked after every
    other dispatch, so that a single process stops at the next dispatch boundary. A stop saves the step
    reached (unless that step was just saved)."""
    eval_due, save_due = StepSchedule.of(t, "eval").due, StepSchedule.of(t, "checkpoint").due
    step = start
    pending: Pending = []
    bar = tqdm(total=t.steps, initial=start, disable=None if progress is None else not progress,
               unit="step", dynamic_ncols=True, desc=desc)
    interrupted = False
    saved = None
    dispatches = 0
    try:
        while step < t.steps:
            k = dispatch_size(step, t)
            metrics = advance(k)
            if on_dispatch is not None:
                on_dispatch(dispatches, metrics)
            dispatches += 1
            pending.append((step, k, metrics))
            step += k
            bar.update(k)
            boundary = False
            if step % t.log_every == 0 or step == t.steps:
                log(pending, bar)
                pending = []
                boundary = True
            if save_due(step):  # before the evaluation: an evaluation that fails or is cut costs no steps
                save(step)
                saved = step
                boundary = True
            if eval_due(step):
                boundary = True
                if not evaluate(step):
                    interrupted = True
                    break
            if step < t.steps and (should_stop() if boundary else stop_now is not None and stop_now()):
                interrupted = True  # all processes stop at the same step
                break
    finally:
        bar.close()
    if pending:
        log(pending, None)
    if interrupted and saved != step:
        save(step)
    return step, interrupted


def stop_boundaries(t: TrainingConfig, start: int) -> list[int]:
    """The steps after `start` at which `train_loop` asks `should_stop` in an uninterrupted run: those that
    log, evaluate or checkpoint, before the last."""
    eval_due, save_due = StepSchedule.of(t, "eval").due, StepSchedule.of(t, "checkpoint").due
    out, step = [], start
    while step < t.steps:
        step += dispatch_size(step, t)
        if step < t.steps and (step % t.log_every == 0 or eval_due(step) or save_due(step)):
            out.append(step)
    return out


def pad_batches(batches: list[Any], size: int) -> list[Any]:
    """`batches` (host batches, each a dict of arrays) padded with zero batches to `size`: a dispatch always
    carries `steps_per_dispatch` batches (the train step runs only the first k; `trainer.step.run_steps`)."""
    if len(batches) < size:
        zero = {name: np.zeros_like(a) for name, a in batches[0].items()}
        batches = batches + [zero] * (size - len(batches))
    return batches


@dataclass(frozen=True)
class TrainingRun:
    """One run being trained: its directory, the config it trains with now, what it records of its data, and
    its evaluator. Only process 0 writes."""

    run: RunDir
    cfg: TrainConfig
    num_classes: int
    data: dict[str, Any]  # `trainer.data.data_record` of its sets
    evaluator: Evaluator
    topo: Topology

    def log(self, pending: Pending, bar: tqdm | None) -> None:
        """One record per logging window: metrics averaged over the steps since the last record."""
        host = jax.device_get([m for _, _, m in pending])
        first = pending[0][0]
        names = host[0].keys()
        means = {name: float(np.mean(np.concatenate([np.ravel(m[name][:k]) for (_, k, _), m in zip(pending, host)])))
                 for name in names}
        steps = sum(k for _, k, _ in pending)
        if self.topo.is_main:
            self.run.append_metrics({"step": first + steps, "kind": "train", "window": steps, "metrics": means})
        if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy_query']:.3f}")

    def evaluate(self, state: TrainState, step: int, should_stop: Callable[[], bool],
                 only: set[str] | None = None) -> bool:
        """Evaluate on the eval sets (or those in `only`), each recorded as soon as it is done; False when
        stopped."""
        def record(result):
            if self.topo.is_main:
                self.run.record_evaluation(evaluation(step, result, "fit"))

        return self.evaluator.run(state, step, should_stop, only=only, each=record) is not None

    def redo(self, state: TrainState, start: int, owed: list[tuple[int, list[str]]],
             should_stop: Callable[[], bool]) -> bool:
        """Evaluate what an interrupted run still owes (`trainer.resume.owed_evaluations`), each from its own
        checkpoint (`state` is the one at `start`); False when interrupted (the checkpoints are there)."""
        for step, names in owed:
            at = state if step == start else restore(self.run.path, step, self.cfg, self.num_classes, self.topo)
            if not self.evaluate(at, step, should_stop, only=set(names)):
                return False
        return True

    def save(self, state: TrainState, step: int) -> None:
        """Checkpoint `step` (a host or device state) with the config and data record."""
        if not self.topo.is_main:
            return
        meta = {"trainer": self.cfg.to_dict(), "num_classes": self.num_classes, "time": time.time(),
                "data": self.data}
        checkpoint.save(self.run.path, step, jax.device_get(state), meta, keep=self.cfg.training.keep_checkpoints)
