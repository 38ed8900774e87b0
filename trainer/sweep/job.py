"""One job of `trainer sweep --executor slurm | local`, as submitit runs it on the job's node.

A job holds one unit of work of the sweep's plan (one run, or runs that train as one vectorized group:
`trainer.sweep.execute.units_of`) and trains it the way `--jobs` does: in a `trainer.sweep.worker` process
given the worker's order, its output appended to `<out>/logs/<run name>.log`. Before it starts, the job plans
its runs again from their run directories (`trainer.sweep.plan.run_action`), since a job may start long after
it was submitted, or again after being requeued: a run finished meanwhile is left alone, one with a
checkpoint resumes. After training, it plans once more and evaluates, one worker per run, the runs whose
final evaluations must read whole sets (the second pass of `--executor here`). After each worker, whatever
its end, the job publishes its runs into the results folder with their provenance, so that `trainer sweep
FILE --report-only` can write the report without the submitting process.

Time limits and preemption: submitit asks Slurm for SIGUSR2 shortly before the end and calls `checkpoint`,
which stops the worker with SIGTERM (it saves a checkpoint and exits) and hands submitit this same job to
requeue; the requeued job then resumes its runs. The worker ignores SIGUSR2 itself (`trainer.sweep.worker`).

The job's wait loop and `checkpoint` (a signal handler in the same thread) share no lock: a helper thread
alone waits for the worker process and stores its exit status, which both only read.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from trainer.sweep.execute import clear_stale, label, last_line, order_of, publish, worker_command
from trainer.sweep.plan import RunAction, RunPlan, run_action
from trainer.sweep.provenance import record_provenance
from trainer.sweep.spec import SweepError

STOP_WAIT_S = 75  # submitit's Slurm notice comes 90 s before the end: the worker's save must fit in it


@dataclasses.dataclass(frozen=True)
class JobOrder:
    """What a job needs (pickled by submitit): its runs as planned, and where the sweep keeps things. Paths
    may be relative to `cwd`, the submitting process's directory."""

    runs: tuple[RunPlan, ...]
    results: Path
    cwd: Path
    log: Path
    omniglot_dir: str | None
    cache_dir: str


def replan(runs: tuple[RunPlan, ...]) -> list[RunPlan]:
    """The runs as they stand now (finished ones dropped), by the planner's own rules."""
    todo = []
    for r in runs:
        action, step = run_action(r.spec, r.run_dir, r.train_dir, r.eval_dirs)
        if action is not RunAction.SKIP:
            todo.append(dataclasses.replace(r, action=action, step=step))
    return todo


class SweepJob:
    """The callable submitit runs: returns the worker's exit status (0 finished, 130 stopped with its
    progress saved); a failed worker raises one line (the job ends FAILED in Slurm's accounting)."""

    def __init__(self, order: JobOrder) -> None:
        self.order = order
        self._proc: subprocess.Popen | None = None
        self._code: int | None = None

    def __getstate__(self) -> dict[str, Any]:  # what is pickled: the order, never a running process
        return {"order": self.order}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["order"])  # type: ignore[misc]

    def __call__(self) -> int:
        os.chdir(self.order.cwd)
        self.order.log.parent.mkdir(parents=True, exist_ok=True)
        todo = replan(self.order.runs)
        if not todo:
            self._note(f"job: {label(list(self.order.runs))} already finished; nothing to do")
            return 0
        train = [r for r in todo if r.action is not RunAction.EVALUATE]
        code = self._pass(train) if train else 0
        # As `--executor here` does: runs evaluated on eval_seqs sequences per set while training get their
        # final evaluations on the whole sets (plan.final_results), one run per pass.
        for r in replan(self.order.runs) if code == 0 else []:
            code = self._pass([r])
            if code != 0:
                break
        return code

    def _pass(self, unit: list[RunPlan]) -> int:
        """One worker over `unit` (train / resume as one group, or evaluate one run), then its runs published."""
        o = self.order
        for r in unit:
            clear_stale(r)
        self._note(f"job: pid {os.getpid()}, {unit[0].action.value}: {label(unit)}")
        start = time.time()
        self._proc, self._code = None, None
        try:
            self._start(order_of(unit, o.omniglot_dir, o.cache_dir, None))
            while self._code is None:
                time.sleep(0.5)
        finally:
            self.stop()
            for r in unit:
                record_provenance(o.results, r.spec.name, r.action.value, time.time() - start, jobs=1,
                                  cpus=sorted(os.sched_getaffinity(0)), group=len(unit))
                publish(r.run_dir, o.results, r.spec.name)
        if self._code not in (0, 130):
            raise SweepError(f"{label(unit)} failed (exit {self._code}): {last_line(o.log)}; see {o.log}")
        return self._code

    def checkpoint(self) -> Any:
        """submitit's hook on a time limit or preemption: stop the worker (it saves), requeue this job."""
        import submitit

        self.stop()
        return submitit.helpers.DelayedSubmission(SweepJob(self.order))

    def stop(self) -> None:
        """SIGTERM to a running worker, then wait (up to STOP_WAIT_S) for it to save and exit."""
        if self._proc is None or self._code is not None:
            return
        try:
            os.kill(self._proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + STOP_WAIT_S
        while self._code is None and time.time() < deadline:
            time.sleep(0.2)

    def _start(self, order: dict[str, Any]) -> None:
        with self.order.log.open("ab") as f:
            self._proc = subprocess.Popen(worker_command(order), stdout=f, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        threading.Thread(target=self._reap, args=(self._proc,), daemon=True).start()

    def _reap(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        self._code = 130 if code in (-signal.SIGINT, -signal.SIGTERM) else code

    def _note(self, line: str) -> None:
        print(line, flush=True)  # submitit's log of the job
        with self.order.log.open("a") as f:
            f.write(line + "\n")
