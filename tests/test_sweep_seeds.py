"""Seeds as a sweep dimension, the results folder, claims as checks, and `--jobs` worker processes, on tiny
symbolic sweeps (seconds of training). The verdict logic itself is tested on hand-made numbers too."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from seqgen.configio import ConfigError
from trainer.checkpoint import latest_step
from trainer.cli import main
from trainer.runtime.signals import GracefulInterrupt
from trainer.sweep import (
    CheckSpec, Verdict, evaluate_check, load_sweep, make_plan,
)
from trainer.sweep.execute import execute
from trainer.sweep.execute import cpu_groups
from trainer.runtime.platform import cpu_model

from tests.procs import children, kill_all, still_alive_after
from tests.test_sweep import BASE, REPO, _write as _write_files

SWEEP = """
# a seeded test sweep
[sweep]
figure = "Fig. S"
claim = "tiny, seeded"
base = "base.toml"
x = "p_bursty"
train_seqs = 300
eval_seqs = 48
seeds = [3, 4]
deviations = ["tiny symbolic data"]

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

[[checks]]
claim = "accuracies are at least -1"
metric = "icl"
run = "p1"
compare = "greater"
than = -1.0

[[checks]]
claim = "accuracies are below -1"
metric = "iwl"
run = "p0"
compare = "less"
than = -1.0
"""


def _write(folder: Path, sweep: str = SWEEP, base: str = BASE) -> Path:
    return _write_files(folder, sweep, base)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {r["name"]: r for r in csv.DictReader(f)}


# ---- the verdicts, on hand-made numbers -------------------------------------------------------------
def _check(compare: str, than, margin: float = 0.0, tolerance: float | None = None) -> CheckSpec:
    return CheckSpec("c", "icl", "a", compare, than, margin, tolerance)


@pytest.mark.parametrize("compare, a, b, margin, verdict", [
    ("greater", [0.8, 0.7, 0.9], [0.5, 0.5, 0.6], 0.1, Verdict.PASS),
    ("greater", [0.8, 0.7, 0.9], [0.75, 0.65, 0.85], 0.1, Verdict.FAIL),  # every seed holds, the margin is short
    ("greater", [0.4, 0.5, 0.3], [0.5, 0.6, 0.6], 0.0, Verdict.FAIL),  # no seed holds
    ("greater", [0.8, 0.4, 0.9], [0.5, 0.5, 0.5], 0.0, Verdict.INCONCLUSIVE),  # the seeds disagree
    ("greater", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 0.0, Verdict.FAIL),  # equal is not greater
    ("less", [0.1, 0.2, 0.0], [0.4, 0.4, 0.4], 0.2, Verdict.PASS),
    ("less", [0.3, 0.35, 0.3], [0.4, 0.4, 0.4], 0.2, Verdict.FAIL),
    ("less", [0.5, 0.2, 0.3], [0.4, 0.4, 0.4], 0.0, Verdict.INCONCLUSIVE),
])
def test_greater_and_less_against_another_run(compare, a, b, margin, verdict):
    finals = {"a": dict(enumerate(a)), "b": dict(enumerate(b))}
    res = evaluate_check(_check(compare, "b", margin), finals, [0, 1, 2])
    assert res.verdict is verdict, res.detail
    assert res.left == dict(enumerate(a)) and res.right == dict(enumerate(b))
    assert f"{sum(x > y if compare == 'greater' else x < y for x, y in zip(a, b))}/3 seeds hold" in res.detail


@pytest.mark.parametrize("values, verdict", [
    ([0.51, 0.49, 0.53], Verdict.PASS), ([0.7, 0.8, 0.9], Verdict.FAIL), ([0.52, 0.7, 0.5], Verdict.INCONCLUSIVE),
])
def test_near_a_number(values, verdict):
    res = evaluate_check(_check("near", 0.5, tolerance=0.05), {"a": dict(enumerate(values))}, [0, 1, 2])
    assert res.verdict is verdict and res.right == {0: 0.5, 1: 0.5, 2: 0.5}
    assert res.spec.describe() == "icl(a) within 0.05 of 0.5 in every seed"  # no '|': it goes into tables


def test_pending_until_every_seed_is_evaluated_and_single_seed_sweeps():
    res = evaluate_check(_check("greater", "b"), {"a": {0: 0.9, 1: 0.9}, "b": {0: 0.5}}, [0, 1])
    assert res.verdict is Verdict.PENDING and "seed(s) 1" in res.detail
    one = evaluate_check(_check("greater", "b"), {"a": {None: 0.9}, "b": {None: 0.5}}, [None])
    assert one.verdict is Verdict.PASS and one.left == {None: 0.9}


@pytest.mark.parametrize("metric, than_metric, mode", [
    ("ablated_icl_min", None, "zero"), ("mean_ablated_icl_min", None, "mean"),
    ("ablated_icl_min", "mean_ablated_icl_min", "both"), ("induction_max", None, None),
])
def test_pending_analysis_names_the_ablation_it_needs(metric, than_metric, mode):
    spec = CheckSpec("c", metric, "a", "less", "b", than_metric=than_metric)
    res = evaluate_check(spec, {"a": {0: 0.6}, "b": {}}, [0])
    assert res.verdict is Verdict.PENDING and "trainer analyze RUN_DIR" in res.detail
    assert ("--ablation" not in res.detail) if mode is None else (f"--ablation {mode}`" in res.detail)


# ---- sweep files with seeds and checks --------------------------------------------------------------
def test_seeds_expand_runs_and_share_eval_sets(tmp_path):
    sweep = load_sweep(_write(tmp_path))
    assert sweep.settings == ("p0", "p1") and sweep.seeds == (3, 4)
    assert [r.name for r in sweep.runs] == ["p0/seed-3", "p0/seed-4", "p1/seed-3", "p1/seed-4"]
    for r in sweep.runs:
        assert r.train.seed == r.seed and r.trainer.training.seed == r.seed
    plan = make_plan(sweep, out=tmp_path / "out", shards_dir=tmp_path / "shards")
    assert len({r.train_dir for r in plan.runs}) == 4  # one training set per setting and seed
    assert len({r.eval_dirs for r in plan.runs}) == 1  # every seed scored on the same sequences
    assert plan.runs[0].run_dir == tmp_path / "out" / "runs" / "p0" / "seed-3"
    only = make_plan(sweep, out=tmp_path / "out", shards_dir=tmp_path / "shards", only=["p1", "p0/seed-4"])
    assert [r.spec.name for r in only.runs] == ["p0/seed-4", "p1/seed-3", "p1/seed-4"]
    assert [c.describe() for c in sweep.checks] == ["icl(p1) > -1 in every seed", "iwl(p0) < -1 in every seed"]


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.replace("p_bursty = 0.0", "p_bursty = 0.0\n[runs.seqgen]\nseed = 5"), "seqgen.seed is set by [sweep] seeds"),
    (lambda s: s.replace("seeds = [3, 4]", "seeds = [3, 3]"), "seeds lists a seed twice"),
    (lambda s: s.replace("seeds = [3, 4]", "seeds = []"), "seeds must be a non-empty list"),
    (lambda s: s.replace('metric = "icl"', 'metric = "loss"'), "metric 'loss' is not measured"),
    (lambda s: s.replace('run = "p1"', 'run = "p9"'), "run 'p9' is not in this sweep"),
    (lambda s: s.replace('compare = "greater"', 'compare = "bigger"'), "compare must be one of"),
    (lambda s: s.replace('compare = "greater"', 'compare = ["greater"]'), "compare must be one of"),
    (lambda s: s.replace("than = -1.0\n\n", 'than = "p7"\n\n', 1), "than 'p7' is neither a run"),
    (lambda s: s.replace("than = -1.0\n\n", "than = -1.0\ntolerance = 0.1\n\n", 1), "takes 'margin', not 'tolerance'"),
    (lambda s: s.replace("than = -1.0\n\n", "than = nan\n\n", 1), "'than' must be a finite number"),
    (lambda s: s.replace('claim = "accuracies are at least -1"\n', ""), "'claim' is required"),
    (lambda s: s + '\n[[checks]]\nclaim = "x"\nmetric = "icl"\nrun = "p0"\ncompare = "near"\nthan = 0.5\n',
     "compare = near needs 'tolerance'"),
    (lambda s: s + '\n[[checks]]\nclaim = "x"\nmetric = "icl"\nrun = "p0"\ncompare = "near"\nthan = 0.5\nmargin = 0.1\n',
     "compare = near takes 'tolerance', not 'margin'"),
    (lambda s: s.replace("than = -1.0\n\n", 'than = "p1"\n\n', 1), "a run compared with itself on one metric"),
    (lambda s: s.replace("than = -1.0\n\n", 'than = -1.0\nthan_metric = "iwl"\n\n', 1),
     "'than_metric' needs 'than' to name a run"),
    (lambda s: s.replace("than = -1.0\n\n", 'than = "p0"\nthan_metric = "induction"\n\n', 1),
     "than_metric 'induction' is not measured"),
    (lambda s: s.replace('metric = "icl"', 'metric = ["icl"]'), "metric ['icl'] is not measured"),
])
def test_seed_and_check_errors_are_one_line(tmp_path, edit, needle):
    path = _write(tmp_path, edit(SWEEP))
    res = CliRunner().invoke(main, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    with pytest.raises(ConfigError):
        load_sweep(path)


# ---- a seeded sweep end to end, in this process and in --jobs workers -------------------------------
@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeded")
    path = _write(root / "cfg")
    out, shards, results = root / "out", root / "shards", root / "results"
    args = [str(path), "--out", str(out), "--results", str(results), "--shards-dir", str(shards), "--no-progress"]
    res = CliRunner().invoke(main, ["sweep", *args, "--check"])
    return {"root": root, "path": path, "out": out, "shards": shards, "results": results, "args": args, "res": res}


def test_seeded_sweep_writes_runs_per_seed_and_a_results_folder(seeded):
    res, out, results = seeded["res"], seeded["out"], seeded["results"]
    # check 2 is FAIL by construction, so --check exits 1 after a complete sweep
    assert res.exit_code == 1, res.output
    assert "done: 4 runs trained" in res.output
    assert "PASS         accuracies are at least -1" in res.output and "FAIL         accuracies are below -1" in res.output
    for name in ("p0/seed-3", "p0/seed-4", "p1/seed-3", "p1/seed-4"):
        assert latest_step(out / "runs" / name) == 6
        published = results / "runs" / name
        assert sorted(p.name for p in published.iterdir()) == ["config.json", "metrics.jsonl", "provenance.json"]
        assert (published / "metrics.jsonl").read_bytes() == (out / "runs" / name / "metrics.jsonl").read_bytes()
    assert not list(results.rglob("checkpoints")) and not list(results.rglob("*.eqx"))
    rows = _rows(results / "results.csv")
    assert list(rows) == ["p0/seed-3", "p0/seed-4", "p1/seed-3", "p1/seed-4"]
    assert {(r["setting"], r["seed"], r["status"]) for r in rows.values()} == {
        ("p0", "3", "done"), ("p0", "4", "done"), ("p1", "3", "done"), ("p1", "4", "done")}
    assert all(float(r["wall_s"]) > 0 for r in rows.values())
    prov = {n: json.loads((results / "runs" / n / "provenance.json").read_text()) for n in rows}
    assert all(p["segments"][0]["commit"] and p["segments"][0]["wall_s"] > 0 for p in prov.values())
    import jax
    for p in prov.values():  # which CPU and which library versions each segment ran on
        assert cpu_model() in p["segments"][0]["hardware"]
        assert p["segments"][0]["versions"]["jax"] == jax.__version__


def test_cpu_model_names_the_model_and_widest_simd_extension():
    intel = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu sse4_2 avx avx2 avx512f\n" \
            "processor\t: 1\nmodel name\t: Other\n"
    assert cpu_model(intel) == "Intel(R) Xeon(R) Processor, avx512f"
    amd = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse4_2 avx avx2\n"
    assert cpu_model(amd) == "AMD EPYC 7B13, avx2"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm\nCPU implementer\t: 0x41\n"
    assert cpu_model(arm).endswith(", asimd") and cpu_model(arm) != ", asimd"
    assert cpu_model("") and ", " not in cpu_model("")  # unreadable: the platform's name, no extension


def test_summary_is_the_mean_and_spread_over_seeds(seeded):
    rows = _rows(seeded["results"] / "results.csv")
    with (seeded["results"] / "summary.csv").open() as f:
        summary = {r["setting"]: r for r in csv.DictReader(f)}
    for setting in ("p0", "p1"):
        s = summary[setting]
        assert s["seeds_done"] == "2"
        for c in ("icl", "iwl"):
            vals = [float(rows[f"{setting}/seed-{k}"][f"{c}_mean"]) for k in (3, 4)]
            assert float(s[f"{c}_mean"]) == pytest.approx(sum(vals) / 2, abs=1e-4)
            assert float(s[f"{c}_min"]) == pytest.approx(min(vals), abs=1e-4)
            assert float(s[f"{c}_max"]) == pytest.approx(max(vals), abs=1e-4)
            assert float(s[f"{c}_std"]) == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5, abs=1e-4)
    md = (seeded["results"] / "results.md").read_text()
    assert "## Checks" in md and "| PASS | accuracies are at least -1 |" in md and "| FAIL | accuracies are below -1 |" in md
    assert "Deviations from the paper: tiny symbolic data." in md and "ICL ceiling:" in md and "seeds 3, 4" in md
    assert "Code at commit: `" in md and "## Settings" in md
    for png in ("figure.png", "curves.png"):
        assert (seeded["results"] / png).read_bytes().startswith(b"\x89PNG")


def test_report_and_checks_rebuild_from_the_results_folder_alone(seeded, tmp_path):
    """Copy only the results folder (as committed), delete runs and shards: the report and every verdict
    come back, INCONCLUSIVE included (a threshold between the two seeds' values)."""
    results = tmp_path / "results"
    shutil.copytree(seeded["results"], results)
    rows = _rows(results / "results.csv")
    column = next(c for c in ("icl", "iwl") if rows["p1/seed-3"][f"{c}_mean"] != rows["p1/seed-4"][f"{c}_mean"])
    mid = (float(rows["p1/seed-3"][f"{column}_mean"]) + float(rows["p1/seed-4"][f"{column}_mean"])) / 2
    sweep = SWEEP + (f'\n[[checks]]\nclaim = "the seeds disagree"\nmetric = "{column}"\nrun = "p1"\n'
                     f'compare = "greater"\nthan = {mid}\n')
    path = _write(tmp_path / "cfg", sweep)
    (results / "results.md").unlink()
    res = CliRunner().invoke(main, ["sweep", str(path), "--results", str(results), "--report-only", "--check"])
    assert res.exit_code == 1, res.output  # one FAIL
    assert "1 PASS, 1 FAIL, 1 INCONCLUSIVE" in res.output and "INCONCLUSIVE the seeds disagree" in res.output
    assert "| INCONCLUSIVE | the seeds disagree |" in (results / "results.md").read_text()
    passing = _write(tmp_path / "cfg2", SWEEP.replace("than = -1.0\n", "than = 2.0\n").replace(
        'compare = "greater"\nthan = 2.0', 'compare = "less"\nthan = 2.0'))
    ok = CliRunner().invoke(main, ["sweep", str(passing), "--results", str(results), "--report-only", "--check"])
    assert ok.exit_code == 0 and "2 PASS" in ok.output, ok.output


ANALYSIS_CHECKS = """
[[checks]]
claim = "ablating one head lowers ICL"
metric = "ablated_icl_min"
run = "p1"
compare = "less"
than = "p1"
than_metric = "analysis_icl"
margin = 0.2

[[checks]]
claim = "an induction head forms with bursty data only"
metric = "induction_max"
run = "p1"
compare = "greater"
than = "p0"
"""


def _analysis_record(run_dir: Path, step: int, icl: float, ablated: list[list[float]] | None,
                     induction: list[list[float]]) -> dict:
    """An analysis.jsonl line as `trainer analyze` writes it, on the run's fewshot_holdout eval set."""
    evals = json.loads((run_dir / "config.json").read_text())["data"]["eval"]
    name = Path(next(e["path"] for e in evals if e["seq_type"] == "fewshot_holdout")).name
    rec = {"step": step, "set": name, "seq_type": "fewshot_holdout", "n": 48, "accuracy_closed": icl,
           "accuracy_query": 0.1, "num_layers": 1, "num_heads": 2, "induction": induction,
           "prev_token": [[0.0, 0.1]]}
    if ablated is not None:
        rec["ablation"] = {"zero": {"accuracy_closed": ablated, "accuracy_query": ablated}}
    return rec


def _write_analysis(run_dir: Path, records: list[dict]) -> None:
    (run_dir / "analysis.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_checks_read_the_analysis_of_the_final_checkpoint(seeded, tmp_path):
    """Check metrics from analysis.jsonl (trainer analyze): PENDING without an analysis of the final step
    (an earlier step does not count); `than_metric` compares two metrics of one run, seed by seed."""
    results = tmp_path / "results"
    shutil.copytree(seeded["results"], results)
    path = _write(tmp_path / "cfg", SWEEP + ANALYSIS_CHECKS)
    runs = results / "runs"

    def report():
        return CliRunner().invoke(main, ["sweep", str(path), "--results", str(results), "--report-only", "--check"])

    res = report()
    assert res.exit_code == 1 and "2 PENDING" in res.output and "trainer analyze" in res.output, res.output
    for seed, (icl, low) in {3: (0.9, 0.5), 4: (0.8, 0.55)}.items():
        run = runs / "p1" / f"seed-{seed}"
        _write_analysis(run, [_analysis_record(run, 3, icl, [[low, icl]], [[0.1, 0.2]]),  # not the final step
                              _analysis_record(run, 6, icl, [[icl, low]], [[0.6, 0.3]])])
        p0 = runs / "p0" / f"seed-{seed}"
        _write_analysis(p0, [_analysis_record(p0, 3, 0.5, None, [[0.0, 0.05]])])
    res = report()
    assert "PASS         ablating one head lowers ICL" in res.output, res.output
    assert "ablated_icl_min(p1) < analysis_icl(p1) in every seed, by >= 0.2 on the mean" in res.output
    assert "3: 0.500 vs 0.900; 4: 0.550 vs 0.800" in res.output
    assert "PENDING      an induction head forms" in res.output  # p0 is analysed at step 3 only
    for seed in (3, 4):
        p0 = runs / "p0" / f"seed-{seed}"
        _write_analysis(p0, [_analysis_record(p0, 6, 0.5, None, [[0.0, 0.05 * seed]])])
    res = report()
    assert "PASS         an induction head forms" in res.output and "3: 0.600 vs 0.150; 4: 0.600 vs 0.200" in res.output
    p0 = runs / "p0" / "seed-3"
    _write_analysis(p0, [_analysis_record(p0, 6, 0.5, None, [[0.0]])])  # a grid of the wrong shape
    bad = report()
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "not a 1 x 2 grid" in bad.output, bad.output
    (p0 / "analysis.jsonl").write_text('{"step": 6}\n')
    bad = report()
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "analysis.jsonl" in bad.output, bad.output
    plain = _write(tmp_path / "plain", SWEEP)  # no check reads the analysis: its files are not read
    res = CliRunner().invoke(main, ["sweep", str(plain), "--results", str(results), "--report-only", "--check"])
    assert res.exit_code == 1 and "1 PASS, 1 FAIL" in res.output, res.output


def test_checks_are_pending_until_runs_are_evaluated(tmp_path):
    path = _write(tmp_path / "cfg")
    (tmp_path / "results" / "runs").mkdir(parents=True)
    res = CliRunner().invoke(main, ["sweep", str(path), "--results", str(tmp_path / "results"), "--report-only",
                                    "--check"])
    assert res.exit_code == 1 and "2 PENDING" in res.output, res.output


class StopWhenStarted(GracefulInterrupt):
    """Requests a stop (as Ctrl+C would) once both workers have started (their logs name their cores)."""

    def __init__(self, logs: list[Path]) -> None:
        super().__init__()
        self.logs = logs

    @property
    def stop_requested(self) -> bool:
        return super().stop_requested or all(p.is_file() and "worker: cpus" in p.read_text() for p in self.logs)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--jobs 2 needs two CPU cores")
def test_jobs_train_in_pinned_workers_resume_after_a_stop_and_match_in_process_runs(seeded, tmp_path):
    """--jobs 2 over 3 runs: two worker processes, one core each; a stop reaches both (each exits 130, none
    counts as failed), the third run is never started and the sweep ends instead of waiting for it; the
    rerun finishes all three; final metrics equal the in-process runs' up to float round-off."""
    path = seeded["path"]
    out, results = tmp_path / "out", tmp_path / "results"
    only = ["p0", "p1/seed-3"]
    plan = make_plan(load_sweep(path), out=out, shards_dir=seeded["shards"], only=only)
    logs = [out / "logs" / "p0" / f"seed-{s}.log" for s in (3, 4)]
    said: list[str] = []
    first = execute(plan, command="t", results=results, jobs=2, progress=False,
                    interrupt=StopWhenStarted(logs), echo=said.append)
    assert first.interrupted and not first.failed and not first.trained, said
    assert sum(x.startswith("stopped: p0/seed-") for x in said) == 2, said
    assert not (out / "logs" / "p1").exists() and not any("p1/seed-3" in x for x in said), said
    res = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--results", str(results),
                                    "--shards-dir", str(seeded["shards"]), "--only", "p0", "--only", "p1/seed-3",
                                    "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "done: 3 runs trained" in res.output
    cpus = {line for p in logs for line in p.read_text().splitlines() if line.startswith("worker: cpus")}
    assert cpus == {"worker: cpus [0]", "worker: cpus [1]"}, cpus
    mine, theirs = _rows(results / "results.csv"), _rows(seeded["results"] / "results.csv")
    train = lambda d: [json.loads(x)["metrics"]["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()
                       if json.loads(x)["kind"] == "train"]
    for name in ("p0/seed-3", "p0/seed-4", "p1/seed-3"):
        assert mine[name]["status"] == "done"
        for c in ("icl", "iwl"):
            assert float(mine[name][f"{c}_mean"]) == pytest.approx(float(theirs[name][f"{c}_mean"]), abs=0.03)
        assert train(out / "runs" / name) == pytest.approx(train(seeded["out"] / "runs" / name), rel=1e-4)
    too_many = CliRunner().invoke(main, ["sweep", str(path), "--out", str(out), "--shards-dir", str(seeded["shards"]),
                                         "--jobs", str(len(os.sched_getaffinity(0)) + 1)])
    assert too_many.exit_code == 2 and "exceeds the" in too_many.output.splitlines()[-1]


def test_cpu_groups_split_the_cores():
    assert cpu_groups(2, [0, 1, 2, 3]) == [[0, 2], [1, 3]]
    assert cpu_groups(1, [5, 3]) == [[3, 5]]
    from trainer.sweep import SweepError

    with pytest.raises(SweepError, match="--jobs 3 exceeds the 2 CPU cores"):
        cpu_groups(3, [0, 1])


def test_claims_page_block_is_rebuilt_from_results_folders(seeded, tmp_path):
    from trainer.sweep.page import BEGIN, END

    shutil.copytree(seeded["results"], tmp_path / "res" / "sweep")
    page = tmp_path / "results.md"
    page.write_text(f"# hand-written head\n\n{BEGIN}\nstale\n{END}\n\nhand-written tail\n")
    res = CliRunner().invoke(main, ["claims", str(seeded["path"]), "--results-root", str(tmp_path / "res"),
                                    "--write", str(page)])
    assert res.exit_code == 1, res.output  # one FAIL among the checks
    text = page.read_text()
    assert text.startswith("# hand-written head") and text.rstrip().endswith("hand-written tail")
    assert "stale" not in text and "| **PASS** |" in text and "| **FAIL** |" in text
    assert f"`trainer sweep {seeded['path']} --report-only --check`" in text
    missing = CliRunner().invoke(main, ["claims", str(seeded["path"]), "--results-root", str(tmp_path / "none")])
    assert missing.exit_code == 0 and missing.output.count("**PENDING**") == 2, missing.output
    bad = tmp_path / "bad.md"
    bad.write_text("no markers\n")
    res = CliRunner().invoke(main, ["claims", str(seeded["path"]), "--results-root", str(tmp_path / "res"),
                                    "--write", str(bad)])
    assert res.exit_code == 2 and res.output.startswith("error: the page has no claims block")


def test_vectorized_groups_in_a_sweep_match_runs_trained_alone(seeded, tmp_path):
    """--group 2: the two seeds of a setting train as one vectorized group (trainer.group), each into its
    own ordinary run directory; results equal the one-by-one runs up to float round-off."""
    out, results = tmp_path / "out", tmp_path / "results"
    said: list[str] = []
    plan = make_plan(load_sweep(seeded["path"]), out=out, shards_dir=seeded["shards"], only=["p1"])
    outcome = execute(plan, command="t", results=results, jobs=1, group=2, progress=False, echo=said.append)
    assert outcome.trained == ("p1/seed-3", "p1/seed-4") and not outcome.interrupted, said
    assert any("as one vectorized group" in x for x in said), said
    mine, theirs = _rows(results / "results.csv"), _rows(seeded["results"] / "results.csv")
    for name in ("p1/seed-3", "p1/seed-4"):
        assert latest_step(out / "runs" / name) == 6 and mine[name]["status"] == "done"
        for c in ("icl", "iwl"):
            assert float(mine[name][f"{c}_mean"]) == pytest.approx(float(theirs[name][f"{c}_mean"]), abs=0.03)
        seg = json.loads((results / "runs" / name / "provenance.json").read_text())["segments"][0]
        assert seg["group"] == 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not Path("/proc/self/stat").exists(),
                    reason="--jobs 2 needs two CPU cores, and the test reads /proc")
def test_sigterm_to_a_jobs_sweep_stops_its_workers_with_their_progress_saved(seeded, tmp_path):
    """A real SIGTERM (as `kill` / `pkill` send) to `trainer sweep --jobs 2`: the sweep forwards the stop to
    both worker processes, which save and exit; the sweep exits 130 and no worker outlives it."""
    long = BASE.replace("steps = 6", "steps = 100000").replace("checkpoint_every = 3", "checkpoint_every = 50000")
    path = _write(tmp_path / "cfg", base=long)
    out = tmp_path / "out"
    logs = [out / "logs" / "p0" / f"seed-{s}.log" for s in (3, 4)]
    cmd = [sys.executable, "-m", "trainer.cli", "sweep", str(path), "--out", str(out), "--results",
           str(tmp_path / "results"), "--shards-dir", str(seeded["shards"]), "--only", "p0", "--jobs", "2",
           "--no-progress"]
    parent = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and parent.poll() is None and not all(
                (out / "runs" / "p0" / f"seed-{s}" / "metrics.jsonl").is_file() for s in (3, 4)):
            time.sleep(0.2)  # both workers are training (each has logged a step)
        workers = children(parent.pid)
        assert len(workers) == 2 and parent.poll() is None, [p.read_text() for p in logs if p.is_file()]
        parent.send_signal(signal.SIGTERM)
        output, _ = parent.communicate(timeout=120)
        assert not still_alive_after(workers, 20), output
        assert parent.returncode == 130, output
        assert sum(line.startswith("stopped: p0/seed-") for line in output.splitlines()) == 2, output
        for s in (3, 4):
            assert latest_step(out / "runs" / "p0" / f"seed-{s}") > 0  # the stop saved a checkpoint
    finally:
        parent.kill()
        kill_all(workers)


@pytest.mark.parametrize("figure, expected", [
    ("burstiness", {0.95: "ICL ceiling"}),
    ("num_classes", {0.95: "ICL ceiling 0.950 (10 holdout classes)", 0.99375: "ICL ceiling 0.994 (80 holdout classes)"}),
])
def test_every_icl_ceiling_of_a_sweep_is_drawn(figure, expected):
    """A sweep whose settings have different holdout class counts (num_classes: 10 and 80) draws each ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.sweep.figures import _reference_lines

    sweep = load_sweep(Path(__file__).resolve().parents[1] / "configs" / "sweeps" / f"{figure}.toml")
    for column in (None, "icl"):
        fig, ax = plt.subplots()
        _reference_lines(ax, sweep, column)
        drawn = {round(line.get_ydata()[0], 5): line.get_label() for line in ax.get_lines()
                 if line.get_label().startswith("ICL ceiling")}
        plt.close(fig)
        assert drawn == expected
    fig, ax = plt.subplots()
    _reference_lines(ax, sweep, "iwl")  # no ceiling on an IWL panel
    assert not [line for line in ax.get_lines() if line.get_label().startswith("ICL ceiling")]
    plt.close(fig)
