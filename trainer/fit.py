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
TensorBoard / W&B (`trainer.sinks`).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import ShardSet, data_record, open_sets
from trainer.evaluate import Evaluator
from trainer.images import device_table
from trainer.loop import FitResult, TrainingRun, pad_batches, train_loop
from trainer.memory import check_fits
from trainer.resume import owed_evaluations, prepare_run, resume_step, resumed_config
from trainer.run import RunDir, run_lock
from trainer.runtime.distributed import Topology, make_topology, replicate, to_global
from trainer.runtime.multihost import agree, any_process, train_stream
from trainer.runtime.platform import check_cpu_isa, compile_line, releases_programs, resolve_compute, start_line
from trainer.runtime.profile import DispatchProfile
from trainer.runtime.signals import GracefulInterrupt
from trainer.sinks import Tracking, check_available, mirrored
from trainer.state import TrainState, init_state, load_state
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
    """Train (or with `resume`, continue) the run in `run_dir`. A resume keeps the stored config; only
    `training.steps` may differ (`trainer.resume`: other changed options are refused, and with
    `strict_resume` the loop's bookkeeping options too, else those are kept from the stored config).
    The config is resolved once here; everything else is built from it once and passed on. Once every
    input is checked, `announce` (process 0) gets the one line of where and how the run computes (and, with
    `profile`, a folder for a trace of a few dispatches: `trainer.runtime.profile`, the line of what it holds).
    `tracking` names the sinks that mirror the run's records (their libraries are checked first,
    `trainer.sinks`)."""
    if tracking is not None:
        check_available(tracking.sinks)
    cfg = resolve_compute(cfg.validate())  # config.json records the kernel path and layer loop that ran
    check_cpu_isa(cfg.compute)  # XLA's CPU cap is fixed when JAX starts: the run computes as recorded
    topo = topo or make_topology()
    topo.check_batch(cfg.training.batch_size)
    run = RunDir(run_dir)
    start = resume_step(run) if resume else None
    stored_steps = None
    if start is not None:
        stored = resolve_compute(run.train_config())
        stored_steps = stored.training.steps
        cfg, recorded = resumed_config(stored, cfg, start, run.path, strict=strict_resume)
    t = cfg.training
    train, evals = open_sets(train_path, eval_paths)
    check_fits(cfg, train.num_labels, train.config.length, data_parallel=topo.num_devices)
    table = device_table(train, t.image_size, topo, omniglot_dir, cache_dir)
    record = data_record(train, evals)
    prepare_run(run, resume, record)
    ctx = StepContext.create(cfg, train.config)
    evaluator = Evaluator.create(ctx, evals, table, topo, max_seqs=t.eval_seqs, batch_size=t.eval_batch_size)
    job = TrainingRun(run, cfg, train.num_labels, record, evaluator, topo)
    owed: list[tuple[int, list[str]]] = []
    loaded = None if start is None else load_state(run.path, start, cfg, train.num_labels)
    if start is not None:  # read before the barrier: process 0 rewrites metrics.jsonl after it
        owed = owed_evaluations(run.evaluations(), checkpoint.list_steps(run.path), start, cfg,
                                (stored_steps, t.steps), evaluator.names)
    # every process must train the same run; also the barrier between every process's reads of the run
    # directory (above) and process 0's writes (below)
    agree(topo, {"config": cfg.to_dict(), "training set": record["train"]["fingerprint"],
                 "evaluation sets": [e["fingerprint"] for e in record["eval"]], "resume step": start,
                 "evaluations to redo": owed})
    if start is None:
        state = replicate(topo, init_state(cfg, train.num_labels))
        start = 0
        if topo.is_main:
            run.metrics_path.unlink(missing_ok=True)  # of a run that never saved a checkpoint
            run.create(cfg, record)
    else:
        state = replicate(topo, loaded)
        if topo.is_main:
            run.truncate_metrics_after(start)
            run.create(recorded, record)  # an extended run records its new number of steps; never fewer
    if announce is not None and topo.is_main:
        announce(start_line(cfg, topo.num_devices))
    resumed = loaded is not None
    with (interrupt or GracefulInterrupt()) as stop, \
            mirrored(run, tracking, "fit", session_start=start + 1 if resumed else 0, enabled=topo.is_main):
        if not job.redo(state, start, owed, lambda: stop.stop_requested):
            return FitResult(step=start, interrupted=True, run_dir=str(run.path))
        return _loop(job, ctx, train, state, start, stop, progress, profile, announce)


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
