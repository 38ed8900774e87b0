"""One process of a real multi-process (or simulated multi-device) job, for tests/test_multiprocess.py.

    python -m tests.multiprocess_worker JOB.json PROCESS_ID

JOB.json: {"num_processes": P, "port": PORT, "out": DIR, "trace_root": DIR, "tasks": [...]}. With P > 1
the process joins a `jax.distributed` job on 127.0.0.1:PORT (CPU, gloo collectives). It runs the tasks in
order and writes DIR/result-PROCESS_ID.json: per task its outcome (and the global rows of every training
batch this process read), and a trace of every file it opened, created, renamed or removed under
`trace_root`, in order, interleaved with the moments it passed `trainer.runtime.multihost.agree` (the barrier).

Tasks:
  {"kind": "fit", "run": RUN, "train": DIR, "eval": [DIR], "steps": N, "resume": bool,
   "per_process": {"P": {"train": DIR, "seed": S}}}   (a fit; a known error is recorded, not raised;
                                                        its stop agreements, `any_process`, are counted)
  {"kind": "evaluate", "run": RUN, "eval": [DIR], "step": K, "max_seqs": M, "batch_size": B}
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import sys
from pathlib import Path


def main(job_path: str, pid: int) -> None:
    job = json.loads(Path(job_path).read_text())
    import jax

    if job["num_processes"] > 1:
        from trainer.runtime.distributed import initialize

        initialize(True, f"127.0.0.1:{job['port']}", job["num_processes"], pid, init_timeout=60, heartbeat_timeout=20)
    trace: list[list] = []
    _install_trace(Path(job["trace_root"]), trace)
    results = [_run_task(t, pid, trace) for t in job["tasks"]]
    record = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
              "tasks": results, "trace": trace}
    # written outside trace_root with the real `open` (the trace is already taken)
    with _REAL_OPEN(Path(job["out"]) / f"result-{pid}.json", "w") as f:
        f.write(json.dumps(record))


_REAL_OPEN = builtins.open


def _install_trace(root: Path, trace: list) -> None:
    """Record file accesses under `root` (Python-level: open, mkdir, replace, rename, unlink, rmtree)."""
    root = root.resolve()

    def under(p) -> str | None:
        try:
            q = Path(os.fsdecode(p)).resolve()
        except (TypeError, ValueError):
            return None
        return str(q) if q == root or root in q.parents else None

    def wrap_open(real):
        def opener(file, mode="r", *a, **k):
            where = under(file) if isinstance(file, (str, bytes, os.PathLike)) else None
            if where:
                trace.append(["write" if any(c in mode for c in "wax+") else "read", where])
            return real(file, mode, *a, **k)
        return opener

    def wrap(name, real, kind):
        def fn(*a, **k):
            where = under(a[0]) if a else None
            if where:
                trace.append([kind, where])
            return real(*a, **k)
        return fn

    builtins.open = io.open = wrap_open(io.open)
    os.mkdir = wrap("mkdir", os.mkdir, "mkdir")  # a folder: nothing anyone could read half-written
    os.replace = wrap("replace", os.replace, "write")
    os.rename = wrap("rename", os.rename, "write")
    os.unlink = wrap("unlink", os.unlink, "write")
    shutil.rmtree = wrap("rmtree", shutil.rmtree, "write")

    import trainer.engine
    import trainer.evaluate
    import trainer.runtime.multihost

    real_agree = trainer.runtime.multihost.agree

    def agree(*a, **k):
        trace.append(["agree", ""])
        return real_agree(*a, **k)

    trainer.engine.agree = trainer.evaluate.agree = agree  # where fit (through the engine) and evaluate call it


def _run_task(task: dict, pid: int, trace: list) -> dict:
    from dataclasses import replace

    from tests.trainkit import tiny_config
    from seqgen.errors import UserError
    from trainer.runtime.distributed import make_topology

    topo = make_topology()
    mine = task.get("per_process", {}).get(str(pid), {})
    cfg = tiny_config(steps=task.get("steps", 8), batch_size=8, log_every=2, eval_every=4, checkpoint_every=4,
                      eval_seqs=40, eval_batch_size=16, steps_per_dispatch=2)
    if "seed" in mine:
        cfg = replace(cfg, training=replace(cfg.training, seed=mine["seed"]))
    trace.append(["task", task["kind"]])
    try:
        if task["kind"] == "fit":
            return {"ok": True, **_fit(cfg, mine.get("train", task["train"]), task["eval"], task["run"],
                                       task.get("resume", False), topo)}
        from trainer.evaluate import evaluate_run

        results = evaluate_run(task["run"], task["eval"], step=task["step"], train_dir=None,
                               max_seqs=task["max_seqs"], batch_size=task["batch_size"], omniglot_dir=None,
                               cache_dir=None, topo=topo, echo=lambda s: None)
        return {"ok": True, "results": results}
    except UserError as e:
        return {"ok": False, "error": str(e), "type": type(e).__name__}


def _fit(cfg, train, evals, run, resume, topo) -> dict:
    import numpy as np

    import trainer.fit
    from trainer.fit import fit
    from trainer.runtime.multihost import train_stream as real

    rows: list[list[int]] = []
    agreements = []  # the training loop's stop agreements (its one collective between boundaries' own work)
    real_any = trainer.fit.any_process

    def counting(topo_, flag):
        agreements.append(bool(flag))
        return real_any(topo_, flag)

    def recording(train_set, topo_, batch_size, start_step):
        stream = real(train_set, topo_, batch_size, start_step)

        class Recording(type(stream)):
            def __next__(self):
                b = super().__next__()
                rows.append(np.asarray(b["row"]).tolist())
                return b

        stream.__class__ = Recording
        return stream

    trainer.fit.train_stream, trainer.fit.any_process = recording, counting
    try:
        result = fit(cfg, train, evals, run, resume=resume, topo=topo, progress=False)
    finally:
        trainer.fit.train_stream, trainer.fit.any_process = real, real_any
    return {"step": result.step, "rows": rows, "stop_agreements": len(agreements)}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import trainer.runtime.multihost  # noqa: F401  (before the trace is installed)

    main(sys.argv[1], int(sys.argv[2]))
