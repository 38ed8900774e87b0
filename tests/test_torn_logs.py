"""Issue 31, item 7: append-only logs are torn-safe (`seqgen.jsonlog`, `trainer.run.RunDir`).

Each record is appended whole (one write, fsync); a cut last line is moved aside to a side file named in a
one-line notice, never erased and never glued onto; a corrupt line before the last is refused with its line
number and a command that removes it (before: silently erased by a resume); a failed append (a full disk)
leaves the log as it was (before: a cut record that the next record was glued onto)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from seqgen import jsonlog
from seqgen.config import SeqType
from seqgen.jsonlog import LogWriteError, append_line, settle_tail
from tests.trainkit import symbolic_set, tiny_config
from trainer.cli import main as trainer_main
from trainer.run import RunDir, RunError
from trainer.runlog import METRICS_LOCK

RECORDS = [{"step": 2, "kind": "train", "metrics": {"loss": 1.5}},
           {"step": 4, "kind": "train", "metrics": {"loss": 1.25}},
           {"step": 4, "kind": "eval", "set": "icl", "seq_type": "fewshot_holdout", "source": "evaluate",
            "max_seqs": 8, "metrics": {"accuracy_closed": {"mean": 0.5, "ci95": [0.4, 0.6], "n": 8}}}]


def _lines(records) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def _run_dir(tmp_path: Path, text: str) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / METRICS_LOCK).touch()  # a run directory some writer has used
    run.metrics_path.write_text(text)
    return run


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


# ---- a cut last line ---------------------------------------------------------------------------------------
def test_a_cut_last_line_is_moved_aside_not_glued_onto(tmp_path, capsys):
    """Before: the next record was appended onto the cut line, and both were lost to every reader."""
    cut = '{"kind": "train", "metrics": {"loss": 0.'
    run = _run_dir(tmp_path, _lines(RECORDS[:2]) + cut)
    run.append_metrics(RECORDS[2])
    assert list(run.read_metrics()) == RECORDS
    sides = sorted(run.path.glob("metrics.jsonl.torn-*"))
    assert len(sides) == 1 and sides[0].read_text() == cut  # never erased
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("notice: ") and sides[0].name in err[0]


def test_a_cut_last_line_is_moved_aside_when_a_run_is_read(tmp_path, capsys):
    cut = '{"step": 6, "kind": "tr'
    run = _run_dir(tmp_path, _lines(RECORDS) + cut)
    assert list(run.read_metrics()) == RECORDS
    assert run.metrics_path.read_text() == _lines(RECORDS)
    assert [p.read_text() for p in run.path.glob("metrics.jsonl.torn-*")] == [cut]
    assert "notice: " in capsys.readouterr().err


def test_a_copy_without_a_writer_lock_is_only_read(tmp_path):
    """A published copy (a sweep's results folder) is never modified by a reader: the cut line is skipped."""
    text = _lines(RECORDS) + '{"step": 6'
    run = _run_dir(tmp_path, text)
    (run.path / METRICS_LOCK).unlink()
    assert list(run.read_metrics()) == RECORDS
    assert run.metrics_path.read_text() == text and not list(run.path.glob("*.torn-*"))
    assert not (run.path / METRICS_LOCK).exists()


def test_a_whole_record_cut_before_its_newline_is_kept(tmp_path, capsys):
    run = _run_dir(tmp_path, _lines(RECORDS[:2]) + json.dumps(RECORDS[2], sort_keys=True))
    assert settle_tail(run.metrics_path) is None
    assert run.metrics_path.read_text() == _lines(RECORDS)
    assert not list(run.path.glob("*.torn-*")) and capsys.readouterr().err == ""


def test_a_log_that_is_one_cut_line(tmp_path):
    run = _run_dir(tmp_path, '{"st')
    side = settle_tail(run.metrics_path)
    assert side is not None and side.read_text() == '{"st' and run.metrics_path.read_text() == ""


# ---- a corrupt line before the last -------------------------------------------------------------------------
def test_a_corrupt_middle_line_is_refused_on_resume_not_erased(tmp_path):
    """Before: `fit --resume` rewrote metrics.jsonl without the line (and silently)."""
    text = _lines(RECORDS[:1]) + '{"step": 3, "ki\n' + _lines(RECORDS[1:])
    run = _run_dir(tmp_path, text)
    with pytest.raises(RunError) as e:
        run.truncate_metrics_after(4)
    msg = str(e.value)
    assert "\n" not in msg and f"{run.metrics_path} line 2 is not valid JSON" in msg
    assert f"sed -i.bak '2d' {run.metrics_path}" in msg
    assert run.metrics_path.read_text() == text
    with pytest.raises(RunError, match="line 2 is not valid JSON"):
        list(run.read_metrics())


def test_the_suggested_command_removes_the_corrupt_line(tmp_path):
    text = _lines(RECORDS[:1]) + "garbage\n" + _lines(RECORDS[1:])
    run = _run_dir(tmp_path, text)
    with pytest.raises(RunError) as e:
        list(run.read_metrics())
    command = str(e.value).split("`")[1]
    subprocess.run(command, shell=True, check=True)
    assert list(run.read_metrics()) == RECORDS
    assert Path(f"{run.metrics_path}.bak").read_text() == text


def test_a_corrupt_analysis_line_is_refused_not_dropped_by_a_rewrite(tmp_path):
    from trainer.analyze.measures import _write_records

    run = RunDir(tmp_path)
    path = tmp_path / "analysis.jsonl"
    rec = {"step": 4, "set": "icl", "seq_type": "fewshot_holdout", "n": 8, "accuracy_closed": 0.5,
           "accuracy_query": 0.5, "num_layers": 1, "num_heads": 1}
    text = "not json\n" + json.dumps(rec) + "\n"
    path.write_text(text)
    with pytest.raises(RunError, match="line 1 is not valid JSON"):
        _write_records(run, [dict(rec, step=8)])
    assert path.read_text() == text


# ---- a failed append ----------------------------------------------------------------------------------------
def _full_after(monkeypatch, nbytes: int, err: int = errno.ENOSPC) -> None:
    """os.write in seqgen.jsonlog writes `nbytes` of the first call, then fails as a full disk would."""
    real = jsonlog.os.write
    calls = []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data[:nbytes]))
        raise OSError(err, "No space left on device")

    monkeypatch.setattr(jsonlog.os, "write", write)


def test_a_full_disk_during_an_append_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    run = _run_dir(tmp_path, _lines(RECORDS[:2]))
    _full_after(monkeypatch, 7)
    with pytest.raises(LogWriteError) as e:
        run.append_metrics(RECORDS[2])
    size = len(json.dumps(RECORDS[2], sort_keys=True)) + 1
    assert e.value.disk_full and "\n" not in str(e.value)
    assert f"disk full appending a record of {size} bytes to {run.metrics_path}" in str(e.value)
    assert "left as it was" in str(e.value)
    assert run.metrics_path.read_text() == _lines(RECORDS[:2])
    monkeypatch.undo()
    run.append_metrics(RECORDS[2])
    assert list(run.read_metrics()) == RECORDS


def test_another_write_failure_is_one_line_with_its_own_fix(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    path.write_text(_lines(RECORDS[:1]))
    _full_after(monkeypatch, 3, errno.EFBIG)
    with pytest.raises(LogWriteError, match="cannot append to .*the record was not written.*run the command again"):
        append_line(path, json.dumps(RECORDS[1]))
    assert path.read_text() == _lines(RECORDS[:1])


def test_evaluate_on_a_full_disk_advises_running_it_again(tmp_path, monkeypatch):
    """The advice is the command's own: `trainer evaluate` has no --resume (it used to advise one)."""
    run = _run_dir(tmp_path, _lines(RECORDS[:2]))

    def evaluate_run(*args, **kwargs):
        run.append_metrics(RECORDS[2])

    monkeypatch.setattr("trainer.evaluate.evaluate_run", evaluate_run)
    _full_after(monkeypatch, 5)
    result = CliRunner().invoke(trainer_main, ["evaluate", "x", "--run-dir", str(run.path)])
    line = _one_line(result.output)
    assert result.exit_code == 2 and "disk full appending a record" in line
    assert "run the same command again" in line and "--resume" not in line
    assert run.metrics_path.read_text() == _lines(RECORDS[:2])


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                                   capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_really_full_disk_during_an_append(small_tmpfs):
    """A real full disk: the record crosses into a page the filesystem no longer has, so the kernel writes
    part of it and then refuses (the case that left a cut record before)."""
    run = RunDir(small_tmpfs / "run")
    run.path.mkdir()
    run.append_metrics(RECORDS[0])
    filler = small_tmpfs / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    big = dict(RECORDS[1], note="x" * 12000)
    with pytest.raises(LogWriteError, match="disk full appending a record"):
        run.append_metrics(big)
    assert run.metrics_path.read_text() == _lines(RECORDS[:1])
    filler.unlink()
    run.append_metrics(RECORDS[1])
    assert list(run.read_metrics()) == RECORDS[:2]


# ---- through the command line, on a real run ----------------------------------------------------------------
@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("torn-sets")
    return symbolic_set(root, SeqType.BURSTY, 256), symbolic_set(root, SeqType.FEWSHOT_HOLDOUT, 64, seed=1)


def test_resume_refuses_a_corrupt_middle_line_and_its_fix_works(sets, tmp_path):
    from trainer.fit import fit

    train, icl = sets
    run = tmp_path / "run"
    fit(tiny_config(steps=4, eval_every=2, checkpoint_every=2, log_every=2), train, [icl], run, progress=False)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    text = lines[0] + "}{ not a record\n" + "".join(lines[1:])
    metrics.write_text(text)
    args = ["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run), "--resume", "--steps", "6",
            "--no-progress"]
    result = CliRunner().invoke(trainer_main, args)
    line = _one_line(result.output)
    assert result.exit_code == 2 and "line 2 is not valid JSON" in line
    assert metrics.read_text() == text  # nothing erased
    subprocess.run(line.split("`")[1], shell=True, check=True)  # the fix the message names
    result = CliRunner().invoke(trainer_main, args)
    assert result.exit_code == 0, result.output
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"train"' in x]
    assert steps == [2, 4, 6]
