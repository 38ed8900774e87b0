"""Issue 12, run directories: checkpoints carry and check the sha256 of state.eqx, one writer per run
directory (`trainer fit`) and per evaluations/ folder (`trainer evaluate`), a full disk during a
checkpoint is one line with nothing half-written that looks complete."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from seqgen.config import SeqType
from seqgen.lock import LockError
from tests.trainkit import symbolic_set, tiny_config
from trainer import checkpoint
from trainer.cli import main as trainer_main
from trainer.fit import fit

REPO = Path(__file__).resolve().parents[1]


def _tree(n: int = 64):
    return {"w": np.arange(n, dtype=np.float32), "b": np.ones((3, 2), np.int32)}


# ---- checkpoint checksums --------------------------------------------------------------------------------
def test_a_checkpoint_records_the_sha256_of_its_state(tmp_path):
    folder = checkpoint.save(tmp_path, 4, _tree(), {})
    meta = checkpoint.read_metadata(tmp_path, 4)
    from seqgen.shards import file_sha256

    assert meta["state_sha256"] == file_sha256(folder / "state.eqx")
    loaded = checkpoint.load(tmp_path, 4, _tree())
    assert np.array_equal(loaded["w"], _tree()["w"])


@pytest.mark.parametrize("damage", ["flip", "append", "truncate"])
def test_a_damaged_state_file_is_refused(tmp_path, damage):
    folder = checkpoint.save(tmp_path, 4, _tree(), {})
    state = folder / "state.eqx"
    raw = bytearray(state.read_bytes())
    if damage == "flip":
        raw[len(raw) - 9] ^= 0x01  # inside the last array's data: deserialises fine, wrong values
    elif damage == "append":
        raw += b"\x00" * 16  # deserialisation ignores trailing bytes
    else:
        raw = raw[:-4]
    state.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="fails its sha256 check") as e:
        checkpoint.load(tmp_path, 4, _tree())
    assert "\n" not in str(e.value)


def test_a_checkpoint_without_its_checksum_is_refused(tmp_path):
    """Every checkpoint records its state's sha256; metadata without it is not trusted (one line)."""
    folder = checkpoint.save(tmp_path, 4, _tree(), {})
    meta = json.loads((folder / "metadata.json").read_text())
    del meta["state_sha256"]
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="state_sha256") as e:
        checkpoint.load(tmp_path, 4, _tree())
    assert "\n" not in str(e.value)


# ---- a full disk during a checkpoint ---------------------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 2, _tree(), {})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.eqx, "tree_serialise_leaves", full)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device") as e:
        checkpoint.save(tmp_path, 4, _tree(), {})
    assert "free disk space" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()) == ["step-2"]
    assert checkpoint.list_steps(tmp_path) == [2]


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_really_full_disk_during_a_checkpoint(small_tmpfs):
    checkpoint.save(small_tmpfs, 1, _tree(), {})
    with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoint .*free disk space"):
        checkpoint.save(small_tmpfs, 2, _tree(n=1 << 19), {})  # 2 MiB into a 1 MiB disk
    assert checkpoint.list_steps(small_tmpfs) == [1]
    assert sorted(p.name for p in checkpoint.checkpoint_dir(small_tmpfs).iterdir()) == ["step-1"]
    assert np.array_equal(checkpoint.load(small_tmpfs, 1, _tree())["w"], _tree()["w"])


def test_trainer_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    from trainer import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr("trainer.fit.fit", full)
    result = CliRunner().invoke(cli.main, ["fit", "--train", "x", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: disk full") and "--resume" in lines[0]


# ---- one writer per run directory ------------------------------------------------------------------------------
def _hold_lock(folder: Path, command: str) -> subprocess.Popen:
    code = ("import sys; from seqgen.lock import FolderLock; "
            f"l = FolderLock({str(folder)!r}, {command!r}).acquire(); print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)
    proc.stdout.close()


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("run-sets")
    return symbolic_set(root, SeqType.BURSTY, 256), symbolic_set(root, SeqType.FEWSHOT_HOLDOUT, 64, seed=1)


def test_a_second_fit_into_a_run_directory_is_refused(sets, tmp_path):
    train, icl = sets
    run = tmp_path / "run"
    holder = _hold_lock(run, "trainer fit")
    try:
        for resume in (False, True):
            with pytest.raises(LockError, match=f"pid {holder.pid}.*`trainer fit`"):
                fit(tiny_config(steps=4), train, [icl], run, resume=resume, progress=False)
        result = CliRunner().invoke(trainer_main, ["fit", "--train", str(train), "--run-dir", str(run), "--steps", "4",
                                                   "--example-encoding", "embedding", "--no-progress"])
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0] and lines[0].startswith("error: ")
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written: no config.json, no metrics
    finally:
        _release(holder)


def test_fit_then_evaluate_locks_and_releases(sets, tmp_path):
    """A real (tiny) run: fit holds and releases the run's lock; evaluate is refused while another evaluate
    holds evaluations/, and works after."""
    train, icl = sets
    run = tmp_path / "run"
    fit(tiny_config(steps=4, eval_every=4, checkpoint_every=4, log_every=2), train, [icl], run, progress=False)
    assert not (run / ".lock").exists() and checkpoint.list_steps(run) == [4]
    args = ["evaluate", str(icl), "--run-dir", str(run), "--max-seqs", "32", "--batch-size", "32"]
    holder = _hold_lock(run / "evaluations", "trainer evaluate")
    try:
        result = CliRunner().invoke(trainer_main, args)
        assert result.exit_code == 2 and f"pid {holder.pid}" in result.output, result.output
    finally:
        _release(holder)
    result = CliRunner().invoke(trainer_main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "evaluations" / "step-4.json").read_text())["sets"][0]["set"] == icl.name
    # the run's training set is the one its eval sets are checked against, even with --train OTHER
    other = symbolic_set(tmp_path, SeqType.BURSTY, 128, seed=7)
    result = CliRunner().invoke(trainer_main, args + ["--train", str(other)])
    assert result.exit_code == 2 and "not the one run" in result.output, result.output
