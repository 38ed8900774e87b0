"""Issue 12, reading: every file the tools read is type-checked on load (one-line errors naming the file),
numbers are finite and in range where they are parsed, click usage errors are one `error:` line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from seqgen import shards as fmt
from seqgen.atomic import atomic_write_json
from seqgen.cli import main as seqgen_main
from seqgen.config import BuildConfig, SeqType, SequenceConfig
from seqgen.configio import ConfigError, load_toml
from tests.trainkit import symbolic_set
from trainer import checkpoint
from trainer.cli import main as trainer_main
from trainer.data import DataError, open_shard_set
from trainer.run import RunDir, RunError
from trainer.runlog import Evaluation, read_evaluation

BAD_JSON = {"array": "[]", "empty object": "{}", "binary": b"\xff\xd8\xff\x00\x01", "nan": '{"step": NaN}'}


def one_line(result, *fragments: str) -> str:
    """Exit code 2 and exactly one line on stderr, `error: ...` containing `fragments`, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return symbolic_set(tmp_path_factory.mktemp("read-sets"), SeqType.BURSTY, 300)


# ---- shard manifests, sidecars, build.json -------------------------------------------------------------
@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m.update(shards="shard-00000.h5"), "'shards' is a JSON string, expected an array"),
    (lambda m: m.update(shards=[1, 2, 3]), "'shards[0]' is a JSON number, expected an object"),
    (lambda m: m["shards"][0].update(rows="100"), "'shards[0].rows' is \"100\", expected an integer"),
    (lambda m: m["shards"][0].pop("sha256"), "'shards[0].sha256' is missing"),
    (lambda m: m["split"].update(rare=None), "'split.rare' is a JSON null"),
    (lambda m: m.update(length=9.5), "'length' is 9.5, expected an integer"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line_for_trainer_and_seqgen(small_set, tmp_path, edit, fragment):
    folder = tmp_path / "s"
    folder.mkdir()
    for p in small_set.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError) as e:
        open_shard_set(folder)
    assert fragment in str(e.value) and "manifest.json" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(fmt.ShardError, match="rebuild"):
        fmt.read_manifest(folder)
    one_line(CliRunner().invoke(seqgen_main, ["verify", str(folder)]), "manifest.json")


@pytest.mark.parametrize("name", list(BAD_JSON))
def test_a_manifest_or_sidecar_that_is_not_an_object_is_one_line(tmp_path, name):
    _write(tmp_path / "manifest.json", BAD_JSON[name])
    with pytest.raises(fmt.ShardError) as e:
        fmt.read_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(e.value) and "\n" not in str(e.value)
    _write(tmp_path / "shard-00000.json", BAD_JSON[name])
    with pytest.raises(fmt.ShardError):
        fmt.read_json(tmp_path / "shard-00000.json", "sidecar")


def test_json_written_by_seqgen_never_holds_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"noise_scale": float("nan")})
    assert not list(tmp_path.iterdir())  # neither the file nor its .tmp


# ---- checkpoint metadata, run config, metrics, evaluations -------------------------------------------
def _checkpoint(run: Path, step: int = 3) -> Path:
    return checkpoint.save(run, step, {"w": np.arange(4, dtype=np.float32)}, {"trainer": {}})


@pytest.mark.parametrize("name", list(BAD_JSON) + ["step of another folder", "step not an integer"])
def test_checkpoint_metadata_of_the_wrong_shape_is_one_line(tmp_path, name):
    folder = _checkpoint(tmp_path)
    meta = json.loads((folder / "metadata.json").read_text())
    if name == "step of another folder":
        content = json.dumps(dict(meta, step=9))
    elif name == "step not an integer":
        content = json.dumps(dict(meta, step="3"))
    else:
        content = BAD_JSON[name]
    _write(folder / "metadata.json", content)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read_metadata(tmp_path, 3)
    assert "metadata.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", list(BAD_JSON.values()) + ['{"trainer": {}, "data": {"train": []}}'])
def test_run_config_of_the_wrong_shape_is_one_line(tmp_path, content):
    _write(tmp_path / "config.json", content)
    with pytest.raises(RunError) as e:
        RunDir(tmp_path).read()
    assert "config.json" in str(e.value) and "\n" not in str(e.value)
    result = CliRunner().invoke(trainer_main, ["plot", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_metrics_lines_cut_by_a_kill_are_moved_aside_but_foreign_lines_refused(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"step": 1, "kind": "train", "metrics": {"loss": float("nan")}})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 2, "kind": "tr')  # a hard kill mid-line ...
    run.append_metrics({"step": 3, "kind": "train", "metrics": {}})  # ... the cut line is moved aside, not glued onto
    run.append_metrics({"step": 4, "kind": "train", "metrics": {}})
    assert [r["step"] for r in run.read_metrics()] == [1, 3, 4]  # the NaN loss of a diverged run is kept
    assert [p.read_text() for p in tmp_path.glob("metrics.jsonl.torn-*")] == ['{"step": 2, "kind": "tr']
    for foreign in ("[1, 2]", '"text"', '{"kind": "train"}', '{"step": "5"}'):
        run.metrics_path.write_text('{"step": 1}\n' + foreign + "\n")
        with pytest.raises(RunError, match=r"metrics\.jsonl line 2") as e:
            list(run.read_metrics())
        assert "\n" not in str(e.value)


def test_an_evaluation_file_of_the_wrong_shape_is_one_line(tmp_path):
    _write(tmp_path / "step-1.json", '{"step": 1, "sets": {}}')
    with pytest.raises(RunError, match="step-1.json"):
        read_evaluation(tmp_path / "step-1.json")


def test_each_evaluate_keeps_the_other_sets_of_a_step(tmp_path):
    path = tmp_path / "evaluations" / "step-5.json"
    run = RunDir(tmp_path)
    summary = {"accuracy_closed": {"mean": 0.5, "ci95": [0.4, 0.6], "n": 10}}
    run.record_evaluation(Evaluation(5, "icl", "fewshot_holdout", "evaluate", summary, None))
    run.record_evaluation(Evaluation(5, "iwl", "no_support_zipfian", "evaluate", summary, 7))
    newer = {"accuracy_closed": {"mean": 0.9, "ci95": [0.8, 1.0], "n": 10}}
    run.record_evaluation(Evaluation(5, "icl", "fewshot_holdout", "watch", newer, None))
    sets = {s["set"]: s for s in read_evaluation(path)["sets"]}
    assert set(sets) == {"icl", "iwl"}
    assert sets["icl"]["metrics"] == newer and sets["icl"]["source"] == "watch"
    assert sets["iwl"]["max_seqs"] == 7


# ---- TOML and numbers -----------------------------------------------------------------------------------
def test_a_non_utf8_or_unreadable_toml_is_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[seqgen]\nnum_seqs = 10 # \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="is a directory, not a file; pass one of the TOML files in it"):
        load_toml(tmp_path)  # a folder
    one_line(CliRunner().invoke(seqgen_main, ["build", "--config", str(bad)]), "bad.toml", "UTF-8")
    one_line(CliRunner().invoke(trainer_main, ["fit", "--config", str(bad), "--train", "x", "--run-dir",
                                               str(tmp_path / "r")]), "UTF-8")


@pytest.mark.parametrize("args, fragment", [
    (["--noise-scale", "nan"], "noise_scale must be a finite number"),
    (["--noise-scale", "inf"], "noise_scale must be a finite number"),
    (["--zipf-exponent", "inf"], "zipf_exponent must be a finite number"),
    (["--p-bursty", "nan"], "p_bursty must be a finite number"),
    (["--split-seed", "-1"], "--split-seed must be in [0, 2**63)"),
    (["--num-seqs", str(1 << 50)], "--num-seqs must be <="),
    (["--shard-size", str(10**12), "--num-seqs", str(10**12)], "lower --shard-size"),
    (["--example-type", "symbolic", "--symbolic-size", str(10**10)], "symbolic_size must be <="),
    (["--seq-len", str(10**9)], "seq_len must be <="),
])
def test_seqgen_refuses_non_finite_and_impossible_numbers(tmp_path, args, fragment):
    one_line(CliRunner().invoke(seqgen_main, ["build", "--out", str(tmp_path / "s"), *args]), fragment)
    assert not (tmp_path / "s").exists()  # refused before any work


def test_a_non_finite_config_built_in_python_is_refused():
    with pytest.raises(ConfigError, match="noise_scale must be a finite number"):
        BuildConfig(sequence=SequenceConfig(noise_scale=float("nan"))).validate()


@pytest.mark.parametrize("toml, fragment", [
    ("[trainer.optimizer]\nmax_lr = inf\n", "max_lr must be a finite number"),
    ("[trainer.optimizer]\nb1 = 2.0\n", "b1 (Adam) must be in [0, 1)"),
    ("[trainer.optimizer]\nb2 = 1.0\n", "b2 (Adam) must be in [0, 1)"),
    ("[trainer.optimizer]\neps = -1e-8\n", "eps (Adam) must be >= 0"),
    ("[trainer.optimizer]\nclip_norm = nan\n", "clip_norm must be a finite number"),
    ("[trainer.model]\nbn_decay = nan\n", "bn_decay must be a finite number"),
])
def test_trainer_refuses_non_finite_and_out_of_range_optimizer_options(tmp_path, toml, fragment):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    one_line(CliRunner().invoke(trainer_main, ["fit", "--config", str(cfg), "--train", "x", "--run-dir",
                                               str(tmp_path / "r")]), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["fit", "--lr", "inf", "--train", "x", "--run-dir", "r"], "max_lr must be a finite number"),
    (["evaluate", "x", "--run-dir", "r", "--watch", "--poll", "-1"], "--poll"),
    (["evaluate", "x", "--run-dir", "r", "--watch", "--poll", "nan"], "--poll"),
    (["evaluate", "x", "--run-dir", "r", "--watch", "--poll", "0"], "--poll"),
    (["fit", "--distributed", "--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2",
      "--train", "x", "--run-dir", "r"], "--process-id 2 must be in [0, --num-processes 2)"),
])
def test_trainer_refuses_impossible_command_line_numbers(tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    one_line(CliRunner().invoke(trainer_main, args), fragment)


# ---- click usage errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("main, args, fragment", [
    (seqgen_main, ["build", "--bogus"], "No such option '--bogus'"),
    (seqgen_main, ["verify"], "Missing argument 'FOLDER'"),
    (seqgen_main, ["build", "--type", "nope"], "Invalid value for '--type'"),
    (seqgen_main, ["nope"], "No such command 'nope'"),
    (trainer_main, ["fit", "--run-dir", "r"], "Missing option '--train'"),
    (trainer_main, ["evaluate", "--run-dir", "r"], "Missing argument 'EVAL_DIRS...'"),
    (trainer_main, ["fit", "--steps", "many"], "Invalid value for '--steps'"),
    (trainer_main, ["nope"], "No such command 'nope'"),
])
def test_usage_errors_are_one_line(main, args, fragment):
    line = one_line(CliRunner().invoke(main, args), fragment)
    assert "--help" in line


def test_help_still_exits_0():
    for main in (seqgen_main, trainer_main):
        result = CliRunner().invoke(main, ["--help"])
        assert result.exit_code == 0 and "Usage:" in result.output
