"""`trainer fit`: one run, trained (or resumed) in its run directory.

Batch k of the run is rows [k*B, (k+1)*B) of the training shard set (wrapping around), so resuming at
step s needs nothing but s: the restored TrainState (model, BatchNorm state, optimizer state, key) and
`trainer.runtime.multihost.train_stream(..., start_step=s)` continue exactly where an uninterrupted run would be,
on any number of processes and devices. Metrics are fetched from the device every `log_every` steps;
evaluation every `eval_every` steps; checkpoints every `checkpoint_every` steps, at the end, and at the
first Ctrl+C / SIGTERM to any process (all processes stop at the same step, agreed only at the steps that
log, evaluate or checkpoint: `trainer.loop.train_loop`; process 0 writes). `--profile DIR` traces a few
dispatches (`trainer.runtime.profile`).
(Evaluations and checkpoints may instead follow a log-spaced or listed schedule: `trainer.schedule`; the
loop itself is `trainer.loop`'s, shared with vectorized groups.) A resume first redoes the evaluations an
interrupt cut short (`trainer.resume`). With `tracking`, every record of metrics.jsonl is mirrored live to
TensorBoard / W&B (`trainer.sinks`). Setting the run up, resuming it and the training session are
`trainer.engine`'s, shared with vectorized groups (`trainer.group`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from trainer.config import TrainConfig
from trainer.data import ShardSet
from trainer.engine import RunSetup, redo, session, start_runs
from trainer.loop import FitResult, TrainingRun, pad_batches, train_loop
from trainer.memory import check_fits
from trainer.run import RunDir, run_lock
from trainer.runtime.distributed import Topology, make_topology, replicate, to_global
from trainer.runtime.multihost import any_process, train_stream
from trainer.runtime.platform import compile_line, releases_programs, start_line
from trainer.runtime.profile import DispatchProfile
from trainer.runtime.signals import GracefulInterrupt
from trainer.sinks import Tracking
from trainer.state import TrainState
from trainer.step import StepContext, make_train_step

__all__ = ["FitResult", "fit"]

PathLike = str | os.PathLike


@releases_programs
def fit(cfg: TrainConfig, train_path: PathLike, eval_paths: Sequence[PathLike], run_dir: PathLike, *,
        topo: Topology | None = None, **kwargs: Any) -> FitResult:
    """Train (see `_fit`) holding the run directory's writer lock: one `trainer fit` per run directory
    (only process 0 writes, so only it locks)."""
    topo = topo or make_topology()
    with run_lock(run_dir, "trainer fit", enabled=topo.is_main):
        return _fit(cfg, train_path, eval_paths, run_dir, topo=topo, **kwargs)


def _fit(
    cfg: TrainConfig,
    train_path: PathLike,
    eval_paths: Sequence[PathLike],
    run_dir: PathLike,
    *,
    resume: bool = False,
    omniglot_dir: PathLike | None = None,
    cache_dir: PathLike | None = "data/cache",
    topo: Topology | None = None,
    progress: bool | None = None,
    interrupt: GracefulInterrupt | None = None,
    strict_resume: bool = False,
    announce: Callable[[str], None] | None = None,
    tracking: Tracking | None = None,
    profile: PathLike | None = None,
) -> FitResult:
    """Train (or with `resume`, continue) the run in `run_dir`, set up by `trainer.engine` (a resume keeps
    the stored config; only `training.steps` may differ, and with `strict_resume` the loop's bookkeeping
    options are refused too, else kept from the stored config). Once every input is checked, `announce`
    (process 0) gets the one line of where and how the run computes (and, with `profile`, a folder for a
    trace of a few dispatches: `trainer.runtime.profile`, the line of what it holds). `tracking` names the
    sinks that mirror the run's records (their libraries are checked first, `trainer.sinks`)."""
    topo = topo or make_topology()
    topo.check_batch(cfg.validate().training.batch_size)

    def fits(cfgs, opened, starts) -> None:
        train = opened[0][0]
        check_fits(cfgs[0], train.num_labels, train.config.length, data_parallel=topo.num_devices)

    (run,) = start_runs([RunSetup(cfg, train_path, eval_paths, RunDir(run_dir), resume, tracking)], topo,
                        strict=strict_resume, check=fits, omniglot_dir=omniglot_dir, cache_dir=cache_dir)
    state = replicate(topo, run.state)
    if announce is not None and topo.is_main:
        announce(start_line(run.job.cfg, topo.num_devices))
    with session([run], interrupt) as stop:
        if not redo([run], [state], stop):
            return FitResult(step=run.start, interrupted=True, run_dir=str(run.job.run.path))
        return _loop(run.job, run.ctx, run.train, state, run.start, stop, progress, profile, announce)


def _loop(job: TrainingRun, ctx: StepContext, train: ShardSet, state: TrainState, start: int,
          stop: GracefulInterrupt, progress: bool | None, profile: PathLike | None = None,
          announce: Callable[[str], None] | None = None) -> FitResult:
    t, topo, table = job.cfg.training, job.topo, job.evaluator.table
    train_step = make_train_step(ctx)
    stream = train_stream(train, topo, t.batch_size, start)

    compiled: list[float] = []

    def advance(k: int) -> dict[str, Any]:
        nonlocal state
        local = pad_batches([next(stream) for _ in range(k)], t.steps_per_dispatch)
        stacked = {name: np.stack([b[name] for b in local]) for name in local[0]}
        began = time.perf_counter()
        state, metrics = train_step(table, state, to_global(topo, stacked, leading=1), np.int32(k))
        if not compiled:  # the first call traces and compiles (or loads from the cache) before it dispatches
            compiled.append(time.perf_counter() - began)
            if announce is not None and topo.is_main:
                announce(compile_line(compiled[0]))
        return metrics

    def should_stop() -> bool:  # at log / eval / checkpoint boundaries: the loop's one collective
        return any_process(topo, stop.stop_requested)

    # between them a process alone stops at the next dispatch; several go on to the next boundary
    stop_now = (lambda: stop.stop_requested) if topo.process_count == 1 else None
    tracer = DispatchProfile(profile, topo.process_index, topo.process_count) if profile is not None else None
    with stream, tracer or contextlib.nullcontext():
        step, interrupted = train_loop(
            t, start, advance=advance, log=job.log, should_stop=should_stop, stop_now=stop_now,
            on_dispatch=tracer, progress=progress,
            evaluate=lambda step: job.evaluate(state, step, lambda: stop.stop_requested),
            save=lambda step: job.save(state, step))
    if tracer is not None and announce is not None and topo.is_main:
        announce(tracer.summary())
    return FitResult(step=step, interrupted=interrupted, run_dir=str(job.run.path))
