"""`trainer fit`: the training loop.

Batch k of the run is rows [k*B, (k+1)*B) of the training shard set (wrapping around), so resuming at
step s needs nothing but s: the restored TrainState (model, BatchNorm state, optimizer state, key) and
`trainer.runtime.multihost.train_stream(..., start_step=s)` continue exactly where an uninterrupted run would be,
on any number of processes and devices. Metrics are fetched from the device every `log_every` steps;
evaluation every `eval_every` steps; checkpoints every `checkpoint_every` steps, at the end, and at the
first Ctrl+C / SIGTERM to any process (all processes stop at the same step; process 0 writes).
(Evaluations and checkpoints may instead follow a log-spaced or listed schedule: `trainer.schedule`.) A
resume first redoes the evaluations an interrupt cut short (`trainer.resume`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.runtime.distributed import Topology, make_topology, replicate, to_global
from trainer.evaluate import evaluate_set, set_name
from trainer.runtime.multihost import agree, any_process, train_stream
from trainer.resume import owed_evaluations, resumed_config
from trainer.run import RunDir, RunError, run_lock
from trainer.schedule import StepSchedule
from trainer.session import Session, data_record, load_state, make_session, restore
from trainer.runtime.signals import GracefulInterrupt
from trainer.step import TrainState, eval_key, init_state, make_train_step


@dataclass(frozen=True)
class FitResult:
    step: int
    interrupted: bool
    run_dir: str


def _resume_step(run: RunDir) -> int:
    """The checkpoint a --resume continues from; RunError (one line) when there is none."""
    if not run.exists():
        raise RunError(f"--resume given but {run.path} holds no run; drop --resume to start one")
    step = checkpoint.latest_step(run.path)
    if step is None:
        raise RunError(f"--resume given but {run.path} has no complete checkpoint (it stopped before its first "
                       "save); drop --resume to start afresh")
    return step


def _prepare_run(run: RunDir, cfg: TrainConfig, resume: bool, session_data: dict[str, Any]) -> None:
    """Validate the run directory for a fresh start or a resume. A fresh start is refused where a
    checkpoint exists; a run that never saved one is started afresh (its config and metrics replaced)."""
    if resume:
        stored = run.read()
        if stored["data"]["train"]["fingerprint"] != session_data["train"]["fingerprint"]:
            raise RunError(
                f"--train differs from the shard set this run was trained on ({stored['data']['train']['path']}); "
                "resume with the same --train"
            )
        return
    if checkpoint.list_steps(run.path):
        raise RunError(f"{run.path} already holds a run; use --resume to continue it or pick another --run-dir")


def fit(cfg: TrainConfig, train_path: str | os.PathLike, eval_paths: Sequence[str | os.PathLike],
        run_dir: str | os.PathLike, *, topo: Topology | None = None, **kwargs: Any) -> FitResult:
    """Train (see `_fit`) holding the run directory's writer lock: one `trainer fit` per run directory
    (only process 0 writes, so only it locks)."""
    topo = topo or make_topology()
    with run_lock(run_dir, "trainer fit", enabled=topo.is_main):
        return _fit(cfg, train_path, eval_paths, run_dir, topo=topo, **kwargs)


def _fit(
    cfg: TrainConfig,
    train_path: str | os.PathLike,
    eval_paths: Sequence[str | os.PathLike],
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    omniglot_dir: Any = None,
    cache_dir: Any = "data/cache",
    topo: Topology | None = None,
    progress: bool | None = None,
    interrupt: GracefulInterrupt | None = None,
    strict_resume: bool = False,
) -> FitResult:
    """Train (or with `resume`, continue) the run in `run_dir`. A resume keeps the stored config; only
    `training.steps` may differ (`trainer.resume`: other changed options are refused, and with
    `strict_resume` the loop's bookkeeping options too, else those are kept from the stored config)."""
    cfg = cfg.validate()
    topo = topo or make_topology()
    topo.check_batch(cfg.training.batch_size)
    run = RunDir(run_dir)
    start = _resume_step(run) if resume else None
    stored_steps = None
    if start is not None:
        stored = run.train_config()
        stored_steps = stored.training.steps
        cfg, recorded = resumed_config(stored, cfg, start, run.path, strict=strict_resume)
    session = make_session(cfg, train_path, eval_paths, topo, omniglot_dir=omniglot_dir, cache_dir=cache_dir)
    record = data_record(session.train, session.evals)
    _prepare_run(run, cfg, resume, record)
    num_classes = session.train.num_labels
    owed: list[tuple[int, list[str]]] = []
    loaded = None if start is None else load_state(run.path, start, cfg, num_classes)
    if start is not None:  # read before the barrier: process 0 rewrites metrics.jsonl after it
        owed = owed_evaluations(run.read_metrics(), checkpoint.list_steps(run.path), start, cfg,
                                (stored_steps, cfg.training.steps), [set_name(s) for s in session.evals])
    # every process must train the same run; also the barrier between every process's reads of the run
    # directory (above) and process 0's writes (below)
    agree(topo, {"config": cfg.to_dict(), "training set": record["train"]["fingerprint"],
                 "evaluation sets": [e["fingerprint"] for e in record["eval"]], "resume step": start,
                 "evaluations to redo": owed})
    if start is None:
        state = replicate(topo, init_state(cfg, num_classes))
        start = 0
        if topo.is_main:
            run.metrics_path.unlink(missing_ok=True)  # of a run that never saved a checkpoint
            run.create(cfg, record)
    else:
        state = replicate(topo, loaded)
        if topo.is_main:
            run.truncate_metrics_after(start)
            run.create(recorded, record)  # an extended run records its new number of steps; never fewer
    with (interrupt or GracefulInterrupt()) as stop:
        if not _redo_evaluations(session, run, state, start, owed, stop):
            return FitResult(step=start, interrupted=True, run_dir=str(run.path))
        return _loop(session, run, state, start, stop, progress)


def _redo_evaluations(session: Session, run: RunDir, state: TrainState, start: int,
                      owed: list[tuple[int, list[str]]], stop: GracefulInterrupt) -> bool:
    """Evaluate what an interrupted run still owes (`trainer.resume.owed_evaluations`), each from its own
    checkpoint; False when interrupted (the checkpoints are already there: nothing to save)."""
    for step, names in owed:
        at = state if step == start else restore(run.path, step, session.cfg, session.train.num_labels, session.topo)
        if not _evaluate(session, run, session.eval_steps(), at, step, stop, only=set(names)):
            return False
    return True


def _loop(session: Session, run: RunDir, state: TrainState, start: int, stop: GracefulInterrupt, progress: bool | None) -> FitResult:
    cfg, topo = session.cfg, session.topo
    t = cfg.training
    train_step = make_train_step(session.ctx)
    eval_steps = session.eval_steps()
    eval_due, save_due = StepSchedule.of(t, "eval").due, StepSchedule.of(t, "checkpoint").due
    stream = train_stream(session.train, topo, t.batch_size, start)
    step = start
    pending: list[tuple[int, dict[str, Any]]] = []
    bar = tqdm(total=t.steps, initial=start, disable=None if progress is None else not progress,
               unit="step", dynamic_ncols=True)
    interrupted = False
    try:
        with stream:
            while step < t.steps:
                if any_process(topo, stop.stop_requested):  # all processes stop at the same step
                    interrupted = True
                    break
                k = _dispatch_size(step, t)
                local = [next(stream) for _ in range(k)]
                stacked = {name: np.stack([b[name] for b in local]) for name in local[0]}
                state, metrics = train_step(session.table, state, to_global(topo, stacked, leading=1))
                pending.append((step, metrics))
                step += k
                bar.update(k)
                if step % t.log_every == 0 or step == t.steps:
                    _flush_train_metrics(run, topo, pending, bar)
                    pending = []
                if eval_due(step):
                    if not _evaluate(session, run, eval_steps, state, step, stop):
                        interrupted = True
                        break
                if save_due(step):
                    _save(run, topo, state, step, cfg, session)
    finally:
        bar.close()
    if pending:
        _flush_train_metrics(run, topo, pending, None)
    if interrupted:
        _save(run, topo, state, step, cfg, session)
    return FitResult(step=step, interrupted=interrupted, run_dir=str(run.path))


def _dispatch_size(step: int, t: Any) -> int:
    """Steps in the next jitted call: up to steps_per_dispatch, never crossing a log/eval/save boundary."""
    k = min(t.steps_per_dispatch, t.log_every - step % t.log_every)
    for what in ("eval", "checkpoint"):
        k = min(k, StepSchedule.of(t, what).until_next(step))
    return max(1, min(k, t.steps - step))


def _flush_train_metrics(run: RunDir, topo: Topology, pending: list, bar: Any) -> None:
    """One record per logging window: metrics averaged over the steps since the last record."""
    host = jax.device_get([m for _, m in pending])
    first, _ = pending[0]
    names = host[0].keys()
    means = {name: float(np.mean(np.concatenate([np.ravel(m[name]) for m in host]))) for name in names}
    steps = sum(len(np.ravel(next(iter(m.values())))) for m in host)
    end = first + steps
    if topo.is_main:
        run.append_metrics({"step": end, "kind": "train", "window": steps, "metrics": means})
    if bar is not None:
        bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy_query']:.3f}")


def _evaluate(session: Session, run: RunDir, eval_steps: list, state: TrainState, step: int, stop: GracefulInterrupt,
              only: set[str] | None = None) -> bool:
    t = session.cfg.training
    for shard_set, eval_step in zip(session.evals, eval_steps):
        if only is not None and set_name(shard_set) not in only:
            continue
        summary = evaluate_set(
            eval_step, session.table, state.model, state.bn_state, shard_set, session.topo,
            max_seqs=t.eval_seqs, batch_size=t.eval_batch_size, should_stop=lambda: stop.stop_requested,
            key=eval_key(t.seed, step),
        )
        if summary is None:
            return False
        if session.topo.is_main:
            run.append_metrics({
                "step": step, "kind": "eval", "source": "fit", "set": set_name(shard_set),
                "seq_type": shard_set.config.seq_type.value, "metrics": summary,
            })
    return True


def _save(run: RunDir, topo: Topology, state: TrainState, step: int, cfg: TrainConfig, session: Session) -> None:
    if not topo.is_main:
        return
    meta = {"trainer": cfg.to_dict(), "num_classes": session.train.num_labels, "time": time.time(),
            "data": data_record(session.train, session.evals)}
    checkpoint.save(run.path, step, jax.device_get(state), meta, keep=cfg.training.keep_checkpoints)
