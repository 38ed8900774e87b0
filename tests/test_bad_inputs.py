"""The probe: a table of bad inputs to every command (fuzzed option values, config and sweep-file types, paths
of every kind), each answered by one line that starts with "error:", a non-zero exit, no traceback, and
nothing written. Where a message names a fix, the fix is applied and the command gets further
(`test_the_fix_a_message_names_works`). `python -m pytest tests/test_bad_inputs.py -q` prints the count.

Cases are refused before any training or building starts, so the table runs in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from seqgen.cli import main as seqgen_main
from tests.test_sweep import BASE, SWEEP, _write
from tests.trainkit import SPLIT, paper_like_sets
from trainer.cli import main as trainer_main

# ---- the values ------------------------------------------------------------------------------------------
NOT_INT = ["abc", "1.5", "", "0x10", "1e3"]
NOT_FLOAT = ["abc", "", "1,5"]
NON_FINITE = ["nan", "inf", "-inf", "1e999"]

# options that must be >= 1 (0 and -1 refused), of each command
FIT_POSITIVE = ["--steps", "--batch-size", "--num-layers", "--num-heads", "--emb-dim", "--log-every", "--eval-every",
                "--eval-seqs", "--checkpoint-every", "--steps-per-dispatch", "--image-size"]
FIT_NONNEG = ["--seed", "--warmup-steps"]
FIT_FLOATS = ["--lr", "--clip-norm", "--weight-decay", "--l2", "--w-interim"]
FIT_CHOICES = {"--precision": "fp8", "--kernels": "cuda", "--seq-model": "gru", "--example-encoding": "pixels",
               "--platform": "tpu", "--cpu-isa": "neon", "--log-to": "mlflow", "--layer-loop": "while"}
BUILD_POSITIVE = ["--num-seqs", "--shard-size", "--ways", "--bursty-shots", "--fs-shots", "--polysemy",
                  "--symbolic-size", "--workers"]
BUILD_NONNEG = ["--seed", "--split-seed", "--n-rare-classes", "--n-common-classes", "--n-holdout-classes"]
BUILD_PROBS = ["--p-bursty", "--p-bursty-common", "--p-bursty-zipfian", "--p-fewshot"]
EVAL_POSITIVE = ["--max-seqs", "--batch-size"]
SWEEP_POSITIVE = ["--jobs", "--group", "--workers"]


def _fit_cases() -> list[tuple[list[str], str | None]]:
    cases: list[tuple[list[str], str | None]] = []
    for opt in FIT_POSITIVE:
        cases += [([opt, "0"], None), ([opt, "-1"], None)] + [([opt, v], None) for v in NOT_INT]
    for opt in FIT_NONNEG:
        cases += [([opt, "-1"], None)] + [([opt, v], None) for v in NOT_INT[:2]]
    for opt in FIT_FLOATS:
        cases += [([opt, v], None) for v in NON_FINITE + NOT_FLOAT + ["-1"]]
    cases += [([opt, v], None) for opt, v in FIT_CHOICES.items()]
    cases += [
        (["--emb-dim", "100000"], "cannot fit"),
        (["--num-heads", "3"], "must divide"),
        (["--seed", str(2**40)], None),
        (["--resume"], None),  # nothing to resume
        (["--bogus-option", "1"], "No such option"),
        (["--steps", "4", "--steps-per-dispatch", "0"], None),
    ]
    return cases


def _build_cases() -> list[tuple[list[str], str | None]]:
    cases: list[tuple[list[str], str | None]] = []
    for opt in BUILD_POSITIVE:
        cases += [([opt, "0"], None), ([opt, "-1"], None), ([opt, "abc"], None)]
    for opt in BUILD_NONNEG:
        cases += [([opt, "-1"], None), ([opt, "1.5"], None)]
    for opt in BUILD_PROBS:
        cases += [([opt, v], None) for v in ["1.5", "-0.1", "nan", "inf", "abc"]]
    cases += [([opt, v], None) for opt in ("--noise-scale", "--zipf-exponent") for v in ["nan", "inf", "abc"]]
    cases += [(["--noise-scale", "-1"], None), (["--type", "bogus"], None), (["--example-type", "video"], None),
              (["--exemplars", "some"], None), (["--labeling-rare", "shuffled"], None),
              (["--seq-len", "0"], None), (["--seq-len", "-3"], None),
              (["--symbolic-size", str(10**9)], None)]  # a huge symbolic vocabulary: refused, not allocated
    return cases


def _eval_cases() -> list[tuple[list[str], str | None]]:
    cases: list[tuple[list[str], str | None]] = []
    for opt in EVAL_POSITIVE:
        cases += [([opt, "0"], None), ([opt, "-1"], None), ([opt, "abc"], None)]
    cases += [(["--step", "-1"], None), (["--step", "999"], None), (["--step", "abc"], None),
              (["--poll", "-1", "--watch"], None), (["--poll", "nan", "--watch"], None),
              (["--platform", "tpu"], None), (["--log-to", "mlflow"], None)]
    return cases


def _sweep_cases() -> list[tuple[str, list[str], str | None]]:
    """(sweep file text, extra args, fragment)."""
    cases: list[tuple[str, list[str], str | None]] = []
    for opt in SWEEP_POSITIVE:
        cases += [(SWEEP, [opt, "0"], None), (SWEEP, [opt, "-1"], None), (SWEEP, [opt, "abc"], None)]
    edits = [
        ("train_seqs = 300", 'train_seqs = "many"'), ("train_seqs = 300", "train_seqs = 0"),
        ("train_seqs = 300", "train_seqs = -5"), ("train_seqs = 300", "train_seqs = 3.5"),
        ("eval_seqs = 48", "eval_seqs = 0"), ("eval_seqs = 48", 'eval_seqs = "48"'),
        ("eval_seqs = 48", "eval_seqs = 48\nseeds = [-1]"), ("eval_seqs = 48", 'eval_seqs = 48\nseeds = "0"'),
        ("eval_seqs = 48", "eval_seqs = 48\nseeds = []"), ("eval_seqs = 48", "eval_seqs = 48\nseeds = [0, 0.5]"),
        ("p_bursty = 0.0", "p_bursty = nan"), ("p_bursty = 0.0", "p_bursty = inf"),
        ("p_bursty = 0.0", "p_bursty = 2.0"), ("p_bursty = 0.0", 'p_bursty = "high"'),
        ("max_lr = 1e-3", "max_lr = nan"), ("max_lr = 1e-3", "max_lr = 0.0"), ("max_lr = 1e-3", 'max_lr = "fast"'),
        ("x = 0.0", "x = nan"), ("x = 0.0", "x = [1]"), ('name = "p0"', "name = 3"), ('name = "p0"', 'name = ""'),
        ('name = "p0"', 'name = "a/b"'), ("[[runs]]", "runs = 3\n[[runz]]"),
        ('figure = "Fig. T"', "figure = 1"), ('base = "base.toml"', "base = 7"),
    ]
    cases += [(SWEEP.replace(old, new, 1), [], None) for old, new in edits]
    cases += [("not = [toml", [], None), ("", [], None), (SWEEP + "\n[trainer.model]\nnum_heads = 0\n", [], None),
              (SWEEP + "\n[[runs]]\nname = 'p2'\nx = 2.0\n[runs.trainer.model]\nemb_dim = 100000\n", [],
               "cannot fit")]
    return cases


FIT, BUILD, EVAL, SWEEPS = _fit_cases(), _build_cases(), _eval_cases(), _sweep_cases()


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return paper_like_sets(tmp_path_factory.mktemp("probe-sets"), 256)


@pytest.fixture(scope="module")
def finished_run(sets, tmp_path_factory):
    train, icl, _ = sets
    run = tmp_path_factory.mktemp("probe-run") / "run"
    result = CliRunner().invoke(trainer_main, ["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run),
                                               *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    return run


TINY = ["--steps", "2", "--batch-size", "8", "--num-layers", "1", "--num-heads", "2", "--emb-dim", "16",
        "--example-encoding", "embedding", "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2",
        "--eval-seqs", "16"]


def _one_line_refusal(result, fragment: str | None) -> str:
    out = result.output
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), out
    assert result.exit_code not in (0, None), out
    lines = [line for line in (result.stderr or out).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], out
    if fragment is not None:
        assert fragment in errors[0], out
    return errors[0]


def _merge(args: list[str], extra: list[str]) -> list[str]:
    """`args` with each option of `extra` replacing the same option there (the last one given wins in click,
    but a replaced value keeps the case about one bad value)."""
    out = list(args)
    i = 0
    while i < len(extra):
        opt = extra[i]
        has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if opt in out and has_value and out.index(opt) + 1 < len(out):
            out[out.index(opt) + 1] = extra[i + 1]
        else:
            out += extra[i:i + 2] if has_value else [opt]
        i += 2 if has_value else 1
    return out


# ---- the table -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, fragment", FIT, ids=[" ".join(a) or "empty" for a, _ in FIT])
def test_fit_refuses_in_one_line(sets, tmp_path, extra, fragment):
    train, icl, _ = sets
    run = tmp_path / "run"
    args = _merge(["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run), *TINY, "--no-progress"], extra)
    _one_line_refusal(CliRunner().invoke(trainer_main, args), fragment)
    assert not (run / "config.json").exists() and not (run / "checkpoints").exists()


@pytest.mark.parametrize("extra, fragment", BUILD, ids=[" ".join(a) for a, _ in BUILD])
def test_build_refuses_in_one_line(tmp_path, extra, fragment):
    out = tmp_path / "set"
    args = _merge(["build", "--type", "bursty", "--example-type", "symbolic", "--symbolic-size", "40",
                   "--n-rare-classes", str(SPLIT.n_rare_classes), "--n-common-classes", str(SPLIT.n_common_classes),
                   "--n-holdout-classes", str(SPLIT.n_holdout_classes), "--num-seqs", "64", "--out", str(out),
                   "--quiet"], extra)
    _one_line_refusal(CliRunner().invoke(seqgen_main, args), fragment)
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("extra, fragment", EVAL, ids=[" ".join(a) for a, _ in EVAL])
def test_evaluate_refuses_in_one_line(sets, finished_run, extra, fragment):
    _, icl, _ = sets
    before = sorted(p.name for p in (finished_run / "evaluations").glob("*")) if (finished_run / "evaluations").exists() else []
    args = _merge(["evaluate", str(icl), "--run-dir", str(finished_run), "--max-seqs", "16", "--batch-size", "16"], extra)
    _one_line_refusal(CliRunner().invoke(trainer_main, args), fragment)
    after = sorted(p.name for p in (finished_run / "evaluations").glob("*")) if (finished_run / "evaluations").exists() else []
    assert after == before


@pytest.mark.parametrize("text, extra, fragment", SWEEPS, ids=[f"sweep{i}" for i in range(len(SWEEPS))])
def test_sweep_refuses_in_one_line(tmp_path, text, extra, fragment):
    path = _write(tmp_path, text, BASE)
    _one_line_refusal(CliRunner().invoke(trainer_main, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o"),
                                                        *extra]), fragment)
    assert not (tmp_path / "o").exists()


# ---- paths of every kind, to every command ----------------------------------------------------------------
def _path_kinds(root: Path, sets) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    kinds = {"missing": root / "nope", "a file": root / "file.txt", "an empty folder": root / "empty",
             "a broken link": root / "broken", "a link loop": root / "loop", "a folder of junk": root / "junk"}
    kinds["a file"].write_text("not a shard set\n")
    kinds["an empty folder"].mkdir()
    kinds["a folder of junk"].mkdir()
    (kinds["a folder of junk"] / "manifest.json").write_text("{not json")
    os.symlink(root / "does-not-exist", kinds["a broken link"])
    os.symlink(root / "loop", kinds["a link loop"])
    return kinds


PATH_KINDS = ["missing", "a file", "an empty folder", "a broken link", "a link loop", "a folder of junk"]
PATH_USES = ["fit --train", "fit --eval", "evaluate SET", "evaluate --run-dir", "plot RUN", "seqgen verify",
             "fit --config", "sweep FILE"]


@pytest.mark.parametrize("use", PATH_USES)
@pytest.mark.parametrize("kind", PATH_KINDS)
def test_every_kind_of_bad_path_is_named_as_it_is(sets, finished_run, tmp_path, use, kind):
    train, icl, _ = sets
    bad = _path_kinds(tmp_path / "paths", sets)[kind]
    run = tmp_path / "run"
    if use == "fit --train":
        cmd, args = trainer_main, ["fit", "--train", str(bad), "--eval", str(icl), "--run-dir", str(run), *TINY]
    elif use == "fit --eval":
        cmd, args = trainer_main, ["fit", "--train", str(train), "--eval", str(bad), "--run-dir", str(run), *TINY]
    elif use == "fit --config":
        cmd, args = trainer_main, ["fit", "--train", str(train), "--config", str(bad), "--run-dir", str(run), *TINY]
    elif use == "evaluate SET":
        cmd, args = trainer_main, ["evaluate", str(bad), "--run-dir", str(finished_run)]
    elif use == "evaluate --run-dir":
        cmd, args = trainer_main, ["evaluate", str(icl), "--run-dir", str(bad)]
    elif use == "plot RUN":
        cmd, args = trainer_main, ["plot", str(bad), "--out", str(tmp_path / "p.png")]
    elif use == "sweep FILE":
        cmd, args = trainer_main, ["sweep", str(bad), "--dry-run", "--out", str(tmp_path / "o")]
    else:
        cmd, args = seqgen_main, ["verify", str(bad)]
    _one_line_refusal(CliRunner().invoke(cmd, args), None)
    assert not (run / "config.json").exists() and not (tmp_path / "p.png").exists()


# ---- a fix named is a fix that works -----------------------------------------------------------------------
def test_the_fix_a_message_names_works(sets, tmp_path):
    """Messages that name an option or a command: applying it gets the command further (here: to done)."""
    train, icl, _ = sets
    run = tmp_path / "run"
    base = ["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run), *TINY, "--no-progress"]
    runner = CliRunner()
    # an evaluation-only set as --train: the message names the training set's role
    line = _one_line_refusal(runner.invoke(trainer_main, _merge(base, ["--train", str(icl)])), None)
    assert "--train" in line
    # the same set to train and to evaluate: refused, and --allow-train-eval (named) lets it through
    line = _one_line_refusal(runner.invoke(trainer_main, _merge(base, ["--eval", str(train)])), "--allow-train-eval")
    assert runner.invoke(trainer_main, [*_merge(base, ["--eval", str(train)]), "--allow-train-eval"]).exit_code == 0
    # the run now exists: fitting again is refused, and --resume (named) continues it
    line = _one_line_refusal(runner.invoke(trainer_main, _merge(base, ["--steps", "4"])), "--resume")
    result = runner.invoke(trainer_main, [*_merge(base, ["--steps", "4", "--eval", str(train)]), "--allow-train-eval",
                                          "--resume"])
    assert result.exit_code == 0, result.output
    # --resume where there is nothing to resume: the message names dropping it, which works
    fresh = _merge(base, ["--run-dir", str(tmp_path / "fresh")])
    line = _one_line_refusal(runner.invoke(trainer_main, [*fresh, "--resume"]), None)
    assert "--resume" in line
    assert runner.invoke(trainer_main, fresh).exit_code == 0


def test_the_probe_counts(request):
    """The size of the table above (the issue asked for at least 200 cases)."""
    n = len(FIT) + len(BUILD) + len(EVAL) + len(SWEEPS) + len(PATH_KINDS) * len(PATH_USES)
    print(f"\nbad-input probe: {n} cases")
    assert n >= 200
