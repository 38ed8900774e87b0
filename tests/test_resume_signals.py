"""Real signals at several moments of `trainer fit` / `trainer evaluate`, run as `python -m trainer` (so
through the huge-pages re-execution): exit 130, one line on stderr, no traceback, a loadable checkpoint
when training had begun, and a --resume that redoes the evaluation the interrupt cut short.

Few processes (each JAX start costs seconds): two early interrupts, one during the final evaluation, its
resume, one during `trainer evaluate`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqgen.config import SeqType
from tests.trainkit import symbolic_set
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.state import state_skeleton

REPO = Path(__file__).resolve().parents[1]
TOML = """
[trainer.model]
example_encoding = "embedding"
emb_dim = 16
num_layers = 1
num_heads = 2
[trainer.training]
steps = 10
batch_size = 8
log_every = 10
eval_every = 10
checkpoint_every = 10
eval_seqs = 16384
eval_batch_size = 4
steps_per_dispatch = 5
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    train = symbolic_set(root, SeqType.BURSTY, 256)
    # a long evaluation (4096 batches of 4) so that a signal sent as it starts lands inside it
    icl = symbolic_set(root, SeqType.FEWSHOT_HOLDOUT, 16384, seed=1)
    cfg = root / "tiny.toml"
    cfg.write_text(TOML)
    return root, train, icl, cfg


def _start(*args: str) -> tuple[subprocess.Popen, Path]:
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"trainer-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=out, stderr=err, env=env, cwd=REPO)
    out.close(), err.close()
    return proc, log


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> tuple[int, str, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    out, err = Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()
    Path(f"{log}.out").unlink(), Path(f"{log}.err").unlink()
    return rc, out, err


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240, poll: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _interrupted_cleanly(rc: int, out: str, err: str) -> None:
    lines = [l for l in err.splitlines() if l.strip()]
    assert rc == 130, (rc, out, err)
    assert len(lines) == 1, err
    assert "Traceback" not in out + err and "Aborted" not in out + err, out + err


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def _assert_loadable(run: Path) -> None:
    step = checkpoint.latest_step(run)
    if step is None:
        return
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text())["trainer"])
    checkpoint.load(run, step, state_skeleton(cfg, json.loads((run / "config.json").read_text())["data"]["num_labels"]))


@pytest.mark.parametrize("moment, sig", [("at-start", signal.SIGINT), ("after-setup", signal.SIGTERM)])
def test_early_interrupt_exits_130_with_one_line(setup, tmp_path, moment, sig):
    """At 0.3 s (interpreter start, re-execution, imports) and as soon as the run directory is written
    (restoring / compiling / first steps): never a traceback, `Aborted!` or a run that goes on."""
    root, train, _, cfg = setup
    run = tmp_path / "run"
    proc, log = _start("fit", "--train", str(train), "--run-dir", str(run), "--config", str(cfg),
                       "--steps", "400", "--no-progress")
    if moment == "at-start":
        time.sleep(0.3)
    else:
        assert _wait_for(lambda: (run / "config.json").exists(), proc), "fit ended before writing its run"
    proc.send_signal(sig)
    rc, out, err = _finish(proc, log)
    _interrupted_cleanly(rc, out, err)
    assert "done" not in out
    _assert_loadable(run)
    if checkpoint.latest_step(run) is not None:
        assert "checkpoint saved" in out


def test_interrupted_final_evaluation_is_redone_by_resume(setup, tmp_path):
    root, train, icl, cfg = setup
    run = tmp_path / "run"
    args = ["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run), "--config", str(cfg),
            "--no-progress"]
    proc, log = _start(*args)
    # the train record of step 10 is written just before the (final) evaluation of step 10 starts
    assert _wait_for(lambda: any(r.get("kind") == "train" for r in _records(run)), proc), "no training record"
    proc.send_signal(signal.SIGINT)
    rc, out, err = _finish(proc, log)
    _interrupted_cleanly(rc, out, err)
    assert "SIGINT: saving a checkpoint" in err and "checkpoint saved at step 10" in out
    assert checkpoint.latest_step(run) == 10
    _assert_loadable(run)
    assert not [r for r in _records(run) if r["kind"] == "eval"]  # the evaluation was lost...
    rc, out, err = _finish(*_start(*args, "--resume"))
    assert rc == 0 and "done: 10 steps" in out, (out, err)
    evals = [r for r in _records(run) if r["kind"] == "eval"]
    assert [(r["step"], r["set"]) for r in evals] == [(10, icl.name)]  # ...and resume did it, once
    assert evals[0]["metrics"]["accuracy_closed"]["n"] == 16384

    # `trainer evaluate` interrupted: 130, one line, no claim of a saved checkpoint, nothing written
    proc, log = _start("evaluate", str(icl), "--run-dir", str(run), "--batch-size", "4")

    def reading_eval_set() -> bool:  # its shards are open: the evaluation is about to start or running
        try:
            return any(str(icl) in os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd"))
        except OSError:
            return False

    _wait_for(reading_eval_set, proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    rc, out, err = _finish(proc, log)
    _interrupted_cleanly(rc, out, err)
    assert "checkpoint" not in out + err
    assert not (run / "evaluations").exists()
