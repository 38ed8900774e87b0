"""Carry a plan out: build the missing shard sets, then train / resume / evaluate its runs, one after another
in this process (`jobs=1`) or `jobs` at a time in worker processes with the CPU cores split between them.
With `group > 1`, runs that share a model shape (`trainer.group.plan_groups`: seeds and draw-only options
of one setting, or settings that differ only there) train as one vectorized group of up to `group` runs.

Defaults (`default_jobs`, `default_group`), from `bench/sweep_bench.py` on the 2-core CPU (docs/speed.md,
"Vectorized runs and parallel processes"): processes pinned one per core train more runs per hour than
one-by-one training (1.52x steady on a quiet machine), while a vectorized group of 3 trains no faster
(0.97x), so on the CPU `jobs` = the cores and `group` = 1. On an accelerator `jobs` = 1 and `group` = 8
(a batch-32 model leaves a GPU mostly idle; not yet measured on one).

After each run the report is rewritten (`trainer.sweep.report`): into `<out>` itself, or into a separate
results folder that also receives a copy of each run's `config.json`, `metrics.jsonl` (and `analysis.jsonl`) and `evaluations/`
(never checkpoints), so that the report can be rebuilt from that folder alone. `provenance.json` there
in each run's folder records the commit of the code, the hardware and the wall time of each segment.

With `log_to` (the sweep file's, plus `trainer sweep --log-to`), every run's records are mirrored live
(`trainer.sinks`) under the run's name `<setting>/seed-<s>`, grouped in W&B by `<sweep>/<setting>`; its
TensorBoard event files are in its run directory, so `tensorboard --logdir <out>/runs` names it the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from seqgen.atomic import atomic_copy, atomic_write_json
from trainer.runtime.signals import GracefulInterrupt
from trainer.sinks import Tracking
from trainer.sweep.plan import Plan, RunAction, RunPlan, SetAction
from trainer.sweep.provenance import record_provenance
from trainer.sweep.report import write_report
from trainer.sweep.spec import SweepError

# + evaluations/step-N.json; analysis.jsonl where `trainer analyze` wrote one; provenance.json is written there
PUBLISHED = ("config.json", "metrics.jsonl", "analysis.jsonl")


@dataclasses.dataclass(frozen=True)
class Outcome:
    interrupted: bool
    trained: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: tuple[str, ...]
    outputs: tuple[Path, ...]
    pending: tuple[str, ...] = ()  # cluster job ids still queued or running when the command returned


def _write_plan(plan: Plan, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "sweep": str(plan.sweep.path), "name": plan.sweep.name, "x": plan.sweep.x_label,
        "sweep_file": plan.sweep.path.read_text(),
        "runs": [{"name": r.spec.name, "setting": r.spec.setting, "seed": r.spec.seed, "x": r.spec.x,
                  "bases": list(r.spec.bases), "run_dir": str(r.run_dir), "train": str(r.train_dir),
                  "eval": [str(e) for e in r.eval_dirs], "trainer": r.spec.trainer.to_dict(),
                  "seqgen": r.spec.train.to_dict()} for r in plan.runs],
    }
    atomic_write_json(folder / "sweep.json", record)


def publish(run_dir: Path, results: Path, name: str) -> None:
    """Copy what a report is built from (config.json, metrics.jsonl, analysis.jsonl, evaluations/*.json; no
    checkpoints)."""
    target = results / "runs" / name
    if target.resolve() == run_dir.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    files = [run_dir / f for f in PUBLISHED] + sorted((run_dir / "evaluations").glob("step-*.json"))
    for src in files:
        if src.is_file():
            dst = target / src.relative_to(run_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_copy(src, dst)


def default_jobs() -> int:
    """Runs at once by default: one per CPU core on the CPU, one on an accelerator (module docstring)."""
    import jax

    return len(os.sched_getaffinity(0)) if jax.default_backend() == "cpu" else 1


def default_group() -> int:
    """Vectorized group size by default: 1 on the CPU (no faster there), 8 on an accelerator."""
    import jax

    return 1 if jax.default_backend() == "cpu" else 8


def units_of(todo: list[RunPlan], group: int) -> list[list[RunPlan]]:
    """The units of work: evaluations alone, training runs in vectorized groups of up to `group`."""
    train = [r for r in todo if r.action in (RunAction.TRAIN, RunAction.RESUME)]
    units: list[list[RunPlan]] = [[r] for r in todo if r.action is RunAction.EVALUATE]
    if group <= 1 or len(train) <= 1:
        return [[r] for r in train] + units
    from trainer.group import plan_groups

    idx = plan_groups([r.spec.trainer for r in train], [r.train_dir for r in train], [r.run_dir for r in train],
                      resume=[r.action is RunAction.RESUME for r in train], max_size=group)
    return [[train[i] for i in g] for g in idx] + units


def tracking_of(plan: Plan, r: RunPlan, log_to: tuple[str, ...]) -> Tracking | None:
    """How run `r` is tracked live: the sweep file's sinks and `log_to`, named `<setting>/seed-<s>`."""
    sinks = tuple(dict.fromkeys(plan.sweep.log_to + tuple(log_to)))
    if not sinks:
        return None
    return Tracking(sinks, r.spec.name, f"{plan.sweep.name}/{r.spec.setting}")


def label(unit: list[RunPlan]) -> str:
    return unit[0].spec.name if len(unit) == 1 else f"{unit[0].spec.name} + {len(unit) - 1} more (vectorized)"


def prepare(plan: Plan, results: Path, *, omniglot_dir: Any, cache_dir: Any, workers: int, progress: bool | None,
            echo: Callable[[str], None], log_to: tuple[str, ...] = ()) -> list[RunPlan]:
    """What every executor first does in the sweep's own process (`trainer.sweep.cluster` too, so that no two
    jobs ever build one set at once): check the tracking sinks can be had, record the plan, build the missing
    sets, publish the skipped runs and clear what a run that starts afresh left. Returns the runs to train,
    resume or evaluate."""
    from seqgen.build import build
    from trainer.sinks import check_available

    check_available(plan.sweep.log_to + tuple(log_to))  # before any set is built
    _write_plan(plan, plan.out)
    if results != plan.out:
        _write_plan(plan, results)
    for s in plan.sets:
        if s.action is not SetAction.REUSE:
            echo(f"{s.action.value}: {s.folder}")
            build(s.cfg, s.folder, workers=workers, omniglot_dir=omniglot_dir, cache_dir=cache_dir,
                  progress=bool(progress) if progress is not None else True)
    for r in plan.runs:
        if r.action is RunAction.SKIP and r.published is None:
            publish(r.run_dir, results, r.spec.name)
    todo = [r for r in plan.runs if r.action is not RunAction.SKIP]
    for r in todo:
        clear_stale(r)
    return todo


def execute(plan: Plan, *, command: str, results: Path | None = None, omniglot_dir: Any = None,
            cache_dir: Any = "data/cache", workers: int = 1, jobs: int = 1, group: int = 1,
            progress: bool | None = None, interrupt: GracefulInterrupt | None = None,
            echo: Callable[[str], None] = print, log_to: tuple[str, ...] = ()) -> Outcome:
    """Build the missing sets, train / resume / evaluate the runs, then write the report; `log_to`: sinks
    that mirror every run's records, besides the sweep file's (module docstring)."""
    results = Path(results) if results is not None else plan.out
    todo = prepare(plan, results, omniglot_dir=omniglot_dir, cache_dir=cache_dir, workers=workers,
                   progress=progress, echo=echo, log_to=log_to)
    track = lambda r: tracking_of(plan, r, log_to)  # noqa: E731
    skipped = [r.spec.name for r in plan.runs if r.action is RunAction.SKIP]
    report = lambda: write_report(plan.sweep, results, command=command, shards_dir=plan.shards_dir)  # noqa: E731
    stop = interrupt or GracefulInterrupt()
    units = units_of(todo, group)
    if jobs <= 1 or len(units) <= 1:  # one unit: in this process, on every core
        trained, failed, interrupted = _in_process(units, results, stop, omniglot_dir, cache_dir, progress, echo,
                                                   report, track)
    else:
        with stop:
            trained, failed, interrupted = _in_workers(units, results, stop, jobs, omniglot_dir, cache_dir, echo,
                                                       report, plan.out, track)
    outputs = report()
    return Outcome(interrupted, tuple(trained), tuple(skipped), tuple(failed), tuple(outputs))


def _in_process(units: list[list[RunPlan]], results: Path, stop: GracefulInterrupt, omniglot_dir: Any,
                cache_dir: Any, progress: bool | None, echo: Callable[[str], None], report: Callable[[], Any],
                track: Callable[[RunPlan], Tracking | None]):
    from trainer.runtime.distributed import make_topology
    from trainer.evaluate import evaluate_run
    from trainer.fit import fit
    from trainer.group import fit_group

    trained: list[str] = []
    for unit in units:
        if stop.stop_requested:
            return trained, [], True
        start = time.time()
        r = unit[0]
        if r.action is RunAction.EVALUATE:
            echo(f"evaluate: {r.spec.name} at step {r.step}")
            res = evaluate_run(r.run_dir, r.eval_dirs, step=r.step, train_dir=r.train_dir,
                               max_seqs=None,  # the final evaluation reads whole sets (plan.final_results)
                               batch_size=r.spec.trainer.training.eval_batch_size, omniglot_dir=omniglot_dir,
                               cache_dir=cache_dir, topo=make_topology(), echo=lambda _: None, interrupt=stop,
                               tracking=track(r))
            done = res is not None
        elif len(unit) == 1:
            where = f" from step {r.step}" if r.action is RunAction.RESUME else ""
            echo(f"{r.action.value}: {r.spec.name} (x = {r.spec.x}){where} -> {r.run_dir}")
            result = fit(r.spec.trainer, r.train_dir, r.eval_dirs, r.run_dir, resume=r.action is RunAction.RESUME,
                         omniglot_dir=omniglot_dir, cache_dir=cache_dir, progress=progress, interrupt=stop,
                         tracking=track(r))
            done = not result.interrupted
        else:
            echo(f"{r.action.value}: {', '.join(u.spec.name for u in unit)} as one vectorized group")
            out = fit_group([u.spec.trainer for u in unit], [u.train_dir for u in unit], [u.eval_dirs for u in unit],
                            [u.run_dir for u in unit], resume=[u.action is RunAction.RESUME for u in unit],
                            omniglot_dir=omniglot_dir, cache_dir=cache_dir, progress=progress, interrupt=stop,
                         tracking=track(r))
            done = not any(o.interrupted for o in out)
        for u in unit:
            record_provenance(results, u.spec.name, u.action.value, time.time() - start, jobs=1, cpus=None,
                              group=len(unit))
            publish(u.run_dir, results, u.spec.name)
        if not done:
            return trained, [], True
        trained += [u.spec.name for u in unit]
        report()
    return trained, [], False


def clear_stale(r: RunPlan) -> None:
    """A run of this config that never saved a checkpoint starts afresh: its config.json and metrics go."""
    if r.action is RunAction.TRAIN:
        for stale in ("config.json", "metrics.jsonl"):
            (r.run_dir / stale).unlink(missing_ok=True)


def cpu_groups(jobs: int, cpus: list[int] | None = None) -> list[list[int]]:
    """Split the CPUs this process may use into `jobs` groups (as evenly as possible; jobs <= CPUs)."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if jobs > len(cpus):
        raise SweepError(f"--jobs {jobs} exceeds the {len(cpus)} CPU cores available; use --jobs {len(cpus)} or fewer")
    return [cpus[i::jobs] for i in range(jobs)]


def order_of(unit: list[RunPlan], omniglot_dir: Any, cache_dir: Any, cpus: list[int] | None,
             track: Callable[[RunPlan], Tracking | None] | None = None) -> dict[str, Any]:
    """The order `trainer.sweep.worker` reads (its docstring); `cpus` None: the worker keeps this process's
    cores; `track`: each run's live tracking (`tracking_of`), none by default."""
    return {"runs": [{"action": r.action.value, "step": r.step, "trainer": r.spec.trainer.to_dict(),
                      "train": str(r.train_dir), "evals": [str(e) for e in r.eval_dirs], "run_dir": str(r.run_dir),
                      "tracking": None if track is None or (t := track(r)) is None else t.to_dict()}
                     for r in unit],
            "omniglot_dir": None if omniglot_dir is None else str(omniglot_dir), "cache_dir": str(cache_dir),
            "cpus": cpus, "parent": os.getpid()}


def worker_command(order: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "trainer.sweep.worker", json.dumps(order)]


def _in_workers(units: list[list[RunPlan]], results: Path, stop: GracefulInterrupt, jobs: int, omniglot_dir: Any,
                cache_dir: Any, echo: Callable[[str], None], report: Callable[[], Any], out: Path,
                track: Callable[[RunPlan], Tracking | None]):
    groups = cpu_groups(min(jobs, len(units)) or 1)
    free = list(range(len(groups)))
    queue = list(units)
    running: dict[int, tuple[subprocess.Popen, list[RunPlan], float, Path]] = {}
    trained: list[str] = []
    failed: list[str] = []
    forwarded = False
    stopped_alone = False  # a worker that exited 130 without our asking (e.g. SIGTERM sent to it directly)
    while running or (queue and not stop.stop_requested and not stopped_alone):
        if stop.stop_requested and not forwarded:
            for proc, *_ in running.values():
                proc.send_signal(signal.SIGINT)  # workers run in their own session: this is their only one
            forwarded = True
        while queue and free and not stop.stop_requested:
            unit = queue.pop(0)
            slot = free.pop(0)
            r = unit[0]
            log = out / "logs" / f"{r.spec.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("ab") as f:
                proc = subprocess.Popen(worker_command(order_of(unit, omniglot_dir, cache_dir, groups[slot], track)),
                                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            where = f" from step {r.step}" if r.action is RunAction.RESUME else ""
            head = (f"evaluate: {r.spec.name} at step {r.step}" if r.action is RunAction.EVALUATE else
                    f"{r.action.value}: {label(unit)} (x = {r.spec.x}){where} -> {r.run_dir}")
            echo(f"{head} [cpus {','.join(map(str, groups[slot]))}; log {log}]")
            running[slot] = (proc, unit, time.time(), log)
        time.sleep(0.2)
        for slot, (proc, unit, start, log) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            if code in (-signal.SIGINT, -signal.SIGTERM):  # killed by the signal before its handler was in place
                code = 130
            del running[slot]
            free.append(slot)
            for u in unit:
                record_provenance(results, u.spec.name, u.action.value, time.time() - start, jobs=jobs,
                                  cpus=groups[slot], group=len(unit))
                publish(u.run_dir, results, u.spec.name)
            if code == 0:
                trained += [u.spec.name for u in unit]
                echo(f"finished: {label(unit)} ({(time.time() - start) / 60:.1f} min)")
                report()
            elif code == 130:
                echo(f"stopped: {label(unit)} (its progress is saved)")
                stopped_alone = stopped_alone or not stop.stop_requested
            else:
                failed += [u.spec.name for u in unit]
                echo(f"failed: {label(unit)} (exit {code}): {last_line(log)}; see {log}")
    return trained, failed, stop.stop_requested or stopped_alone


def last_line(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
