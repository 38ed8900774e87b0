"""`trainer` CLI: the happy path and every error path prints one line and exits 2."""

from __future__ import annotations

from dataclasses import replace

import pytest
from click.testing import CliRunner

from seqgen.config import SeqType
from tests.trainkit import SPLIT, paper_like_sets, symbolic_set
from trainer.cli import main

TINY = ["--steps", "6", "--batch-size", "8", "--log-every", "3", "--eval-every", "6", "--checkpoint-every", "3",
        "--eval-seqs", "32", "--num-layers", "1", "--num-heads", "2", "--emb-dim", "16",
        "--example-encoding", "embedding", "--no-progress"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return paper_like_sets(tmp_path_factory.mktemp("cli-shards"), train_seqs=512)


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_fit_evaluate_plot_and_resume(sets, tmp_path):
    train, icl, iwl = sets
    run = tmp_path / "run"
    r = _run("fit", "--train", train, "--eval", icl, "--eval", iwl, "--run-dir", run, *TINY)
    assert r.exit_code == 0, r.output
    assert "done: 6 steps" in r.output
    r = _run("evaluate", icl, iwl, "--run-dir", run, "--max-seqs", "16", "--step", "3")
    assert r.exit_code == 0, r.output
    assert "step 3" in r.output and "ICL (accuracy_closed on fewshot_holdout)" in r.output
    assert "IWL (accuracy on no_support_zipfian)" in r.output
    assert (run / "evaluations" / "step-3.json").is_file()
    r = _run("plot", run)
    assert r.exit_code == 0 and "icl_iwl.png" in r.output
    # extend the run by 3 steps
    r = _run("fit", "--train", train, "--eval", icl, "--run-dir", run, "--resume", *TINY[:0], "--steps", "9",
             "--no-progress")
    assert r.exit_code == 0, r.output
    assert "done: 9 steps" in r.output


def test_config_file_and_command_line_precedence(sets, tmp_path):
    train, _, _ = sets
    cfg = tmp_path / "c.toml"
    cfg.write_text("[trainer.training]\nsteps = 2\nbatch_size = 4\n[trainer.model]\nnum_layers = 1\n"
                   "emb_dim = 16\nnum_heads = 2\nexample_encoding = 'embedding'\n")
    r = _run("fit", "--train", train, "--run-dir", tmp_path / "run", "--config", cfg, "--steps", "3", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "done: 3 steps" in r.output


def test_fit_error_paths(sets, tmp_path):
    train, icl, _ = sets
    _one_line_error(_run("fit", "--train", tmp_path / "missing", "--run-dir", tmp_path / "r1", *TINY), "missing")
    _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r2", *TINY, "--batch-size", "0"),
                    "batch_size must be >= 1")
    _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r3", *TINY, "--devices", "64"),
                    "--devices 64")
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer.training]\nstepz = 3\n")
    _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r4", "--config", bad), "stepz")
    bad.write_text("[trainer.training\n")
    _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r4", "--config", bad), "not valid TOML")
    other = symbolic_set(tmp_path, SeqType.FEWSHOT_HOLDOUT, 64, split=replace(SPLIT, split_seed=3))
    _one_line_error(_run("fit", "--train", train, "--eval", other, "--run-dir", tmp_path / "r5", *TINY), "split")
    _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r6", "--resume", *TINY), "--resume")
    assert _run("fit", "--train", train, "--run-dir", tmp_path / "r7", *TINY).exit_code == 0
    _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r7", *TINY), "--resume")
    (train / "manifest.json").rename(train / "manifest.bak")
    try:
        _one_line_error(_run("fit", "--train", train, "--run-dir", tmp_path / "r8", *TINY), "unfinished")
    finally:
        (train / "manifest.bak").rename(train / "manifest.json")


def test_evaluate_and_plot_error_paths(sets, tmp_path):
    train, icl, _ = sets
    _one_line_error(_run("evaluate", icl, "--run-dir", tmp_path / "none"), "does not exist")
    run = tmp_path / "run"
    assert _run("fit", "--train", train, "--run-dir", run, *TINY).exit_code == 0
    _one_line_error(_run("evaluate", icl, "--run-dir", run, "--step", "4"), "no checkpoint at step 4")
    state = next((run / "checkpoints").glob("step-6")) / "state.eqx"
    state.write_bytes(state.read_bytes()[:100])
    _one_line_error(_run("evaluate", icl, "--run-dir", run, "--step", "6"), "truncated")
    other = symbolic_set(tmp_path, SeqType.FEWSHOT_HOLDOUT, 64, split=replace(SPLIT, split_seed=5))
    _one_line_error(_run("evaluate", other, "--run-dir", run, "--step", "3"), "split")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((run / "config.json").read_text())
    _one_line_error(_run("plot", empty), "no metrics")
