"""Carry a plan out: build the missing shard sets, then train / resume / evaluate its runs, one after another
in this process (`jobs=1`) or `jobs` at a time in worker processes with the CPU cores split between them.

After each run the report is rewritten (`trainer.sweep.report`): into `<out>` itself, or into a separate
results folder that also receives a copy of each run's `config.json`, `metrics.jsonl` and `evaluations/`
(never checkpoints), so that the report can be rebuilt from that folder alone. `provenance.json` there
records, per run, the commit of the code, the hardware and the wall time of each training segment.
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

from seqgen.atomic import atomic_copy, atomic_write_text
from trainer.signals import GracefulInterrupt
from trainer.sweep.plan import Plan, RunAction, RunPlan, SetAction
from trainer.sweep.report import record_provenance, write_report
from trainer.sweep.spec import SweepError

PUBLISHED = ("config.json", "metrics.jsonl")


@dataclasses.dataclass(frozen=True)
class Outcome:
    interrupted: bool
    trained: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: tuple[str, ...]
    outputs: tuple[Path, ...]


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
    atomic_write_text(folder / "sweep.json", json.dumps(record, indent=1, sort_keys=True))


def publish(run_dir: Path, results: Path, name: str) -> None:
    """Copy what a report is built from (config.json, metrics.jsonl, evaluations/*.json; no checkpoints)."""
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


def execute(plan: Plan, *, command: str, results: Path | None = None, omniglot_dir: Any = None,
            cache_dir: Any = "data/cache", workers: int = 1, jobs: int = 1, progress: bool | None = None,
            interrupt: GracefulInterrupt | None = None, echo: Callable[[str], None] = print) -> Outcome:
    """Build the missing sets, train / resume / evaluate the runs, then write the report."""
    from seqgen.build import build

    results = Path(results) if results is not None else plan.out
    _write_plan(plan, plan.out)
    if results != plan.out:
        _write_plan(plan, results)
    for s in plan.sets:
        if s.action is not SetAction.REUSE:
            echo(f"{s.action.value}: {s.folder}")
            build(s.cfg, s.folder, workers=workers, omniglot_dir=omniglot_dir, cache_dir=cache_dir,
                  progress=bool(progress) if progress is not None else True)
    todo = [r for r in plan.runs if r.action is not RunAction.SKIP]
    skipped = [r.spec.name for r in plan.runs if r.action is RunAction.SKIP]
    for r in plan.runs:
        if r.action is RunAction.SKIP:
            publish(r.run_dir, results, r.spec.name)
    report = lambda: write_report(plan.sweep, results, command=command, shards_dir=plan.shards_dir)  # noqa: E731
    stop = interrupt or GracefulInterrupt()
    if jobs <= 1:
        trained, failed, interrupted = _in_process(todo, results, stop, omniglot_dir, cache_dir, progress, echo, report)
    else:
        with stop:
            trained, failed, interrupted = _in_workers(todo, results, stop, jobs, omniglot_dir, cache_dir, echo,
                                                       report, plan.out)
    outputs = report()
    return Outcome(interrupted, tuple(trained), tuple(skipped), tuple(failed), tuple(outputs))


def _in_process(todo: list[RunPlan], results: Path, stop: GracefulInterrupt, omniglot_dir: Any, cache_dir: Any,
                progress: bool | None, echo: Callable[[str], None], report: Callable[[], Any]):
    from trainer.distributed import make_topology
    from trainer.evaluate_cli import evaluate_run
    from trainer.fit import fit

    trained: list[str] = []
    for r in todo:
        if stop.stop_requested:
            return trained, [], True
        start = time.time()
        if r.action is RunAction.EVALUATE:
            echo(f"evaluate: {r.spec.name} at step {r.step}")
            res = evaluate_run(r.run_dir, r.eval_dirs, step=r.step, train_dir=r.train_dir,
                               max_seqs=r.spec.trainer.training.eval_seqs,
                               batch_size=r.spec.trainer.training.eval_batch_size, omniglot_dir=omniglot_dir,
                               cache_dir=cache_dir, topo=make_topology(), echo=lambda _: None)
            done = res is not None
        else:
            _clear_stale(r)
            where = f" from step {r.step}" if r.action is RunAction.RESUME else ""
            echo(f"{r.action.value}: {r.spec.name} (x = {r.spec.x}){where} -> {r.run_dir}")
            result = fit(r.spec.trainer, r.train_dir, r.eval_dirs, r.run_dir, resume=r.action is RunAction.RESUME,
                         omniglot_dir=omniglot_dir, cache_dir=cache_dir, progress=progress, interrupt=stop)
            done = not result.interrupted
        record_provenance(results, r.spec.name, r.action.value, time.time() - start, jobs=1, cpus=None)
        publish(r.run_dir, results, r.spec.name)
        if not done:
            return trained, [], True
        trained.append(r.spec.name)
        report()
    return trained, [], False


def _clear_stale(r: RunPlan) -> None:
    if r.action is RunAction.TRAIN:  # a run of this config that never saved a checkpoint: start afresh
        for stale in ("config.json", "metrics.jsonl"):
            (r.run_dir / stale).unlink(missing_ok=True)


def cpu_groups(jobs: int, cpus: list[int] | None = None) -> list[list[int]]:
    """Split the CPUs this process may use into `jobs` groups (as evenly as possible; jobs <= CPUs)."""
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if jobs > len(cpus):
        raise SweepError(f"--jobs {jobs} exceeds the {len(cpus)} CPU cores available; use --jobs {len(cpus)} or fewer")
    return [cpus[i::jobs] for i in range(jobs)]


def _in_workers(todo: list[RunPlan], results: Path, stop: GracefulInterrupt, jobs: int, omniglot_dir: Any,
                cache_dir: Any, echo: Callable[[str], None], report: Callable[[], Any], out: Path):
    groups = cpu_groups(jobs)
    free = list(range(jobs))
    queue = list(todo)
    running: dict[int, tuple[subprocess.Popen, RunPlan, float, Path]] = {}
    trained: list[str] = []
    failed: list[str] = []
    forwarded = False
    while queue or running:
        if stop.stop_requested and not forwarded:
            for proc, *_ in running.values():
                proc.send_signal(signal.SIGINT)  # workers run in their own session: this is their only one
            forwarded = True
        while queue and free and not stop.stop_requested:
            r = queue.pop(0)
            slot = free.pop(0)
            _clear_stale(r)
            log = out / "logs" / f"{r.spec.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            order = {"action": r.action.value, "step": r.step, "trainer": r.spec.trainer.to_dict(),
                     "train": str(r.train_dir), "evals": [str(e) for e in r.eval_dirs], "run_dir": str(r.run_dir),
                     "omniglot_dir": None if omniglot_dir is None else str(omniglot_dir),
                     "cache_dir": str(cache_dir), "cpus": groups[slot], "parent": os.getpid()}
            with log.open("ab") as f:
                proc = subprocess.Popen([sys.executable, "-m", "trainer.sweep.worker", json.dumps(order)],
                                        stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            where = f" from step {r.step}" if r.action is RunAction.RESUME else ""
            echo(f"{r.action.value}: {r.spec.name} (x = {r.spec.x}){where} -> {r.run_dir} "
                 f"[cpus {','.join(map(str, groups[slot]))}; log {log}]")
            running[slot] = (proc, r, time.time(), log)
        time.sleep(0.2)
        for slot, (proc, r, start, log) in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[slot]
            free.append(slot)
            record_provenance(results, r.spec.name, r.action.value, time.time() - start, jobs=jobs,
                              cpus=groups[slot])
            publish(r.run_dir, results, r.spec.name)
            if code == 0:
                trained.append(r.spec.name)
                echo(f"finished: {r.spec.name} ({(time.time() - start) / 60:.1f} min)")
                report()
            elif code == 130:
                echo(f"stopped: {r.spec.name} (checkpoint saved)")
            else:
                failed.append(r.spec.name)
                echo(f"failed: {r.spec.name} (exit {code}): {_last_line(log)}; see {log}")
    return trained, failed, stop.stop_requested


def _last_line(log: Path) -> str:
    try:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no output"
