"""Setting runs up for training: the one place that starts, resumes, checks and opens a training session,
for `trainer fit` (one run, data-parallel: `trainer.fit`) and vectorized groups (R runs in one step:
`trainer.group`). What differs between the two is only how a step is computed and where the states live.

`start_runs` takes each run through the same stages, in an order that writes nothing until every input
is checked:

1. its config: validated, compute settings resolved (config.json records the kernel path and layer loop
   that ran), and on a resume the stored config continued (`trainer.resume`: only `training.steps` may
   change; the loop's bookkeeping options too, unless `strict`);
2. its shard sets opened and checked, then the caller's `check` (a memory bound, a group's compatibility);
3. the image table (one per call: a group shares it), the run directory checked against the data
   (`trainer.resume.prepare_run`), its evaluator (one compiled evaluation per set, shared by a group);
4. on a resume, its checkpoint read and the evaluations an interrupt cut short listed;
5. `agree`: every process holds the same run (the barrier between every process's reads and process 0's
   writes; a no-op in one process);
6. the run directory written: config.json (an extended run records its larger number of steps) and
   metrics.jsonl (a resume drops records after its checkpoint; a fresh start of a run that never saved a
   checkpoint replaces it).

`session` then holds the signal handler and the live mirrors (`trainer.sinks`) for the whole training, and
`redo` evaluates what each run owes before training goes on.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import ShardSet, data_record, open_sets
from trainer.evaluate import Evaluator
from trainer.images import device_table
from trainer.loop import TrainingRun
from trainer.resume import owed_evaluations, prepare_run, resume_step, resumed_config
from trainer.run import RunDir
from trainer.runtime.distributed import Topology
from trainer.runtime.multihost import agree
from trainer.runtime.platform import check_cpu_isa, resolve_compute
from trainer.runtime.signals import GracefulInterrupt
from trainer.sinks import Tracking, check_available, mirrored
from trainer.state import TrainState, init_state, load_state
from trainer.step import StepContext

PathLike = str | os.PathLike

__all__ = ["RunSetup", "Started", "redo", "resolve", "session", "start_runs"]


@dataclass(frozen=True)
class RunSetup:
    """What a caller asks to train: a config, its sets, its run directory, and whether to resume it."""

    cfg: TrainConfig
    train_path: PathLike
    eval_paths: Sequence[PathLike]
    run: RunDir
    resume: bool = False
    tracking: Tracking | None = None


@dataclass(frozen=True)
class Started:
    """A run set up for training: its `TrainingRun` (directory, config now, data record, evaluator), the
    step context its train step is built from, its training set, its state on the host (fresh or the
    checkpoint's), the step it starts at, and the evaluations it owes (`trainer.resume.owed_evaluations`)."""

    job: TrainingRun
    ctx: StepContext
    train: ShardSet
    state: TrainState
    start: int
    resumed: bool
    owed: list[tuple[int, list[str]]]
    tracking: Tracking | None


def resolve(cfg: TrainConfig, run: RunDir, resume: bool, *, strict: bool = False
            ) -> tuple[TrainConfig, TrainConfig, int | None, int | None]:
    """(config to train with, config to record, resume step or None, the stored run's steps or None) of a
    run: `cfg` validated with its compute settings resolved, or on a resume the stored config continued."""
    cfg = resolve_compute(cfg.validate())
    check_cpu_isa(cfg.compute)  # XLA's CPU cap is fixed when JAX starts: the run computes as recorded
    if not resume:
        return cfg, cfg, None, None
    start = resume_step(run)
    stored = resolve_compute(run.train_config())
    now, recorded = resumed_config(stored, cfg, start, run.path, strict=strict)
    return now, recorded, start, stored.training.steps


def start_runs(setups: Sequence[RunSetup], topo: Topology, *, strict: bool = False,
               check: Callable[[list[TrainConfig], list[tuple[ShardSet, list]], list[int | None]], None] | None = None,
               omniglot_dir: PathLike | None = None, cache_dir: PathLike | None = "data/cache") -> list[Started]:
    """Set every run of `setups` up for training (module doc); nothing is written before all are checked.
    `check(configs, opened sets, resume steps)` is the caller's own refusal (one-line errors)."""
    for s in setups:
        if s.tracking is not None:
            check_available(s.tracking.sinks)
    configs = [resolve(s.cfg, s.run, s.resume, strict=strict) for s in setups]
    cfgs = [c for c, _, _, _ in configs]
    starts = [start for _, _, start, _ in configs]
    opened = [open_sets(s.train_path, s.eval_paths) for s in setups]
    if check is not None:
        check(cfgs, opened, starts)
    t = cfgs[0].training
    table = device_table(opened[0][0], t.image_size, topo, omniglot_dir, cache_dir)
    records = [data_record(train, evals) for train, evals in opened]
    for s, record in zip(setups, records):
        prepare_run(s.run, s.resume, record)
    compiled: dict[str, Callable] = {}  # one compiled evaluation per set: the runs differ only where it does not read
    started = []
    for s, (cfg, recorded, start, stored_steps), (train, evals), record in zip(setups, configs, opened, records):
        ctx = StepContext.create(cfg, train.config)
        evaluator = Evaluator.create(ctx, evals, table, topo, max_seqs=cfg.training.eval_seqs,
                                     batch_size=cfg.training.eval_batch_size, compiled=compiled)
        job = TrainingRun(s.run, cfg, train.num_labels, record, evaluator, topo)
        owed: list[tuple[int, list[str]]] = []
        if start is None:
            state = init_state(cfg, train.num_labels)
        else:  # read before the barrier: process 0 rewrites metrics.jsonl after it
            state = load_state(s.run.path, start, cfg, train.num_labels)
            owed = owed_evaluations(s.run.evaluations(), checkpoint.list_steps(s.run.path), start, cfg,
                                    (stored_steps, cfg.training.steps), evaluator.names)
        # every process must train the same run; also the barrier between every process's reads of the run
        # directory (above) and process 0's writes (below)
        agree(topo, {"config": cfg.to_dict(), "training set": record["train"]["fingerprint"],
                     "evaluation sets": [e["fingerprint"] for e in record["eval"]], "resume step": start,
                     "evaluations to redo": owed})
        started.append(Started(job, ctx, train, state, start or 0, start is not None, owed, s.tracking))
        if topo.is_main:
            if start is None:
                s.run.metrics_path.unlink(missing_ok=True)  # of a run that never saved a checkpoint
            else:
                s.run.truncate_metrics_after(start)
            s.run.create(recorded, record)  # an extended run records its new number of steps; never fewer
    return started


@contextlib.contextmanager
def session(started: Sequence[Started], interrupt: GracefulInterrupt | None = None) -> Iterator[GracefulInterrupt]:
    """The training session of `started`: Ctrl+C / SIGTERM ask to stop (`trainer.runtime.signals`), and each
    run's records are mirrored live to its sinks (`trainer.sinks`) until the block ends."""
    with (interrupt or GracefulInterrupt()) as stop, contextlib.ExitStack() as sinks:
        for s in started:
            sinks.enter_context(mirrored(s.job.run, s.tracking, "fit", session_start=s.start + 1 if s.resumed else 0,
                                         enabled=s.job.topo.is_main))
        yield stop


def redo(started: Sequence[Started], states: Sequence[TrainState], stop: GracefulInterrupt,
         place: Callable[[TrainState], TrainState] = lambda state: state) -> bool:
    """Evaluate what each run owes (from `states`, the runs' states at their start step; `place` puts one
    where the caller evaluates it, only for runs that owe something); False when a stop cut it short (the
    checkpoints are there: a resume redoes it)."""
    return all(s.job.redo(place(state), s.start, s.owed, lambda: stop.stop_requested)
               for s, state in zip(started, states) if s.owed)
