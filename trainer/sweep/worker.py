"""One run of `trainer sweep --jobs N`, in its own process: `python -m trainer.sweep.worker ORDER_JSON`.

The order (written by `trainer.sweep.execute`) lists the runs of one unit of work (one run, or a
vectorized group trained by `trainer.group.fit_group`): each with its action (train / resume / evaluate),
TrainConfig, shard sets and run directory; and the CPU cores this worker may use. The worker pins
itself to those cores before JAX starts (XLA sizes its thread pools from the process's CPU affinity), asks
the kernel to send it SIGTERM should the sweep process die (so no orphan trains on), and exits 0 when the
run finished, 130 when it was interrupted (after saving a checkpoint) and 2 with one line on a known error.

The same worker runs inside a cluster job (`trainer.sweep.job`), with `cpus` None (the job's allocation is
its cores). There it ignores SIGUSR2: Slurm sends that advance notice of a time limit or preemption to every
process of the job, and its default action would kill the worker unsaved; the job process receives it too,
and stops the worker with SIGTERM (a checkpoint is saved) before the job is requeued.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # pragma: no cover - no prctl
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(130)


def main(argv: list[str]) -> int:
    from trainer.runtime.hugepages import reexec_with_hugepages
    from trainer.runtime.signals import GracefulInterrupt, install_early_exit

    install_early_exit()  # an interrupt from here on (re-execution included): one line, exit 130
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # a cluster's advance notice is for the job process (above)
    reexec_with_hugepages()
    order = json.loads(argv[0])
    _die_with_parent(order["parent"])
    if order.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, order["cpus"])
    print(f"worker: cpus {sorted(os.sched_getaffinity(0))}", flush=True)
    with GracefulInterrupt() as stop:  # before the heavy imports: a stop at any moment is one flag
        return _run(order, stop)


def _run(order: dict, stop) -> int:
    from trainer.runtime.errors import sweep_errors

    return sweep_errors(_train)(order, stop)  # a known error: one line in the log, exit 2


def _train(order: dict, stop) -> int:
    from trainer.config import TrainConfig
    from trainer.sinks import Tracking

    runs = order["runs"]
    cfgs = [TrainConfig.from_dict(r["trainer"]) for r in runs]
    common = {"omniglot_dir": order["omniglot_dir"], "cache_dir": order["cache_dir"]}
    if stop.stop_requested:
        return 130
    from trainer.runtime.platform import start, start_line

    start(None, cfgs[0].compute, warn=lambda w: print(w, file=sys.stderr, flush=True))
    print(start_line(cfgs[0]), flush=True)
    first = runs[0]
    if first["action"] == "evaluate":
        from trainer.runtime.distributed import make_topology
        from trainer.evaluate import evaluate_run

        res = evaluate_run(first["run_dir"], first["evals"], step=first["step"], train_dir=first["train"],
                           max_seqs=None, batch_size=cfgs[0].training.eval_batch_size,  # whole sets: plan.final_results
                           topo=make_topology(), echo=print, interrupt=stop,
                           tracking=Tracking.from_dict(first.get("tracking")), **common)
        return 0 if res is not None else 130
    from trainer.fit import fit
    from trainer.group import fit_group

    if stop.stop_requested:
        return 130
    if len(runs) == 1:
        results = [fit(cfgs[0], first["train"], first["evals"], first["run_dir"],
                       resume=first["action"] == "resume", progress=False, interrupt=stop,
                       tracking=Tracking.from_dict(first.get("tracking")), **common)]
    else:
        results = fit_group(cfgs, [r["train"] for r in runs], [r["evals"] for r in runs],
                            [r["run_dir"] for r in runs], resume=[r["action"] == "resume" for r in runs],
                            progress=False, interrupt=stop,
                            tracking=[Tracking.from_dict(r.get("tracking")) for r in runs], **common)
    return 130 if any(r.interrupted for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
