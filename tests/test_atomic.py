"""The one atomic writer (`seqgen.atomic`): readers see the old file or the complete new one, never a
half-written file with the final name, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from seqgen.atomic import atomic_copy, atomic_write, atomic_write_json, atomic_write_text


def test_atomic_write_json_is_sorted_indented_and_ends_with_a_newline(tmp_path: Path):
    atomic_write_json(tmp_path / "x.json", {"b": 1, "a": {"d": [1, 2], "c": "é"}})
    assert (tmp_path / "x.json").read_text() == '{\n "a": {\n  "c": "\\u00e9",\n  "d": [\n   1,\n   2\n  ]\n },\n "b": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_non_finite_numbers_are_refused_before_anything_is_written(tmp_path: Path):
    atomic_write_json(tmp_path / "x.json", {"v": 1})
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"v": float("inf")})
    assert json.loads((tmp_path / "x.json").read_text()) == {"v": 1} and len(list(tmp_path.iterdir())) == 1
    atomic_write_json(tmp_path / "y.json", {"v": float("nan")}, allow_nan=True)
    assert (tmp_path / "y.json").read_text() == '{\n "v": NaN\n}\n'


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path):
    path = tmp_path / "f.png"
    atomic_write_text(path, "old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OSError):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_the_final_name_appears_only_complete_and_fsynced(tmp_path: Path, monkeypatch):
    """What `os.replace` sees: a complete, fsynced temporary file of this process beside the target."""
    seen = []
    synced = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

    def replace(src, dst):
        seen.append((Path(src).name, Path(src).read_text(), len(synced)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    src = tmp_path / "src.txt"
    src.write_text("copied")
    atomic_copy(src, tmp_path / "dst.txt")
    atomic_write_text(tmp_path / "t.txt", "text")
    (name1, text1, synced1), (name2, text2, synced2) = seen
    assert name1.startswith("dst.txt.") and name1.endswith(f".{os.getpid()}.tmp") and text1 == "copied"
    assert text2 == "text" and synced1 >= 1 and synced2 > synced1 + 1  # file fsynced before, folder after
    assert (tmp_path / "dst.txt").read_text() == "copied"


def test_appended_metrics_records_are_fsynced(tmp_path: Path, monkeypatch):
    from trainer.run import RunDir

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    run = RunDir(tmp_path)
    run.append_metrics({"step": 1, "kind": "train", "metrics": {"loss": 1.0}})
    run.append_metrics({"step": 2, "kind": "train", "metrics": {"loss": 0.5}})
    assert len(synced) == 2
    assert [r["step"] for r in run.read_metrics()] == [1, 2]
