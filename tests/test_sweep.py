"""`trainer sweep`: a tiny symbolic sweep end to end (interrupt, dry run, resume, skip, report), sharing of
shard sets, and one-line validation errors. The paper-scale sweep files are only parsed and planned."""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from seqgen.config import Labeling, SeqType
from seqgen.configio import ConfigError
from trainer.checkpoint import latest_step
from trainer.cli import main
from trainer.run import RunDir
from trainer.runtime.signals import GracefulInterrupt
from trainer.sweep import (
    RunAction, SetAction, config_hash, eval_config, load_sweep, make_plan, set_folder,
)
from trainer.sweep.execute import execute

REPO = Path(__file__).resolve().parents[1]

BASE = """
[seqgen]
shard_size = 256
[seqgen.dataset]
example_type = "symbolic"
symbolic_size = 40
[seqgen.split]
n_rare_classes = 30
n_common_classes = 5
n_holdout_classes = 5
[trainer.model]
example_encoding = "embedding"
emb_dim = 16
num_layers = 1
num_heads = 2
[trainer.optimizer]
warmup_steps = 2
[trainer.training]
steps = 6
batch_size = 8
log_every = 3
eval_every = 3
checkpoint_every = 3
eval_batch_size = 32
"""

SWEEP = """
# a test sweep
[sweep]
figure = "Fig. T"
claim = "tiny"
base = "base.toml"
x = "p_bursty"
train_seqs = 300
eval_seqs = 48

[[runs]]
name = "p0"
x = 0.0
[runs.seqgen.sequence]
p_bursty = 0.0

[[runs]]
name = "p1"
x = 1.0
[runs.seqgen.sequence]
p_bursty = 1.0
[runs.trainer.optimizer]
max_lr = 1e-3
"""


def _write(folder: Path, sweep: str = SWEEP, base: str = BASE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.toml").write_text(base)
    (folder / "sweep.toml").write_text(sweep)
    return folder / "sweep.toml"


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


class StopAfterCheckpoint(GracefulInterrupt):
    """Requests a stop once `run_dir` holds a checkpoint at `step` (as a Ctrl+C at that moment would)."""

    def __init__(self, run_dir: Path, step: int) -> None:
        super().__init__()
        self.run_dir, self.step = run_dir, step

    @property
    def stop_requested(self) -> bool:
        return super().stop_requested or latest_step(self.run_dir) == self.step


@pytest.fixture(scope="module")
def sweep_story(tmp_path_factory):
    """Interrupt run p0 at step 3, dry-run, rerun (resume p0, train p1), rerun again (all skipped)."""
    root = tmp_path_factory.mktemp("sweep")
    path = _write(root / "cfg")
    out, shards = root / "out", root / "shards"
    args = [str(path), "--out", str(out), "--shards-dir", str(shards), "--no-progress"]
    story: dict = {"root": root, "out": out, "shards": shards, "args": args, "path": path}

    plan = make_plan(load_sweep(path), out=out, shards_dir=shards)
    story["first_plan"] = plan
    p0 = out / "runs" / "p0"
    story["interrupted"] = execute(plan, command="trainer sweep test", progress=False,
                                   interrupt=StopAfterCheckpoint(p0, 3), echo=lambda _: None)
    story["after_interrupt_step"] = latest_step(p0)
    story["p1_started"] = (out / "runs" / "p1").exists()
    story["step3_mtime"] = (p0 / "checkpoints" / "step-3" / "state.eqx").stat().st_mtime_ns

    runner = CliRunner()
    before = _tree(root)
    story["dry"] = runner.invoke(main, ["sweep", *args, "--dry-run"])
    story["dry_changed"] = before != _tree(root)

    story["second"] = runner.invoke(main, ["sweep", *args])
    story["after_second"] = _tree(root)
    story["third"] = runner.invoke(main, ["sweep", *args])
    story["after_third"] = _tree(root)
    return story


def test_interrupted_run_is_resumed_not_restarted(sweep_story):
    s = sweep_story
    assert s["interrupted"].interrupted and s["interrupted"].trained == ()
    assert s["after_interrupt_step"] == 3
    assert not s["p1_started"]  # the sweep stopped at the interrupted run
    assert s["second"].exit_code == 0, s["second"].output
    assert "resume: p0 (x = 0.0) from step 3" in s["second"].output
    assert "train: p1" in s["second"].output
    p0 = s["out"] / "runs" / "p0"
    # a restart would have rewritten step-3; a resume only adds step-6
    assert (p0 / "checkpoints" / "step-3" / "state.eqx").stat().st_mtime_ns == s["step3_mtime"]
    assert latest_step(p0) == 6
    records = [json.loads(line) for line in (p0 / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [3, 6]  # once each: nothing redone


def test_dry_run_prints_plan_and_changes_nothing(sweep_story):
    dry = sweep_story["dry"]
    assert dry.exit_code == 0, dry.output
    assert not sweep_story["dry_changed"]
    lines = dry.output.splitlines()
    assert sum("set  reuse" in x for x in lines) == 4  # 2 training sets + 2 shared eval sets
    assert any("run  resume" in x and "p0" in x and "from step 3" in x for x in lines)
    assert any("run  train" in x and "p1" in x for x in lines)


def test_results_table_and_figures(sweep_story):
    out = sweep_story["out"]
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["p0", "p1"]
    assert [float(r["x"]) for r in rows] == [0.0, 1.0]
    for r in rows:
        assert r["steps"] == "6" and r["status"] == "done"
        for m in ("icl", "iwl"):
            lo, mean, hi = float(r[f"{m}_ci_lo"]), float(r[f"{m}_mean"]), float(r[f"{m}_ci_hi"])
            assert 0.0 <= lo <= mean <= hi <= 1.0
            assert r[f"{m}_n"] == "48"
    md = (out / "results.md").read_text()
    assert "Fig. T" in md and "tiny" in md
    assert f"`trainer sweep {sweep_story['path']} --out {out}" in md
    assert "Hardware: `" in md and "CpuDevice" in md and "(p0, p1)" in md
    assert sum(line.startswith("| p") for line in md.splitlines()) == 2
    for png in ("figure.png", "curves.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_rerun_skips_finished_runs_and_reuses_sets(sweep_story):
    s = sweep_story
    third = s["third"]
    assert third.exit_code == 0, third.output
    assert "run  skip" in third.output and "run  train" not in third.output and "resume" not in third.output
    assert "2 already finished" in third.output
    before, after = s["after_second"], s["after_third"]
    untouched = [k for k in before if k.startswith(("shards", "out/runs"))]
    assert untouched and any("checkpoints" in k for k in untouched)
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}


def test_eval_sets_are_shared_and_distinct_from_training(sweep_story):
    out = sweep_story["out"]
    data = [json.loads((out / "runs" / n / "config.json").read_text())["data"] for n in ("p0", "p1")]
    assert data[0]["train"]["path"] != data[1]["train"]["path"]  # p_bursty differs
    assert [e["path"] for e in data[0]["eval"]] == [e["path"] for e in data[1]["eval"]]  # p_bursty unused there
    plan = sweep_story["first_plan"]
    assert [s.action for s in plan.sets] == [SetAction.BUILD] * 4
    seeds = {s.cfg.seq_type: s.cfg.seed for s in plan.sets}
    assert seeds[SeqType.FEWSHOT_HOLDOUT] != seeds[SeqType.BURSTY]


def test_report_only_rebuilds_outputs(sweep_story):
    out = sweep_story["out"]
    (out / "results.csv").unlink()
    (out / "figure.png").unlink()
    before = {k: v for k, v in _tree(sweep_story["root"]).items() if "runs" in k or k.startswith("shards")}
    res = CliRunner().invoke(main, ["sweep", *sweep_story["args"], "--report-only"])
    assert res.exit_code == 0, res.output
    assert (out / "results.csv").is_file() and (out / "figure.png").stat().st_size > 0
    after = _tree(sweep_story["root"])
    assert {k: after[k] for k in before} == before


def test_finished_run_is_evaluated_on_new_eval_sets_not_retrained(sweep_story, tmp_path):
    out, shards = tmp_path / "out", tmp_path / "shards"
    shutil.copytree(sweep_story["out"], out)
    shutil.copytree(sweep_story["shards"], shards)
    path = _write(tmp_path / "cfg", SWEEP.replace("eval_seqs = 48", "eval_seqs = 40\neval_seed = 2"))
    ckpts = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("checkpoints/*/*")}
    res = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--shards-dir", str(shards),
                                    "--only", "p1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "run  evaluate" in res.output and "evaluate: p1 at step 6" in res.output and "train:" not in res.output
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts
    with (out / "results.csv").open() as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["p1"]["status"] == "done" and rows["p1"]["icl_n"] == "40" and rows["p1"]["iwl_n"] == "40"
    assert rows["p0"]["status"] == "not evaluated" and rows["p0"]["icl_mean"] == ""


def test_runs_differing_only_in_trainer_options_share_all_sets(tmp_path):
    sweep = SWEEP.replace("p_bursty = 0.0", "p_bursty = 1.0")
    path = _write(tmp_path / "cfg", sweep)
    plan = make_plan(load_sweep(path), out=tmp_path / "out", shards_dir=tmp_path / "shards")
    assert len(plan.sets) == 3
    assert plan.runs[0].train_dir == plan.runs[1].train_dir
    assert plan.runs[0].eval_dirs == plan.runs[1].eval_dirs
    assert [r.action for r in plan.runs] == [RunAction.TRAIN, RunAction.TRAIN]
    assert not (tmp_path / "out").exists() and not (tmp_path / "shards").exists()


def test_eval_config_keeps_what_the_type_reads(tmp_path):
    train = load_sweep(_write(tmp_path)).runs[1].train  # p_bursty 1.0
    fs = eval_config(train, SeqType.FEWSHOT_HOLDOUT, 10, 5)
    assert (fs.dataset, fs.split, fs.seed, fs.num_seqs, fs.shard_size) == (train.dataset, train.split, 5, 10, 256)
    assert fs.sequence.ways == train.sequence.ways and fs.sequence.p_bursty == 0.9  # unused: the default
    more_ways = replace(train, sequence=replace(train.sequence, ways=3, seq_len=10))
    assert config_hash(eval_config(more_ways, SeqType.FEWSHOT_HOLDOUT, 10, 5)) != config_hash(fs)
    noisy = replace(train, sequence=replace(train.sequence, labeling_common=Labeling.ORIGINAL))
    assert eval_config(noisy, SeqType.NO_SUPPORT_ZIPFIAN, 10, 5).sequence.labeling_common is Labeling.ORIGINAL
    assert set_folder("x", fs) == Path("x") / f"fewshot_holdout-{config_hash(fs)}"


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.replace('x = "p_bursty"', 'x = "p_bursty"\nstepz = 3'), "unknown key 'stepz'"),
    (lambda s: s.replace("p_bursty = 0.0", "p_burst = 0.0"), "unknown option 'sequence.p_burst'"),
    (lambda s: s.replace('base = "base.toml"', 'base = "nope.toml"'), "nope.toml not found"),
    (lambda s: s.replace('name = "p1"', 'name = "p0"'), "two runs are named 'p0'"),
    (lambda s: s.replace("train_seqs = 300", ""), "'train_seqs' is required"),
    (lambda s: s.replace("x = 0.0\n", "x = 0.0\n[runs.seqgen]\nseq_type = 'mixed'\n"), "seqgen.seq_type is set by"),
    (lambda s: s.replace("max_lr = 1e-3", "max_lr = -1.0"), "max_lr must be > 0"),
    (lambda s: s.replace("eval_seqs = 48", 'eval_seqs = 48\neval_types = ["fewshot_nowhere"]'), "eval_types"),
    (lambda s: s.replace("x = 1.0", "x = true"), "'x' must be a number or a string"),
    (lambda s: s + "\n[extra]\na = 1\n", "unknown key 'extra'"),
    (lambda s: s.replace("max_lr = 1e-3", "max_lr = 1e-3\n[runs.trainer.model]\nunroll_layers = true"),
     "unknown option 'trainer.model.unroll_layers'"),
])
def test_validation_errors_are_one_line(tmp_path, edit, needle):
    path = _write(tmp_path, edit(SWEEP))
    res = CliRunner().invoke(main, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    with pytest.raises(ConfigError):
        load_sweep(path)


def test_an_unknown_option_in_a_base_config_is_named_with_its_file(tmp_path):
    path = _write(tmp_path, base=BASE.replace("num_heads = 2", "num_heads = 2\nunroll_layers = true"))
    res = CliRunner().invoke(main, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "base config" in res.output and "base.toml" in res.output and "model.unroll_layers'" in res.output


def test_unknown_only_name_and_foreign_run_dir(tmp_path):
    path = _write(tmp_path / "cfg")
    runner = CliRunner()
    res = runner.invoke(main, ["sweep", str(path), "--dry-run", "--only", "p7", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "--only p7" in res.output and "p0, p1" in res.output
    run_dir = tmp_path / "o" / "runs" / "p0"
    run_dir.mkdir(parents=True)
    trainer = load_sweep(path).runs[0].trainer.to_dict()
    trainer["training"]["batch_size"] = 4
    (run_dir / "config.json").write_text(json.dumps({"trainer": trainer, "data": {"train": {"path": "x", "fingerprint": "x"}}}))
    res = runner.invoke(main, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o"),
                               "--shards-dir", str(tmp_path / "s")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "training.batch_size" in res.output


SWEEP_FILES = sorted((REPO / "configs" / "sweeps").glob("*.toml"))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=[p.stem for p in SWEEP_FILES])
def test_paper_sweep_files_load_and_plan(path, tmp_path):
    if not (REPO / "configs" / "cpu.toml").is_file():
        pytest.skip("configs/cpu.toml (the CPU preset the sweeps build on) is not there yet")
    sweep = load_sweep(path)
    assert path.read_text().lstrip().startswith("#")  # the header comment names figure and claim
    assert sweep.figure and sweep.claim
    # a comparison at least: two runs, or one run whose checks compare it with numbers fixed beforehand
    assert len(sweep.runs) >= 2 or (sweep.checks and all(not isinstance(c.than, str) for c in sweep.checks))
    if sweep.figure.startswith("Chan et al. 2022"):  # the paper's figures: three or more settings or seeds
        assert len(sweep.runs) >= 3
    assert sweep.eval_seqs >= 2000
    plan = make_plan(sweep, out=tmp_path / "o", shards_dir=tmp_path / "s")
    assert len(plan.runs) == len(sweep.runs) and not os.listdir(tmp_path)


def test_published_run_without_checkpoints_is_skipped_not_retrained(sweep_story, tmp_path):
    """A results folder (config.json + metrics.jsonl, no checkpoints) copied back counts as finished; asked
    for evaluation sets it has not seen, it is refused in one line (nothing to evaluate), not retrained."""
    out = tmp_path / "out"
    shutil.copytree(sweep_story["out"] / "runs", out / "runs")
    for ckpts in (out / "runs").glob("*/checkpoints"):
        shutil.rmtree(ckpts)
    args = ["--out", str(out), "--shards-dir", str(sweep_story["shards"]), "--no-progress"]
    res = CliRunner().invoke(main, ["sweep", str(sweep_story["path"]), *args])
    assert res.exit_code == 0, res.output
    assert "2 already finished" in res.output and "train:" not in res.output
    assert not any((out / "runs").glob("*/checkpoints"))
    path = _write(tmp_path / "cfg", SWEEP.replace("eval_seqs = 48", "eval_seqs = 40\neval_seed = 2"))
    res = CliRunner().invoke(main, ["sweep", str(path), *args, "--dry-run"])
    assert res.exit_code != 0 and "has no checkpoints to evaluate on" in res.output
    assert "Traceback" not in res.output


def test_fresh_clone_continues_from_the_published_results(sweep_story, tmp_path):
    """No run directories (a fresh clone), a results folder that holds finished runs (no checkpoints): they
    are skipped, the report is rebuilt from them; a published run of other trainer options is refused."""
    results = tmp_path / "results"
    shutil.copytree(sweep_story["out"] / "runs", results / "runs", ignore=shutil.ignore_patterns("checkpoints"))
    fresh = tmp_path / "fresh"
    args = ["--out", str(fresh), "--results", str(results), "--shards-dir", str(sweep_story["shards"]),
            "--no-progress"]
    dry = CliRunner().invoke(main, ["sweep", str(sweep_story["path"]), *args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.count("(published; no run directory)") == 2 and "run  train" not in dry.output
    res = CliRunner().invoke(main, ["sweep", str(sweep_story["path"]), *args])
    assert res.exit_code == 0, res.output
    assert "2 already finished" in res.output and "train:" not in res.output
    assert not (fresh / "runs").exists()
    with (results / "results.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done", "done"]
    empty = ["--out", str(fresh), "--results", str(results), "--shards-dir", str(tmp_path / "no-sets"),
             "--no-progress"]  # skipped runs read no shard set: none is planned, built or needed
    res = CliRunner().invoke(main, ["sweep", str(sweep_story["path"]), *empty])
    assert res.exit_code == 0 and "  set  " not in res.output and "build:" not in res.output, res.output
    assert not (tmp_path / "no-sets").exists() and "2 already finished" in res.output
    (results / "runs" / "p1" / "metrics.jsonl").unlink()  # p1 not finished there: it trains
    dry = CliRunner().invoke(main, ["sweep", str(sweep_story["path"]), *empty, "--dry-run"])
    p1 = json.loads((results / "runs" / "p1" / "config.json").read_text())["data"]
    wanted = {Path(p1["train"]["path"]).name} | {Path(e["path"]).name for e in p1["eval"]}
    planned = {Path(line.split()[2]).name for line in dry.output.splitlines() if line.startswith("  set  ")}
    assert dry.exit_code == 0 and planned == wanted, dry.output  # p1's sets only, not p0's training set
    dry = CliRunner().invoke(main, ["sweep", str(sweep_story["path"]), *args, "--dry-run"])
    assert dry.exit_code == 0 and "run  train        " + str(fresh / "runs" / "p1") in dry.output, dry.output
    other = _write(tmp_path / "cfg", SWEEP.replace(
        'name = "p0"\nx = 0.0', 'name = "p0"\nx = 0.0\n[runs.trainer.optimizer]\nmax_lr = 5e-4'))
    bad = CliRunner().invoke(main, ["sweep", str(other), *args, "--dry-run"])
    assert bad.exit_code != 0 and "was trained with trainer options" in bad.output
    assert "choose another --results" in bad.output and "Traceback" not in bad.output


def test_final_evaluations_read_whole_sets_when_training_evaluates_fewer(tmp_path):
    """A sweep whose runs evaluate 16 sequences per set while training scores each finished run once more on
    its whole sets (48): the report and the checks read those, and a rerun has nothing left to do."""
    sweep = SWEEP.replace('eval_seqs = 48\n', 'eval_seqs = 48\n\n[trainer.training]\neval_seqs = 16\n', 1)
    path = _write(tmp_path / "cfg", sweep)
    args = [str(path), "--out", str(tmp_path / "out"), "--shards-dir", str(tmp_path / "shards"), "--no-progress"]
    first = CliRunner().invoke(main, ["sweep", *args])
    assert first.exit_code == 0, first.output
    assert "evaluate: p0 at step 6" in first.output and "evaluate: p1 at step 6" in first.output
    for name in ("p0", "p1"):
        run = RunDir(tmp_path / "out" / "runs" / name)
        at_end = [e for e in run.evaluations(6)]
        assert sorted((e.source, e.seqs) for e in at_end if e.set.startswith("fewshot")) == [("evaluate", 48), ("fit", 16)]
        final = run.final_evaluations(6, [e.set for e in at_end])
        assert all(m["accuracy_closed"]["n"] == 48 for m in final.values())
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["icl_n"] == r["iwl_n"] == "48" for r in rows), rows
    again = CliRunner().invoke(main, ["sweep", *args])
    assert again.exit_code == 0 and "evaluate:" not in again.output and "train:" not in again.output, again.output
