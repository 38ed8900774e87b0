"""`trainer sweep --executor slurm | local` (trainer.sweep.cluster, trainer.sweep.job) on the tiny symbolic sweep
of test_sweep.py:

- submitit's local executor trains the same metrics, record for record, as `--executor here`;
- a resubmission skips a finished run and resumes a partial one; with --no-wait the jobs publish their
  runs themselves and `--report-only` writes the report afterwards;
- a job told of preemption (SIGUSR2, as Slurm sends it) stops its worker with a checkpoint and is requeued,
  and the requeued job resumes;
- `--executor slurm` up to `sbatch` (a stand-in that records the script), then the array's tasks run as
  Slurm would run them (the script itself, with Slurm's variables and a stand-in `srun`);
- `--dry-run` lists the jobs; without submitit, or with a job option and no cluster executor: one line.

Not covered: a real Slurm (queueing, sacct, `scontrol requeue`); waiting on Slurm jobs (it asks sacct).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from trainer.checkpoint import latest_step
from trainer.cli import main
from trainer.sweep import load_sweep, make_plan
from trainer.sweep.execute import execute

from tests.procs import children, cmdline, kill_all, still_alive_after
from tests.test_sweep import BASE, SWEEP, StopAfterCheckpoint, _tree, _write

LONGER = BASE.replace("steps = 6", "steps = 60").replace("eval_every = 3", "eval_every = 30")  # stopped mid-run


def _records(run_dir: Path) -> list[tuple]:
    """What a run trained and measured (wall times left out)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("set"), r["metrics"]) for r in rows if r["kind"] in ("train", "eval")]


def _wait_for(ready: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not ready():
        assert time.time() < end, f"gave up waiting for {what}"
        time.sleep(0.5)


def _sweep(*args: str):
    return CliRunner().invoke(main, ["sweep", *args, "--no-progress"])


@pytest.fixture(autouse=True)
def no_job_outlives_its_test():
    """A job submitted with --no-wait finishes on its own after it publishes; wait for it (then kill what is
    left), so that no job process of one test runs on into the next or past the suite."""
    yield
    jobs = [p for p in children(os.getpid()) if "submitit" in cmdline(p)]
    kill_all(still_alive_after(jobs, 60))


@pytest.fixture(scope="module")
def here(tmp_path_factory):
    """The sweep run by `--executor here` (in this process): the reference, and its built shard sets."""
    root = tmp_path_factory.mktemp("here")
    path = _write(root / "cfg")
    res = _sweep(str(path), "--out", str(root / "out"), "--shards-dir", str(root / "shards"), "--jobs", "1")
    assert res.exit_code == 0, res.output
    return {"path": path, "out": root / "out", "shards": root / "shards"}


def test_local_executor_trains_what_here_trains(here, tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "out"
    res = _sweep(str(here["path"]), "--out", str(out), "--shards-dir", str(here["shards"]), "--executor", "local",
                 "--time", "20")
    assert res.exit_code == 0, res.output
    assert res.output.count("submitted: job ") == 2 and "finished: p0 (job " in res.output
    assert "done: 2 runs trained, 0 already finished" in res.output
    for name in ("p0", "p1"):
        assert _records(out / "runs" / name) == _records(here["out"] / "runs" / name)
        assert (out / "logs" / f"{name}.log").read_text().startswith("job: pid ")
        seg = json.loads((out / "runs" / name / "provenance.json").read_text())["segments"]
        assert [s["action"] for s in seg] == ["train"]
    assert (out / "results.csv").is_file() and (out / "figure.png").is_file()


def test_resubmission_skips_finished_runs_and_resumes_partial_ones(here, tmp_path):
    """p1 finished (copied), p0 stopped at step 3: one job, which resumes p0; submitted with --no-wait, the
    job publishes p0 itself and --report-only writes the report."""
    pytest.importorskip("submitit")
    out, results = tmp_path / "out", tmp_path / "results"
    plan = make_plan(load_sweep(here["path"]), out=out, shards_dir=here["shards"], only=["p0"])
    execute(plan, command="t", progress=False, interrupt=StopAfterCheckpoint(out / "runs" / "p0", 3),
            echo=lambda _: None)
    assert latest_step(out / "runs" / "p0") == 3
    shutil.copytree(here["out"] / "runs" / "p1", out / "runs" / "p1")
    args = [str(here["path"]), "--out", str(out), "--results", str(results), "--shards-dir", str(here["shards"]),
            "--executor", "local", "--time", "20"]
    dry = _sweep(*args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "1 job on local (0 GPUs, 20 min each)" in dry.output
    assert "  job  1   resume    p0 from step 3" in dry.output and "run  skip" in dry.output
    res = _sweep(*args, "--no-wait")
    assert res.exit_code == 0, res.output
    assert "submitted: job " in res.output and "resume p0" in res.output
    assert res.output.splitlines()[-1].startswith("submitted 1 jobs (") and "--report-only" in res.output
    provenance = results / "runs" / "p0" / "provenance.json"
    _wait_for(provenance.is_file, 600, "the job to publish p0")
    assert latest_step(out / "runs" / "p0") == 6
    assert [r[1] for r in _records(out / "runs" / "p0") if r[0] == "train"] == [3, 6]  # resumed, nothing redone
    assert _records(out / "runs" / "p0") == _records(here["out"] / "runs" / "p0")
    assert json.loads(provenance.read_text())["segments"][-1]["action"] == "resume"
    report = CliRunner().invoke(main, ["sweep", *args[:7], "--report-only"])
    assert report.exit_code == 0, report.output
    with (results / "results.csv").open() as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["p0", "p1"]
    assert "done" in (results / "results.md").read_text()


def test_a_preempted_job_saves_and_is_requeued_then_resumes(tmp_path, here):
    """SIGUSR2 to the job (Slurm's notice, which submitit's local executor passes on as well): the job stops
    its worker, which saves a checkpoint; submitit requeues the job, whose second start resumes the run."""
    pytest.importorskip("submitit")
    path = _write(tmp_path / "cfg", SWEEP, LONGER)
    out = tmp_path / "out"
    res = _sweep(str(path), "--out", str(out), "--shards-dir", str(here["shards"]), "--only", "p0",
                 "--executor", "local", "--time", "20", "--no-wait")
    assert res.exit_code == 0, res.output
    run, log = out / "runs" / "p0", out / "logs" / "p0.log"
    _wait_for(lambda: (latest_step(run) or 0) >= 3, 600, "a first checkpoint")
    pid = int(log.read_text().split("job: pid ")[1].split(",")[0])
    os.kill(pid, signal.SIGUSR2)
    _wait_for(lambda: log.read_text().count("job: pid ") == 2, 300, "the requeued job")
    stopped_at = latest_step(run)
    assert stopped_at is not None and 3 <= stopped_at < 60
    assert f"job: pid {pid}, train: p0" in log.read_text()
    assert log.read_text().split("job: pid ")[2].split("\n")[0].endswith("resume: p0")
    provenance = out / "runs" / "p0" / "provenance.json"
    _wait_for(lambda: provenance.is_file() and len(json.loads(provenance.read_text())["segments"]) == 2, 600,
              "the requeued job to finish")
    assert latest_step(run) == 60
    steps = [r[1] for r in _records(run) if r[0] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # each logged once: resumed, not restarted


def test_slurm_submits_an_array_whose_tasks_train_as_slurm_runs_them(here, tmp_path, monkeypatch):
    """A stand-in `sbatch` takes the array; its script then runs once per task with Slurm's variables, its
    `srun` a stand-in that runs the command; the runs equal --executor here's."""
    pytest.importorskip("submitit")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text('#!/bin/bash\necho "Submitted batch job 4242"\n')
    (bin_ / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do\n'
                               '  case "$1" in --output|--error) shift 2;; *) shift;; esac\ndone\nexec "$@"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "out"
    args = [str(here["path"]), "--out", str(out), "--shards-dir", str(here["shards"]), "--executor", "slurm"]
    res = _sweep(*args, "--partition", "gpu", "--time", "30", "--cpus-per-job", "2", "--mem", "4",
                 "--slurm-arg", "account=abc", "--jobs", "1", "--no-wait")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1].startswith("submitted 2 jobs (4242_0, 4242_1)")
    script = (out / "submitit" / "4242_submission.sh").read_text()
    for line in ("--partition=gpu", "--time=30", "--cpus-per-task=2", "--mem=4GB", "--account=abc", "--array=0-1%1",
                 "--signal=USR2@90", "--job-name=sweep-sweep"):
        assert f"#SBATCH {line}\n" in script, script
    tasks = [subprocess.Popen(["bash", "-c", script], env=dict(
        os.environ, SLURM_JOB_ID=str(4243 + i), SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID=str(i), SLURM_NTASKS="1",
        SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
        SLURM_JOB_NODELIST="localhost"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (0, 1)]
    outputs = [t.communicate(timeout=600)[0] for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], [o[-2000:] for o in outputs]
    for name in ("p0", "p1"):
        assert _records(out / "runs" / name) == _records(here["out"] / "runs" / name)
    report = CliRunner().invoke(main, ["sweep", *args[:5], "--report-only"])
    assert report.exit_code == 0 and (out / "results.csv").is_file(), report.output
    again = _sweep(*args, "--no-wait")  # resubmitted when every run is finished: nothing to submit
    assert again.exit_code == 0 and "submitted" not in again.output and "2 already finished" in again.output


def test_dry_run_lists_jobs_and_changes_nothing(here, tmp_path):
    groupable = _write(tmp_path / "cfg", SWEEP.replace("[runs.trainer.optimizer]\nmax_lr = 1e-3\n", ""))
    before = _tree(here["shards"])
    res = _sweep(str(groupable), "--out", str(tmp_path / "out"), "--shards-dir", str(here["shards"]), "--executor",
                 "slurm", "--dry-run", "--group", "2", "--partition", "gpu", "--gpus-per-job", "1", "--cpus-per-job",
                 "4", "--mem", "8", "--time", "30", "--slurm-arg", "account=abc")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "1 job on slurm (partition gpu, 1 GPU, 4 CPUs, 8 GB, 30 min, account=abc each)" in lines
    assert "  job  1   train     p0, p1 (one vectorized group)" in lines
    unbuilt = _sweep(str(groupable), "--out", str(tmp_path / "out"), "--shards-dir", str(tmp_path / "none"),
                     "--executor", "local", "--dry-run", "--group", "2")
    assert unbuilt.exit_code == 0, unbuilt.output
    assert "2 jobs on local (0 GPUs, 60 min each)" in unbuilt.output and "shown one per job" in unbuilt.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg"] and _tree(here["shards"]) == before


def test_without_submitit_the_cluster_executors_refuse_in_one_line(here, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    res = _sweep(str(here["path"]), "--out", str(tmp_path / "out"), "--shards-dir", str(tmp_path / "shards"),
                 "--executor", "slurm")
    assert res.exit_code == 2, res.output
    assert res.output.splitlines()[-1] == ('error: --executor slurm needs submitit; install it with '
                                           'pip install -e ".[slurm]"')
    assert "Traceback" not in res.output and not (tmp_path / "shards").exists()  # refused before any build


@pytest.mark.parametrize("extra, needle", [
    (["--partition", "gpu"], "--partition is an option of cluster jobs; add --executor slurm"),
    (["--no-wait"], "--no-wait is an option of cluster jobs"),
    (["--executor", "slurm", "--slurm-arg", "account"], "--slurm-arg account: expected KEY=VALUE"),
    (["--executor", "local", "--jobs", "2"], "the local executor starts every job at once"),
    (["--executor", "batch"], "Invalid value for '--executor'"),
])
def test_job_options_are_checked_in_one_line(here, tmp_path, extra, needle):
    res = CliRunner().invoke(main, ["sweep", str(here["path"]), "--out", str(tmp_path / "o"), "--dry-run", *extra])
    assert res.exit_code == 2 and res.output.count("\n") <= 2 and needle in res.output, res.output
    assert "Traceback" not in res.output
