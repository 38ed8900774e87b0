"""Issue 31, items 3 and 4 (`trainer.data.open_sets`): evaluation names are unique (two sets whose folders
share a base name, `a/eval` and `b/eval`, used to overwrite each other's results; now refused up front, and
`--eval NAME=PATH` names one), and roles are respected (an evaluation-only set, fewshot_holdout, is refused as
`--train`; a set that is both the training set and an evaluation set is refused unless --allow-train-eval)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from seqgen.config import SeqType
from tests.trainkit import TINY_CLI, one_line_error, symbolic_set
from trainer.cli import main as trainer_main
from trainer.data import DataError, EvalSpec, open_sets, parse_eval_spec

TINY, _one_line = TINY_CLI, one_line_error


def _invoke(*args):
    return CliRunner().invoke(trainer_main, [str(a) for a in args])


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("role-sets")
    train = symbolic_set(root, SeqType.BURSTY, 128)
    icl = symbolic_set(root, SeqType.FEWSHOT_HOLDOUT, 32, seed=1)
    iwl = symbolic_set(root, SeqType.NO_SUPPORT_ZIPFIAN, 32, seed=2)
    a, b = root / "a" / "eval", root / "b" / "eval"
    shutil.copytree(icl, a)
    shutil.copytree(iwl, b)
    return train, icl, a, b


def _eval_sets(run) -> list[str]:
    return sorted({json.loads(x)["set"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x})


# ---- names --------------------------------------------------------------------------------------------------
def test_parse_eval_spec():
    assert parse_eval_spec("data/x") == EvalSpec(__import__("pathlib").Path("data/x"))
    assert parse_eval_spec("icl=data/x", also_train=True) == EvalSpec(__import__("pathlib").Path("data/x"), "icl", True)
    for bad in ("=data/x", "a b=data/x", "icl="):
        with pytest.raises(DataError, match="NAME=PATH needs a NAME"):
            parse_eval_spec(bad)


def test_colliding_names_are_refused_up_front_and_the_suggestion_works(sets, tmp_path):
    """Before: both were recorded as 'eval', one's results overwriting the other's."""
    train, _, a, b = sets
    with pytest.raises(DataError, match="would both be recorded as 'eval'"):
        open_sets(train, [a, b])
    line = _one_line(_invoke("fit", "--train", train, "--eval", a, "--eval", b, "--run-dir", tmp_path / "run", *TINY),
                     f"evaluation sets {a} and {b} would both be recorded as 'eval'")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    suggested = line.split("name them apart: ")[1].split()
    assert suggested == ["--eval", f"a-eval={a}", "--eval", f"b-eval={b}"]
    result = _invoke("fit", "--train", train, *suggested, "--run-dir", tmp_path / "run", *TINY)
    assert result.exit_code == 0, result.output
    assert _eval_sets(tmp_path / "run") == ["a-eval", "b-eval"]
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["eval"]
    assert [e["name"] for e in stored] == ["a-eval", "b-eval"]
    # trainer evaluate: the same check, the same way to name them
    _one_line(_invoke("evaluate", a, b, "--run-dir", tmp_path / "run", "--max-seqs", "8"), "would both be recorded")
    result = _invoke("evaluate", f"first={a}", f"second={b}", "--run-dir", tmp_path / "run", "--max-seqs", "8")
    assert result.exit_code == 0, result.output
    assert _eval_sets(tmp_path / "run") == ["a-eval", "b-eval", "first", "second"]


def test_a_set_given_twice_is_refused(sets, tmp_path):
    train, icl, _, _ = sets
    _one_line(_invoke("fit", "--train", train, "--eval", icl, "--eval", icl, "--run-dir", tmp_path / "r", *TINY),
              "is given twice", "drop one --eval")


# ---- roles --------------------------------------------------------------------------------------------------
def test_an_evaluation_only_set_is_refused_as_the_training_set(sets, tmp_path):
    """Before: a fewshot_holdout set was trained on (the held-out classes), silently."""
    train, icl, _, _ = sets
    with pytest.raises(DataError, match="for evaluation only"):
        open_sets(icl, [])
    line = _one_line(_invoke("fit", "--train", icl, "--run-dir", tmp_path / "r", *TINY),
                     f"--train {icl} is a fewshot_holdout set, for evaluation only", f"--eval {icl}")
    assert "seqgen build --type bursty" in line
    # even with the flag that allows a set to be both: that flag is about the other check
    _one_line(_invoke("fit", "--train", icl, "--eval", icl, "--allow-train-eval", "--run-dir", tmp_path / "r", *TINY),
              "for evaluation only")
    assert not (tmp_path / "r").exists()


def test_training_on_the_evaluation_set_needs_the_flag(sets, tmp_path):
    train, _, _, _ = sets
    copy = tmp_path / "copy"
    shutil.copytree(train, copy)
    for other in (train, copy):  # the same folder, or the same content elsewhere
        with pytest.raises(DataError, match="is both the training set and an evaluation set"):
            open_sets(train, [other])
        _one_line(_invoke("fit", "--train", train, "--eval", other, "--run-dir", tmp_path / "r", *TINY),
                  "is both the training set and an evaluation set", "--allow-train-eval")
    assert not (tmp_path / "r").exists()
    result = _invoke("fit", "--train", train, "--eval", train, "--allow-train-eval", "--run-dir", tmp_path / "r", *TINY)
    assert result.exit_code == 0, result.output
    _one_line(_invoke("evaluate", train, "--run-dir", tmp_path / "r", "--max-seqs", "8"), "--allow-train-eval")
    result = _invoke("evaluate", train, "--allow-train-eval", "--run-dir", tmp_path / "r", "--max-seqs", "8")
    assert result.exit_code == 0, result.output
