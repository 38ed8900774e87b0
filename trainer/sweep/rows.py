"""The rows of a sweep's report: one per run, read from its run directory alone (`config.json`,
`metrics.jsonl`, `analysis.jsonl`) under `<results>/runs/<run name>`: its last step, status, the final
value of each report column (`trainer.metrics.column_of`) with its interval, its curves, its wall time
(`trainer.sweep.provenance`); the per-setting aggregates over seeds; and the checks' verdicts on them.
The report (`trainer.sweep.report`) and the figures (`trainer.sweep.figures`) render these.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from seqgen.config import SeqType
from trainer.analyze.records import ANALYSIS_FILE, analysis_values, read_analysis
from trainer.metrics import ICL_OF_CEILING, column_of, icl_ceiling, metric_key_of
from trainer.run import RunDir
from trainer.runlog import CURVE_SOURCES
from trainer.sweep.checks import CheckResult, evaluate_checks
from trainer.sweep.plan import set_folder
from trainer.sweep.provenance import read_provenance
from trainer.sweep.spec import RunSpec, Sweep


@dataclasses.dataclass(frozen=True)
class Row:
    spec: RunSpec
    steps: int | None  # last step the run reached (None: not started)
    status: str
    values: dict[str, dict[str, Any] | None]  # column -> {"mean", "ci95", "n"} or None
    curves: dict[str, list[tuple[int, float]]]  # column -> [(step, mean)]
    wall_s: float | None

    @property
    def name(self) -> str:
        return self.spec.name


# ---- collection -------------------------------------------------------------------------------------
def _last_step(run: RunDir) -> int | None:
    steps = [r["step"] for r in run.read_metrics()
             if isinstance(r, dict) and isinstance(r.get("step"), int) and r.get("kind") in ("train", "eval")]
    return max(steps) if steps else None


def collect(sweep: Sweep, results: Path, shards_dir: Path) -> list[Row]:
    provenance = read_provenance(results)
    needs_analysis = any(c.reads_analysis for c in sweep.checks)
    rows = []
    for spec in sweep.runs:
        run = RunDir(Path(results) / "runs" / spec.name)
        names = {set_folder(shards_dir, cfg).name: cfg.seq_type for cfg in spec.evals}
        latest = _last_step(run) if run.path.is_dir() else None
        final = run.final_evaluations(latest, list(names)) if latest is not None else {}
        values: dict[str, dict[str, Any] | None] = {}
        curves: dict[str, list[tuple[int, float]]] = {}
        for set_name, seq_type in names.items():
            column, key = column_of(seq_type), metric_key_of(seq_type)
            got = final.get(set_name, {}).get(key)
            values[column] = got if isinstance(got, dict) and isinstance(got.get("mean"), (int, float)) else None
            curves[column] = []
            if seq_type is SeqType.FEWSHOT_HOLDOUT:  # ICL as a fraction of its setting's ceiling (ICL_OF_CEILING)
                cfg = next(c for c in spec.evals if set_folder(shards_dir, c).name == set_name)
                ceiling = icl_ceiling(cfg.sequence.ways, cfg.split.n_holdout_classes)
                values[ICL_OF_CEILING] = None if values[column] is None else \
                    {"mean": float(values[column]["mean"]) / ceiling}
            if seq_type is SeqType.FEWSHOT_HOLDOUT and latest is not None and needs_analysis:
                records = read_analysis(run.path)  # what checks may read: the analysis of the final step
                for c, v in analysis_values(records, latest, set_name, str(run.path / ANALYSIS_FILE)).items():
                    values[c] = {"mean": v}
        by_step: dict[tuple[str, int], float] = {}
        for e in run.evaluations() if run.path.is_dir() else []:
            if e.source in CURVE_SOURCES and e.set in names:
                seq_type = names[e.set]
                m = e.metrics.get(metric_key_of(seq_type))
                if isinstance(m, dict) and isinstance(m.get("mean"), (int, float)):
                    by_step[(column_of(seq_type), e.step)] = float(m["mean"])
        for (column, step), mean in sorted(by_step.items(), key=lambda kv: kv[0][1]):
            curves[column].append((step, mean))
        if latest is None:
            status = "not started" if not run.config_path.is_file() else "started"
        elif latest < spec.steps:
            status = f"partial ({latest}/{spec.steps})"
        else:
            status = "done" if all(v is not None for v in values.values()) else "not evaluated"
        segments = provenance.get(spec.name, {}).get("segments", [])
        wall = sum(float(s.get("wall_s", 0.0)) for s in segments if s.get("action") != "evaluate") or None
        rows.append(Row(spec, latest, status, values, curves, wall))
    return rows


def columns_of(sweep: Sweep) -> list[str]:
    return [column_of(t) for t in sweep.eval_types]


def finals(rows: list[Row], column: str) -> dict[str, dict[int | None, float]]:
    """{setting: {seed: final mean}} of one column, for the runs that are done."""
    out: dict[str, dict[int | None, float]] = {}
    for r in rows:
        v = r.values.get(column)
        if r.status == "done" and v is not None:
            out.setdefault(r.spec.setting, {})[r.spec.seed] = float(v["mean"])
    return out


def run_checks(sweep: Sweep, rows: list[Row]) -> list[CheckResult]:
    seeds: list[int | None] = list(sweep.seeds) if sweep.seeds is not None else [None]
    results = []
    for check in sweep.checks:
        results += evaluate_checks([check], finals(rows, check.metric), seeds, finals(rows, check.other_metric))
    return results


@dataclasses.dataclass(frozen=True)
class Aggregate:
    setting: str
    x: float | str
    seeds_done: int
    stats: dict[str, dict[str, Any] | None]  # column -> {"mean", "std", "min", "max", "values": {seed: v}}


def aggregate(sweep: Sweep, rows: list[Row]) -> list[Aggregate]:
    out = []
    for setting in sweep.settings:
        mine = [r for r in rows if r.spec.setting == setting]
        stats: dict[str, dict[str, Any] | None] = {}
        for c in columns_of(sweep):
            vals = {r.spec.seed: float(r.values[c]["mean"]) for r in mine
                    if r.status == "done" and r.values.get(c) is not None}
            if not vals:
                stats[c] = None
                continue
            v = list(vals.values())
            stats[c] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                        "min": min(v), "max": max(v), "values": vals}
        out.append(Aggregate(setting, mine[0].spec.x, sum(r.status == "done" for r in mine), stats))
    return out


__all__ = ["Aggregate", "Row", "aggregate", "collect", "columns_of", "finals", "run_checks"]
