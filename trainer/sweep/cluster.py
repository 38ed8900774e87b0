"""`trainer sweep FILE --executor slurm | local`: the sweep's units of work as cluster jobs, through submitit.

The plan is the sweep's own (`trainer.sweep.plan`), and so are its units of work (`execute.units_of`: one
run, or runs of one model shape trained as one vectorized group): each unit becomes one job
(`trainer.sweep.job.SweepJob`), all of them one Slurm job array. Before anything is submitted, this process
records the plan, builds the missing shard sets and publishes skipped runs (`execute.prepare`, as for
`--executor here`): two jobs never build one set at once. A sweep submitted again skips the finished
runs and resumes the others, since each job plans its runs again when it starts (`job.replan`).

`slurm` submits with `sbatch` (`--partition`, `--time`, `--gpus-per-job`, `--cpus-per-job`, `--mem`,
`--slurm-arg KEY=VALUE` for any other sbatch option; `--jobs N` caps how many run at once). `local` is
submitit's local executor: every job a process on this machine (it honours the time limit and the GPU
count, and ignores the rest), for trying a sweep's job layout before a cluster sees it.

Then this process either waits, printing each job's end and rewriting the report as they come (the
default), or returns after printing the job ids (`--no-wait`); the jobs publish their runs into the results
folder themselves, so `trainer sweep FILE --report-only` writes the report later. submitit is an optional
dependency (`pip install -e ".[slurm]"`): without it, these executors are refused in one line.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from seqgen.configio import ConfigError
from trainer.runtime.signals import GracefulInterrupt
from trainer.sweep.execute import Outcome, label, last_line, prepare, units_of
from trainer.sweep.plan import Plan, RunAction, RunPlan, SetAction
from trainer.sweep.report import write_report
from trainer.sweep.spec import SweepError

EXECUTORS = ("here", "slurm", "local")
CLUSTER = ("slurm", "local")
INSTALL = 'pip install -e ".[slurm]"'
POLL_S = {"slurm": 15.0, "local": 1.0}  # how often a waiting sweep asks whether jobs ended (sacct on Slurm)
# Jobs left running by --no-wait. The local executor's are child processes of this one: their handles are
# kept as long as it lives (a handle dropped while its process runs is a ResourceWarning, an error in tests).
_LEFT_RUNNING: list[Any] = []


@dataclasses.dataclass(frozen=True)
class Resources:
    """What each job asks for. None: the cluster's default."""

    time_min: int = 60
    partition: str | None = None
    gpus: int = 0
    cpus: int | None = None
    mem_gb: float | None = None
    slurm_args: tuple[tuple[str, str], ...] = ()
    at_once: int | None = None  # --jobs: at most this many jobs of the array run at once

    def describe(self) -> str:
        parts = [f"partition {self.partition}"] if self.partition else []
        parts.append(f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}")
        if self.cpus is not None:
            parts.append(f"{self.cpus} CPUs")
        if self.mem_gb is not None:
            parts.append(f"{self.mem_gb:g} GB")
        parts.append(f"{self.time_min} min")
        parts += [f"{k}={v}" for k, v in self.slurm_args]
        return ", ".join(parts)

    def parameters(self, name: str) -> dict[str, Any]:
        """submitit.AutoExecutor's parameters (the `slurm_` ones are ignored by the local executor)."""
        params: dict[str, Any] = {"name": name, "timeout_min": self.time_min, "gpus_per_node": self.gpus,
                                  "slurm_additional_parameters": dict(self.slurm_args)}
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.cpus is not None:
            params["cpus_per_task"] = self.cpus
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        if self.at_once is not None:
            params["slurm_array_parallelism"] = self.at_once
        return params


def parse_slurm_args(values: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`--slurm-arg KEY=VALUE` (an sbatch option without its dashes: `account=abc`, `qos=high`)."""
    pairs = []
    for v in values:
        key, eq, value = v.partition("=")
        key = key.strip().lstrip("-")
        if not eq or not key:
            raise ConfigError(f"--slurm-arg {v}: expected KEY=VALUE, an sbatch option without its dashes "
                              "(e.g. --slurm-arg account=abc)")
        pairs.append((key, value))
    return tuple(pairs)


def load_submitit(executor: str) -> Any:
    try:
        import submitit
    except ImportError:
        raise SweepError(f"--executor {executor} needs submitit; install it with {INSTALL}") from None
    return submitit


def planned_units(plan: Plan, group: int) -> tuple[list[list[RunPlan]], str | None]:
    """The jobs of a plan as they would be submitted now, for `--dry-run` (which builds nothing): runs are
    grouped only by their training sets' contents, so before those exist each run is shown as its own job,
    with a note."""
    todo = [r for r in plan.runs if r.action is not RunAction.SKIP]
    unbuilt = {s.folder for s in plan.sets if s.action is not SetAction.REUSE}
    if group > 1 and any(r.train_dir in unbuilt for r in todo if r.action is not RunAction.EVALUATE):
        return [[r] for r in todo], (f"runs of one model shape share a job (up to {group}) once their training "
                                     "sets are built; shown one per job until then")
    return units_of(todo, group), None


def job_lines(units: list[list[RunPlan]], resources: Resources, executor: str, note: str | None) -> list[str]:
    """One line per job: the runs it holds and what it asks for."""
    lines = [f"{len(units)} job{'s' if len(units) != 1 else ''} on {executor} ({resources.describe()} each)"]
    for i, unit in enumerate(units, 1):
        r = unit[0]
        at = f" from step {r.step}" if r.action is RunAction.RESUME else ""
        grouped = " (one vectorized group)" if len(unit) > 1 else ""
        lines.append(f"  job  {i:<3} {r.action.value:<9} {', '.join(u.spec.name for u in unit)}{grouped}{at}")
    if note:
        lines.append(f"  ({note})")
    return lines


@dataclasses.dataclass
class _Submitted:
    job: Any  # a submitit Job
    unit: list[RunPlan]
    log: Path


def run_on_cluster(plan: Plan, *, executor: str, resources: Resources, command: str, results: Path,
                   omniglot_dir: Any, cache_dir: Any, workers: int, group: int, progress: bool | None, wait: bool,
                   echo: Callable[[str], None] = print, interrupt: GracefulInterrupt | None = None) -> Outcome:
    """Prepare (build sets), submit one job per unit, then wait for them (or not) and write the report."""
    submitit = load_submitit(executor)  # before any set is built
    todo = prepare(plan, results, omniglot_dir=omniglot_dir, cache_dir=cache_dir, workers=workers,
                   progress=progress, echo=echo)
    skipped = tuple(r.spec.name for r in plan.runs if r.action is RunAction.SKIP)
    report = lambda: write_report(plan.sweep, results, command=command, shards_dir=plan.shards_dir)  # noqa: E731
    if not todo:
        return Outcome(False, (), skipped, (), tuple(report()))
    units = units_of(todo, group)
    submitted = _submit(submitit, plan, units, executor, resources, results, omniglot_dir, cache_dir)
    for s in submitted:
        echo(f"submitted: job {s.job.job_id}: {s.unit[0].action.value} {label(s.unit)} [log {s.log}]")
    if not wait:
        _LEFT_RUNNING.extend(s.job for s in submitted)
        return Outcome(False, (), skipped, (), (), pending=tuple(s.job.job_id for s in submitted))
    trained, failed, stopped, pending = _wait(submitted, POLL_S[executor], interrupt or GracefulInterrupt(
        "stopping the wait; the jobs go on"), report, echo)
    _LEFT_RUNNING.extend(s.job for s in submitted if s.job.job_id in pending)
    return Outcome(stopped or bool(pending), tuple(trained), skipped, tuple(failed), tuple(report()),
                   pending=tuple(pending))


def _submit(submitit: Any, plan: Plan, units: list[list[RunPlan]], executor: str, resources: Resources,
            results: Path, omniglot_dir: Any, cache_dir: Any) -> list[_Submitted]:
    from trainer.sweep.job import JobOrder, SweepJob

    ex = submitit.AutoExecutor(folder=plan.out / "submitit", cluster=executor)
    ex.update_parameters(**resources.parameters(f"sweep-{plan.sweep.name}"))
    cwd = Path.cwd()
    orders = [JobOrder(tuple(unit), results, cwd, plan.out / "logs" / f"{unit[0].spec.name}.log",
                       None if omniglot_dir is None else str(omniglot_dir), str(cache_dir)) for unit in units]
    jobs = ex.submit_array([SweepJob(o) for o in orders])
    return [_Submitted(j, list(o.runs), o.log) for j, o in zip(jobs, orders)]


def _wait(submitted: list[_Submitted], poll_s: float, stop: GracefulInterrupt, report: Callable[[], Any],
          echo: Callable[[str], None]) -> tuple[list[str], list[str], bool, list[str]]:
    """Wait for every job; print each end as it comes and rewrite the report. Ctrl+C stops the wait only."""
    trained: list[str] = []
    failed: list[str] = []
    stopped = False
    pending = list(submitted)
    start = time.time()
    with stop:
        while pending and not stop.stop_requested:
            for s in [s for s in pending if s.job.done()]:
                pending.remove(s)
                code, why = _ending(s)
                minutes = (time.time() - start) / 60
                where = f"job {s.job.job_id}, {len(submitted) - len(pending)}/{len(submitted)} ended, {minutes:.1f} min"
                if code == 0:
                    trained += [u.spec.name for u in s.unit]
                    echo(f"finished: {label(s.unit)} ({where})")
                elif code == 130:
                    stopped = True
                    echo(f"stopped: {label(s.unit)} ({where}; its progress is saved)")
                else:
                    failed += [u.spec.name for u in s.unit]
                    echo(f"failed: {label(s.unit)} ({where}): {why}")
                report()
            _sleep(poll_s if pending else 0, stop)
    return trained, failed, stopped, [s.job.job_id for s in pending]


def _ending(s: _Submitted) -> tuple[int | None, str]:
    """(the job's exit status, or None with one line on why it failed)."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        return int(s.job.result()), ""
    except FailedJobError:
        return None, f"{last_line(s.log)}; see {s.log}"
    except UncompletedJobError:
        return None, (f"ended without a result (killed, cancelled or out of time: {last_line(s.log)}); see "
                      f"{s.log} and {s.job.paths.stderr}")


def _sleep(seconds: float, stop: GracefulInterrupt) -> None:
    end = time.time() + seconds
    while time.time() < end and not stop.stop_requested:
        time.sleep(min(0.2, seconds))
