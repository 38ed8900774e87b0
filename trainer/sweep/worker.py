"""One run of `trainer sweep --jobs N`, in its own process: `python -m trainer.sweep.worker ORDER_JSON`.

The order (written by `trainer.sweep.execute`) names the action (train / resume / evaluate), the run's
TrainConfig, its shard sets and run directory, and the CPU cores this worker may use. The worker pins
itself to those cores before JAX starts (XLA sizes its thread pools from the process's CPU affinity), asks
the kernel to send it SIGTERM should the sweep process die (so no orphan trains on), and exits 0 when the
run finished, 130 when it was interrupted (after saving a checkpoint) and 2 with one line on a known error.
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
    from trainer.hugepages import reexec_with_hugepages
    from trainer.signals import GracefulInterrupt

    reexec_with_hugepages()
    order = json.loads(argv[0])
    _die_with_parent(order["parent"])
    if order.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, order["cpus"])
    print(f"worker: cpus {sorted(os.sched_getaffinity(0))}", flush=True)
    with GracefulInterrupt() as stop:  # before the heavy imports: a stop at any moment is one flag
        return _run(order, stop)


def _run(order: dict, stop) -> int:
    from trainer.config import TrainConfig
    from trainer.errors import fail, known_errors

    cfg = TrainConfig.from_dict(order["trainer"])
    try:
        if stop.stop_requested:
            return 130
        if order["action"] == "evaluate":
            from trainer.distributed import make_topology
            from trainer.evaluate_cli import evaluate_run

            res = evaluate_run(order["run_dir"], order["evals"], step=order["step"], train_dir=order["train"],
                               max_seqs=cfg.training.eval_seqs, batch_size=cfg.training.eval_batch_size,
                               omniglot_dir=order["omniglot_dir"], cache_dir=order["cache_dir"],
                               topo=make_topology(), echo=print)
            return 0 if res is not None else 130
        from trainer.fit import fit

        if stop.stop_requested:
            return 130
        result = fit(cfg, order["train"], order["evals"], order["run_dir"], resume=order["action"] == "resume",
                     omniglot_dir=order["omniglot_dir"], cache_dir=order["cache_dir"], progress=False,
                     interrupt=stop)
        return 130 if result.interrupted else 0
    except known_errors() as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.strerror or e}" + (f" ({e.filename})" if getattr(e, "filename", None) else ""))
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
