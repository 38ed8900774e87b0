"""Real multi-process training: two JAX processes on 127.0.0.1 (`jax.distributed`, CPU, gloo collectives).

Compared runs of the same tiny symbolic config (batch 8, 8 steps, 2 steps per call, evaluation and
checkpoint every 4 steps): 1 process x 1 device (in this process), 1 process x 2 simulated devices, and
2 processes x 1 device. Tolerance ("float reassociation"): training losses rtol 1e-5; parameters as in
tests/test_multidevice.py (>= 99.5 % of entries within rtol 1e-4 / atol 1e-5, all within atol 1e-3);
evaluation means atol 1e-5 with identical sequence counts. The global batch rows must be identical.

Launches are few (each JAX process start + compile costs seconds): one 2-process job runs the mismatch
refusals, a fresh fit, a resume of a 1-process checkpoint and an evaluation (tests/multiprocess_worker.py);
examples/slurm/fit_2nodes.sbatch, run twice as two local tasks (tests/fake_srun.sh), tests SIGTERM to one
process and the death of one process through the command line. Every launch has a wall-clock bound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.trainkit import paper_like_sets, symbolic_set, tiny_config
from seqgen.config import SeqType
from trainer import checkpoint
from trainer.runtime.distributed import make_topology
from trainer.run import RunDir
from trainer.state import state_skeleton

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # seconds: bound of every launch (a hang fails the test instead of blocking CI)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def launch_workers(root: Path, name: str, tasks: list, processes: int, devices: int = 1) -> list[dict]:
    """Run the worker job `tasks` in `processes` concurrent processes; return their result records."""
    out = root / f"job-{name}"
    out.mkdir()
    job = {"num_processes": processes, "port": free_port(), "out": str(out), "trace_root": str(root / "runs"),
           "tasks": tasks}
    (out / "job.json").write_text(json.dumps(job))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(out / "job.json"), str(p)],
                              env=_env(devices), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in range(processes)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (_, err) in zip(procs, logs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads((out / f"result-{p}.json").read_text()) for p in range(processes)]


def _params(run, step):
    state = checkpoint.load(run, step, state_skeleton(_cfg(), 40))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state.model) if np.asarray(x).dtype.kind == "f"]


def _same_training(a, b):
    close = sum(int(np.isclose(x, y, rtol=1e-4, atol=1e-5).sum()) for x, y in zip(a, b))
    total = sum(x.size for x in a)
    return close >= 0.995 * total and all(np.allclose(x, y, rtol=0, atol=1e-3) for x, y in zip(a, b))


def _records(run, kind):
    return [r for r in RunDir(run).read_metrics() if r["kind"] == kind]


def _losses(run):
    return [r["metrics"]["loss"] for r in _records(run, "train")]


def _cfg(steps=8):
    # the worker's config (tests/multiprocess_worker.py builds the same)
    return tiny_config(steps=steps, batch_size=8, log_every=2, eval_every=4, checkpoint_every=4, eval_seqs=40,
                       eval_batch_size=16, steps_per_dispatch=2)


def _fit_here(train, evals, run, resume=False, steps=8):
    """1 process x 1 device, in this process, recording the rows of every batch."""
    import trainer.fit
    from trainer.fit import fit
    from trainer.runtime.multihost import train_stream

    rows = []

    def recording(*a):
        s = train_stream(*a)
        real_next = type(s).__next__

        class Recording(type(s)):
            def __next__(self):
                b = real_next(self)
                rows.append(b["row"].tolist())
                return b

        s.__class__ = Recording
        return s

    trainer.fit.train_stream = recording
    try:
        fit(_cfg(steps), train, evals, run, resume=resume, topo=make_topology(), progress=False)
    finally:
        trainer.fit.train_stream = train_stream
    return rows


def _cut(src: Path, dst: Path, keep: int) -> Path:
    """A copy of run `src` whose latest checkpoint is step `keep` (as if interrupted there)."""
    shutil.copytree(src, dst)
    for s in checkpoint.list_steps(dst):
        if s > keep:
            shutil.rmtree(dst / "checkpoints" / f"step-{s}")
    return dst


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    runs = root / "runs"
    runs.mkdir()
    train, icl, iwl = paper_like_sets(root / "shards", train_seqs=512)
    other = symbolic_set(root / "shards", SeqType.BURSTY, 512, seed=5)
    evals = [str(icl)]  # one set: each set compiles its own evaluation step
    one_rows = _fit_here(train, evals, runs / "one")
    _cut(runs / "one", runs / "one-cut", 4)
    shutil.copytree(runs / "one", runs / "one-eval")
    tasks = [
        {"kind": "fit", "run": str(runs / "bad-config"), "train": str(train), "eval": evals,
         "per_process": {"1": {"seed": 1}}},
        {"kind": "fit", "run": str(runs / "bad-set"), "train": str(train), "eval": evals,
         "per_process": {"1": {"train": str(other)}}},
        {"kind": "fit", "run": str(runs / "two-proc"), "train": str(train), "eval": evals},
        {"kind": "fit", "run": str(runs / "one-cut"), "train": str(train), "eval": evals, "resume": True},
        {"kind": "evaluate", "run": str(runs / "one-eval"), "eval": evals, "step": 8, "max_seqs": 40,
         "batch_size": 16},
    ]
    # 1 process x 2 simulated devices: the same fresh fit (concurrently would oversubscribe 2 cores; run after)
    two_proc = launch_workers(root, "two-proc", tasks, processes=2)
    two_dev = launch_workers(root, "two-dev", [dict(tasks[2], run=str(runs / "two-dev"))], processes=1, devices=2)
    return {"root": root, "runs": runs, "train": train, "evals": evals, "one_rows": one_rows,
            "two_proc": two_proc, "two_dev": two_dev[0]}


def test_two_processes_train_the_same_batches_losses_and_parameters(job):
    runs = job["runs"]
    p0, p1 = (r["tasks"][2] for r in job["two_proc"])
    assert job["two_proc"][0]["processes"] == 2 and job["two_proc"][0]["devices"] == 2
    assert job["two_dev"]["processes"] == 1 and job["two_dev"]["devices"] == 2
    assert p0["ok"] and p1["ok"] and p0["step"] == p1["step"] == 8
    # each process reads half of every global batch; together, in process order, exactly the 1-process rows
    one = job["one_rows"]
    assert len(one) == 8 and all(len(r) == 8 for r in one)
    assert [a + b for a, b in zip(p0["rows"], p1["rows"])] == one
    assert all(len(r) == 4 for r in p0["rows"] + p1["rows"])
    assert job["two_dev"]["tasks"][0]["rows"] == one
    assert one[1] == list(range(8, 16))  # batch k is rows [8k, 8k + 8)
    for other in ("two-proc", "two-dev"):
        assert len(_losses(runs / other)) == len(_losses(runs / "one")) == 4
        np.testing.assert_allclose(_losses(runs / other), _losses(runs / "one"), rtol=1e-5)
        assert _same_training(_params(runs / other, 8), _params(runs / "one", 8))
    assert not _same_training(_params(runs / "one", 4), _params(runs / "one", 8))  # training moved them


def test_two_processes_agree_on_stopping_only_at_log_eval_and_checkpoint_boundaries(job):
    """The training loop's one collective (the stop agreement) is made at the steps that log, evaluate or
    checkpoint, not before every dispatch (tests/test_sync.py tests the loop on every schedule)."""
    from trainer.loop import stop_boundaries

    t = _cfg().training
    for r in job["two_proc"]:
        fresh, resumed = r["tasks"][2], r["tasks"][3]
        assert fresh["stop_agreements"] == len(stop_boundaries(t, 0)) == 3  # steps 2, 4, 6 (of 4 dispatches)
        assert resumed["stop_agreements"] == len(stop_boundaries(t, 4)) == 1  # step 6


def _eval_metrics(records):
    return {(r["step"], r["set"]): r["metrics"] for r in records}


def _assert_same_metrics(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name, s in a[key].items():
            assert s["n"] == b[key][name]["n"] == 40
            assert s["mean"] == pytest.approx(b[key][name]["mean"], abs=1e-5), (key, name)


def test_two_processes_evaluate_like_one(job, tmp_path):
    runs = job["runs"]
    # fit's own evaluations (steps 4 and 8, 40 sequences in padded batches of 16)
    _assert_same_metrics(_eval_metrics(_records(runs / "two-proc", "eval")), _eval_metrics(_records(runs / "one", "eval")))
    # `trainer evaluate` of the same checkpoint on 2 processes and on 1
    from trainer.evaluate import evaluate_run

    here = evaluate_run(runs / "one", job["evals"], step=8, train_dir=None, max_seqs=40, batch_size=16,
                        omniglot_dir=None, cache_dir=None, topo=make_topology(), echo=lambda s: None)
    for r in job["two_proc"]:
        there = r["tasks"][4]
        assert there["ok"]
        _assert_same_metrics({n: s for n, _, s in there["results"]}, {n: s for n, _, s in here})
    written = json.loads((runs / "one-eval" / "evaluations" / "step-8.json").read_text())
    assert [s["set"] for s in written["sets"]] == [n for n, _, _ in here]


def test_checkpoints_move_between_one_and_two_processes(job, tmp_path):
    runs = job["runs"]
    # written by 1 process at step 4, resumed by 2 processes (in the job)
    assert all(r["tasks"][3]["ok"] and r["tasks"][3]["step"] == 8 for r in job["two_proc"])
    assert _same_training(_params(runs / "one-cut", 8), _params(runs / "one", 8))
    np.testing.assert_allclose(_losses(runs / "one-cut"), _losses(runs / "one"), rtol=1e-5)
    # written by 2 processes at step 4, resumed here by 1 process
    cut = _cut(runs / "two-proc", tmp_path / "two-proc-cut", 4)
    rows = _fit_here(job["train"], job["evals"], cut, resume=True)
    assert rows == job["one_rows"][4:]
    assert _same_training(_params(cut, 8), _params(runs / "one", 8))
    np.testing.assert_allclose(_losses(cut), _losses(runs / "one"), rtol=1e-5)


def test_mismatched_processes_are_refused_with_one_line(job):
    runs = job["runs"]
    for task, what in ((0, "config"), (1, "training set")):
        for r in job["two_proc"]:
            t = r["tasks"][task]
            assert not t["ok"] and t["type"] == "TopologyError"
            assert f"process 1 was started with a different {what} than process 0" in t["error"]
            assert "\n" not in t["error"]
        assert not (runs / ("bad-config", "bad-set")[task]).exists()  # refused before anything was written


def _tasks_of(trace):
    """The trace split per task: [(kind, events)]."""
    out = []
    for ev in trace:
        if ev[0] == "task":
            out.append((ev[1], []))
        elif out:
            out[-1][1].append(ev)
    return out


def test_only_process_0_writes_and_reads_happen_before_the_barrier(job):
    p0, p1 = (_tasks_of(r["trace"]) for r in job["two_proc"])
    assert [k for k, _ in p1] == ["fit", "fit", "fit", "fit", "evaluate"]
    for kind, events in p1:
        assert not [e for e in events if e[0] in ("write", "mkdir")], kind  # process 1 writes nothing at all
    for (kind, ev0), (_, ev1) in zip(p0, p1):
        assert [e[0] for e in ev0].count("agree") == 1
        barrier = [e[0] for e in ev1].index("agree")
        # process 1 reads the run directory (resume: config.json, the checkpoint) only before the barrier,
        # process 0 writes it only after: nobody reads what the other is writing
        assert not [e for e in ev1[barrier:] if e[0] == "read" and "/runs/" in e[1]], kind
        # (before the barrier process 0 only makes the run folder for its writer lock, `.lock`: no data)
        first_write = next((i for i, e in enumerate(ev0) if e[0] == "write" and Path(e[1]).name != ".lock"), len(ev0))
        assert first_write > [e[0] for e in ev0].index("agree"), kind
    writes = {Path(e[1]).name for _, events in p0[2:3] for e in events if e[0] == "write"}
    assert {"metrics.jsonl", "state.eqx", "metadata.json"} <= writes
    # config.json through seqgen.atomic: a temporary `config.json.<host>.<pid>.tmp`, then the rename
    assert any(w.startswith("config.json.") and w.endswith(".tmp") for w in writes), writes
    resume_reads = {Path(e[1]).name for e in p1[3][1] if e[0] == "read"}
    assert {"config.json", "state.eqx", "metadata.json"} <= resume_reads


# ---- the command line, through examples/slurm/fit_2nodes.sbatch: SIGTERM to one process, the death of one ----
FIT_ARGS = ("--example-encoding embedding --emb-dim 32 --num-layers 2 --num-heads 2 --batch-size 8 --steps 100000 "
            "--log-every 2 --eval-every 100000 --checkpoint-every 100000 --steps-per-dispatch 2 --warmup-steps 10 "
            "--lr 1e-3 --init-timeout 120")


def _slurm_port() -> int:
    """A free port in JAX's Slurm range: it derives the coordinator port from SLURM_JOB_ID."""
    for port in np.random.default_rng().permutation(np.arange(65536 - 4096, 65536)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(port)))
                return int(port)
            except OSError:
                continue
    raise AssertionError("no free port")


def _sbatch_fit(run: Path, train: Path, evals: list, logs: Path, resume: bool = False) -> subprocess.Popen:
    """fit_2nodes.sbatch as Slurm would run it, with 2 local tasks (tests/fake_srun.sh) on 127.0.0.1."""
    logs.mkdir()
    env = dict(_env(), SLURM_JOB_ID=str(_slurm_port() - (65536 - 4096)), SLURM_NTASKS="2",
               SLURM_STEP_NODELIST="127.0.0.1", SLURM_NNODES="2", SRUN=str(ROOT / "tests" / "fake_srun.sh"),
               FAKE_SRUN_DIR=str(logs), TRAINER=f"{sys.executable} -m trainer", TRAIN=str(train),
               EVAL=" ".join(map(str, evals)), RUN=str(run), HEARTBEAT="10", FIT_ARGS=FIT_ARGS)
    if resume:
        env["RESUME"] = "1"
    return subprocess.Popen(["bash", str(ROOT / "examples" / "slurm" / "fit_2nodes.sbatch")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _task_pids(logs: Path, deadline: float) -> list[int]:
    while time.monotonic() < deadline:
        try:
            return [int((logs / f"pid.{i}").read_text()) for i in (0, 1)]
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
    raise AssertionError("the tasks did not start")


def _wait_for_training(run: Path, after: int, job: subprocess.Popen, logs: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        steps = [r["step"] for r in _records(run, "train")] if (run / "metrics.jsonl").is_file() else []
        if steps and steps[-1] > after:
            return
        assert job.poll() is None, [(logs / f"err.{i}").read_text()[-2000:] for i in (0, 1)]
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def _finish(job: subprocess.Popen, timeout: float) -> int:
    try:
        job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    return job.returncode


def _kill_tasks(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_to_one_process_stops_both_with_a_checkpoint_and_a_dead_process_ends_the_other(job, tmp_path):
    """Two tasks of the Slurm script (JAX finds the job from Slurm's variables) on 127.0.0.1."""
    train, evals = job["train"], job["evals"]
    run, logs = tmp_path / "cli", tmp_path / "logs-1"
    start = time.monotonic()
    sbatch = _sbatch_fit(run, train, evals, logs)
    pids = _task_pids(logs, start + 60)
    try:
        _wait_for_training(run, 0, sbatch, logs, start + TIMEOUT)
        os.kill(pids[1], signal.SIGTERM)  # only the non-main process: process 0 must stop too
        rc = _finish(sbatch, 120)
    finally:
        _kill_tasks(pids)
    err = [(logs / f"err.{i}").read_text() for i in (0, 1)]
    assert rc == 130, err
    assert "SIGTERM: saving a checkpoint" in err[1] and "Traceback" not in err[0] + err[1]
    step = checkpoint.latest_step(run)
    assert step is not None and step % 2 == 0 and step > 0
    outs = [(logs / f"out.{i}").read_text() for i in (0, 1)]
    assert all(f"interrupted: checkpoint saved at step {step}" in o for o in outs), outs
    assert checkpoint.read_metadata(run, step)["step"] == step
    checkpoint.load(run, step, state_skeleton(tiny_config(), 40))  # loadable
    assert max(r["step"] for r in _records(run, "train")) == step

    # resume it on 2 processes, then kill process 1 outright: process 0 must end with one line, not hang
    logs = tmp_path / "logs-2"
    sbatch = _sbatch_fit(run, train, evals, logs, resume=True)
    pids = _task_pids(logs, time.monotonic() + 60)
    try:
        _wait_for_training(run, step, sbatch, logs, time.monotonic() + TIMEOUT)
        os.kill(pids[1], signal.SIGKILL)
        rc = _finish(sbatch, 120)  # the bound: a hang raises TimeoutExpired and fails the test
    finally:
        _kill_tasks(pids)
    err = (logs / "err.0").read_text()
    assert rc == 2, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "process 0 of 2 failed" in lines[0] and "Traceback" not in err, err[-2000:]
    assert checkpoint.latest_step(run) == step  # the loadable checkpoint is still there


@pytest.mark.parametrize("args, message", [
    (["--coordinator", "127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1", "--init-timeout", "1"],
     "error: no coordinator at 127.0.0.1:{port} after 1 s"),
    (["--coordinator", "127.0.0.1:{port}", "--num-processes", "2", "--process-id", "2"],
     "error: --process-id 2 must be in [0, --num-processes 2)"),
    (["--coordinator", "127.0.0.1:{port}"], "error: --coordinator, --num-processes and --process-id go together"),
])
def test_joining_a_job_fails_with_one_line(tmp_path, args, message):
    """Checked before jax.distributed starts (JAX would abort with a stack trace after its own timeout)."""
    from click.testing import CliRunner

    from trainer.cli import main

    port = free_port()  # nobody listens there
    args = [a.format(port=port) for a in args]
    res = CliRunner().invoke(main, ["fit", "--distributed", *args, "--train", str(tmp_path), "--run-dir",
                                    str(tmp_path / "run")])
    assert res.exit_code == 2 and res.output.startswith(message.format(port=port)), res.output
    assert len(res.output.strip().splitlines()) == 1
