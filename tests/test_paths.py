"""Issue 31, item 2: user-given paths are described as they are (`seqgen.files.describe_path`): missing, a
directory where a file belongs or the reverse, a broken symbolic link, a link loop, unreadable, not a shard set
(and what it looks like instead), with a fix that works: where the message names a command or a path to pass,
the test runs it and the command gets further."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from seqgen.cli import main as seqgen_main
from seqgen.config import SeqType
from seqgen.configio import ConfigError, load_toml
from seqgen.files import describe_path
from seqgen.shards import describe_shard_set
from tests.trainkit import TINY_CLI, one_line_error, symbolic_set
from trainer.cli import main as trainer_main
from trainer.run import RunDir

TINY, _one_line = TINY_CLI, one_line_error


@pytest.fixture
def odd(tmp_path):
    """A folder of odd paths: a file, a folder, a broken link, a link loop, a named pipe."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.mkfifo(tmp_path / "pipe")
    return tmp_path


@pytest.mark.parametrize("name, expect, words", [
    ("missing", "file", "does not exist"),
    ("missing", "dir", "does not exist"),
    ("file", "dir", "is a file, not a directory"),
    ("folder", "file", "is a directory, not a file"),
    ("broken", "file", "is a broken symbolic link (it points to"),
    ("broken", "dir", "is a broken symbolic link"),
    ("loop", "dir", "is a symbolic link loop"),
    ("loop", "file", "is a symbolic link loop"),
    ("pipe", "file", "is a named pipe, not a file"),
    ("file/below", "file", "does not exist ("),
    ("file", "file", None),
    ("folder", "dir", None),
])
def test_describe_path(odd, name, expect, words):
    got = describe_path(odd / name, expect)
    assert got == words if words is None else words in got
    if name == "file/below":
        assert f"{odd / 'file'} is a file, not a directory" in got


def test_an_unreadable_path_is_named_so(odd, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)  # tests may run as root
    assert describe_path(odd / "file", "file") == "cannot be read (permission denied)"
    with pytest.raises(ConfigError, match="cannot be read .permission denied.; make it readable"):
        load_toml(odd / "file")


@pytest.mark.parametrize("name, words", [
    ("missing", "does not exist; check the path"),
    ("folder", "is a directory, not a file; pass a TOML file, not a folder"),
    ("file", "is not valid TOML"),
    ("broken", "is a broken symbolic link"),
    ("loop", "is a symbolic link loop"),
])
def test_config_files_described(odd, name, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        load_toml(odd / name)
    _one_line(CliRunner().invoke(seqgen_main, ["build", "--config", str(odd / name)]), words)


# ---- shard sets ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("path-sets")
    return symbolic_set(root, SeqType.BURSTY, 128), symbolic_set(root, SeqType.FEWSHOT_HOLDOUT, 32, seed=1)


def test_shard_set_paths_described(sets, odd, tmp_path):
    train, _ = sets
    cases = {
        odd / "missing": "does not exist; check the path, or build the set there with `seqgen build --type TYPE",
        odd / "loop": "is a symbolic link loop",
        odd / "broken": "is a broken symbolic link",
        odd / "folder": "is an empty directory (no shard set was built there)",
        train / "manifest.json": f"is a file of the shard set {train}; pass that folder: {train}",
        train.parent: "is a folder of shard sets (",
        odd: "is not a shard set: it holds no manifest.json (",
    }
    for path, words in cases.items():
        got = describe_shard_set(path)
        assert words in got, (path, got)
        _one_line(CliRunner().invoke(seqgen_main, ["verify", str(path)]), words)
        _one_line(CliRunner().invoke(trainer_main, ["fit", "--train", str(path), "--run-dir", str(tmp_path / "r"),
                                                    *TINY]), words)
    assert describe_shard_set(train) is None


def test_the_folder_a_message_names_is_the_one_that_works(sets, tmp_path):
    """`--train SET/manifest.json` names SET; a folder of sets names one of them: passing that trains."""
    train, icl = sets
    line = _one_line(CliRunner().invoke(trainer_main, ["fit", "--train", str(train / "manifest.json"),
                                                       "--run-dir", str(tmp_path / "r"), *TINY]))
    named = line.rsplit(": ", 1)[1]
    result = CliRunner().invoke(trainer_main, ["fit", "--train", named, "--eval", str(icl), "--run-dir",
                                               str(tmp_path / "r"), *TINY])
    assert result.exit_code == 0, result.output


def test_a_run_directory_is_not_taken_for_a_shard_set(sets, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "checkpoints").mkdir()
    assert "is a run directory of `trainer fit`, not a shard set" in describe_shard_set(run)


# ---- run directories ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(sets, tmp_path_factory):
    """A finished tiny run (copied per test by `run`)."""
    train, icl = sets
    run = tmp_path_factory.mktemp("trained") / "run"
    result = CliRunner().invoke(trainer_main, ["fit", "--train", str(train), "--eval", str(icl), "--run-dir",
                                               str(run), *TINY])
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def test_run_directories_described(odd, tmp_path, sets):
    train, icl = sets
    cases = {
        odd / "missing": "does not exist; check the path, or train a run there with `trainer fit --train DIR",
        odd / "file": "is a file, not a directory",
        odd / "loop": "is a symbolic link loop",
        odd / "folder": "is not a run directory (no config.json)",
        train: "is a shard set, not a run directory",
    }
    for path, words in cases.items():
        assert words in RunDir(path).describe(), path
        _one_line(CliRunner().invoke(trainer_main, ["evaluate", str(icl), "--run-dir", str(path)]), words)
        _one_line(CliRunner().invoke(trainer_main, ["plot", str(path)]), words)
    _one_line(CliRunner().invoke(trainer_main, ["fit", "--train", str(train), "--run-dir", str(odd / "file"), *TINY]),
              "is a file, not a directory; pass a folder (it is created if missing)")


def test_a_run_missing_its_config_is_continued_as_the_message_says(run, sets):
    """Before: `--resume` said 'holds no run; drop --resume', and without it 'use --resume': circular."""
    train, icl = sets
    (run / "config.json").unlink()
    line = _one_line(CliRunner().invoke(trainer_main, ["evaluate", str(icl), "--run-dir", str(run)]),
                     "has checkpoints (latest step 2) but no config.json", "--resume")
    assert "`trainer fit --train DIR --run-dir" in line
    _one_line(CliRunner().invoke(trainer_main, ["fit", "--train", str(train), "--eval", str(icl), "--run-dir",
                                                str(run), *TINY]), "already holds a run; use --resume")
    result = CliRunner().invoke(trainer_main, ["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run),
                                               "--resume", "--steps", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "notice: " in result.output and "restored it from the checkpoint of step 2" in result.output
    assert json.loads((run / "config.json").read_text())["trainer"]["training"]["steps"] == 4


def test_a_config_json_that_is_a_folder(run, sets):
    _, icl = sets
    (run / "config.json").unlink()
    (run / "config.json").mkdir()
    line = _one_line(CliRunner().invoke(trainer_main, ["evaluate", str(icl), "--run-dir", str(run)]),
                     "has a config.json that is a directory, not a file", "--resume")
    subprocess.run(line.split("`")[1], shell=True, check=True)  # the `mv` it names
    assert not (run / "config.json").exists() and RunDir(run).restore_config() == 2


def test_a_metrics_file_that_is_a_folder(run):
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    line = _one_line(CliRunner().invoke(trainer_main, ["plot", str(run)]),
                     "metrics file", "is a directory, not a file")
    subprocess.run(line.split("`")[1], shell=True, check=True)
    result = CliRunner().invoke(trainer_main, ["plot", str(run)])
    assert "Traceback" not in result.output and "is a directory" not in result.output


def test_checkpoint_files_described(run, sets):
    _, icl = sets
    state = run / "checkpoints" / "step-2" / "state.eqx"
    state.unlink()
    os.symlink(run / "gone", state)
    _one_line(CliRunner().invoke(trainer_main, ["evaluate", str(icl), "--run-dir", str(run)]),
              "has no complete checkpoint: step-2 lacks a metadata.json or state.eqx file", "--step N")
    line = _one_line(CliRunner().invoke(trainer_main, ["evaluate", str(icl), "--run-dir", str(run), "--step", "2"]),
                     "checkpoint state", "is a broken symbolic link", "delete")
    assert str(state.parent) in line
