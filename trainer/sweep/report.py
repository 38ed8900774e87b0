"""Tables and figures of a sweep, from its runs' `config.json` / `metrics.jsonl` / `evaluations/` alone.

The report reads the runs under `<results>/runs/<run name>` (the run directories themselves, or the
copies `trainer sweep` publishes there), so a committed results folder rebuilds it with
`trainer sweep FILE --report-only`. One row per run, from its final evaluations (at the last step it
reached): each evaluation type has a column of its headline number (`trainer.metrics.column_of`: ICL =
accuracy_closed on fewshot_holdout, IWL = accuracy_query on no_support_zipfian, iwl_common / iwl_rare on
no_support_common / no_support_rare), with its 95 % interval and number of sequences.

- `results.csv`: one row per run: name, x, steps, status, `<col>_mean, <col>_ci_lo, <col>_ci_hi, <col>_n`
  per column, then setting, seed, wall_s.
- `summary.csv` (sweeps with seeds): one row per setting: x, seeds done, `<col>_mean, <col>_std,
  <col>_min, <col>_max` over seeds, and the per-seed values.
- `results.md`: the figure, claim and deviations from the paper, the command that reproduces it, commit
  and hardware of each run, the tables, and the checks with their verdicts (`trainer.sweep.checks`).
- `figure.png`: each column against x; with seeds every seed faint, the mean bold and the min-max band;
  without, 95 % error bars. Chance (1 / ways) and the ICL ceiling (`trainer.metrics.icl_ceiling`) dashed.
- `curves.png`: each column against training step, every run faint and each setting's seed mean bold.
- `runs/<name>/provenance.json`: per run, the commit, the hardware and the wall time of every segment
  trained (with the number of runs it shared a vectorized group with).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from seqgen.atomic import atomic_write, atomic_write_json, atomic_write_text
from seqgen.config import SeqType
from trainer.analyze.records import ANALYSIS_FILE, analysis_values, read_analysis
from trainer.runtime.platform import cpu_model
from trainer.metrics import ICL_OF_CEILING, column_of, icl_ceiling, label_of, metric_key_of
from trainer.run import CURVE_SOURCES, RunDir, versions
from trainer.sweep.checks import CheckResult, Verdict, evaluate_checks
from trainer.sweep.plan import set_folder
from trainer.sweep.spec import RunSpec, Sweep

PROVENANCE_FILE = "provenance.json"


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


# ---- provenance -------------------------------------------------------------------------------------
def hardware() -> str:
    """The machine (architecture, CPU model: `trainer.runtime.platform.cpu_model`) / `jax.devices()` (and the
    device kind)."""
    import jax

    devices = jax.devices()
    return f"{platform.machine()} {cpu_model()} / {devices} ({devices[0].device_kind})"


def code_commit() -> str:
    """The git commit of the code running (with `+dirty` when tracked files differ), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "diff", "--quiet", "HEAD", "--", "."],
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head[:12] + ("+dirty" if dirty else "")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_provenance(results: Path) -> dict[str, dict[str, Any]]:
    """{run name: {"segments": [...]}} from each run's `runs/<name>/provenance.json`."""
    runs = Path(results) / "runs"
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(runs.rglob(PROVENANCE_FILE)) if runs.is_dir() else []:
        data = _read_json(path)
        if isinstance(data, dict) and isinstance(data.get("segments"), list):
            out[path.parent.relative_to(runs).as_posix()] = data
    return out


def record_provenance(results: Path, run_name: str, action: str, wall_s: float, *, jobs: int,
                      cpus: list[int] | None, group: int = 1) -> None:
    """Add one segment (what was done, how long, on which code and hardware) to a run's provenance
    (`<results>/runs/<name>/provenance.json`: one file per run, so concurrent sweeps never share one)."""
    path = Path(results) / "runs" / run_name / PROVENANCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_json(path)
    entry = data if isinstance(data, dict) and isinstance(data.get("segments"), list) else {"segments": []}
    entry["segments"].append({"action": action, "wall_s": round(wall_s, 1), "commit": code_commit(),
                              "hardware": hardware(), "versions": versions(), "jobs": jobs, "cpus": cpus,
                              "group": group,
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    atomic_write_json(path, entry)


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


# ---- tables -----------------------------------------------------------------------------------------
def _csv_text(header: list[str], lines: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(lines)
    return buf.getvalue()


def write_csv(rows: list[Row], columns: list[str], path: Path) -> Path:
    header = ["name", "x", "steps", "status"]
    for c in columns:
        header += [f"{c}_mean", f"{c}_ci_lo", f"{c}_ci_hi", f"{c}_n"]
    header += ["setting", "seed", "wall_s"]
    lines = []
    for r in rows:
        line: list[Any] = [r.name, r.spec.x, "" if r.steps is None else r.steps, r.status]
        for c in columns:
            v = r.values.get(c)
            line += ["", "", "", ""] if v is None else [f"{v['mean']:.4f}", f"{v['ci95'][0]:.4f}",
                                                        f"{v['ci95'][1]:.4f}", v["n"]]
        line += [r.spec.setting, "" if r.spec.seed is None else r.spec.seed,
                 "" if r.wall_s is None else f"{r.wall_s:.0f}"]
        lines.append(line)
    atomic_write_text(path, _csv_text(header, lines))
    return path


def write_summary_csv(aggs: list[Aggregate], columns: list[str], path: Path) -> Path:
    header = ["setting", "x", "seeds_done"]
    for c in columns:
        header += [f"{c}_mean", f"{c}_std", f"{c}_min", f"{c}_max", f"{c}_seeds"]
    lines = []
    for a in aggs:
        line: list[Any] = [a.setting, a.x, a.seeds_done]
        for c in columns:
            s = a.stats.get(c)
            line += [""] * 5 if s is None else [
                f"{s['mean']:.4f}", f"{s['std']:.4f}", f"{s['min']:.4f}", f"{s['max']:.4f}",
                " ".join(f"{seed}:{v:.4f}" for seed, v in s["values"].items())]
        lines.append(line)
    atomic_write_text(path, _csv_text(header, lines))
    return path


def _provenance_lines(results: Path, rows: list[Row]) -> list[str]:
    prov = read_provenance(results)
    lines = []
    for key, title in (("hardware", "Hardware"), ("commit", "Code at commit")):
        users: dict[str, list[str]] = {}
        for r in rows:
            for seg in prov.get(r.name, {}).get("segments", []):
                if seg.get(key):
                    users.setdefault(str(seg[key]), [])
                    if r.name not in users[str(seg[key])]:
                        users[str(seg[key])].append(r.name)
        lines += [f"{title}: `{h}` ({', '.join(names)})" for h, names in users.items()]
    if not any(line.startswith("Hardware:") for line in lines) or any(
            r.steps is not None and r.name not in prov for r in rows):
        lines.append(f"Hardware of this report: `{hardware()}`")
    return [x for line in lines for x in (line, "")]


def _cell(v: dict[str, Any] | None) -> str:
    return "" if v is None else f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] (n={v['n']})"


def _agg_cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return ""
    seeds = ", ".join(f"{v:.3f}" for v in s["values"].values())
    return f"{s['mean']:.3f} ± {s['std']:.3f} ({seeds})"


def _ceiling_note(sweep: Sweep) -> str | None:
    kinds: dict[tuple[int, int], list[str]] = {}
    for r in sweep.runs:
        for cfg in r.evals:
            if cfg.seq_type.value == "fewshot_holdout":
                names = kinds.setdefault((cfg.sequence.ways, cfg.split.n_holdout_classes), [])
                if r.setting not in names:
                    names.append(r.setting)
    if not kinds:
        return None
    parts = [f"{icl_ceiling(w, h):.3f} with {w} ways of {h} holdout classes (chance {1 / w:.3f})"
             + (f" ({', '.join(names)})" if len(kinds) > 1 else "") for (w, h), names in kinds.items()]
    return ("ICL ceiling: the ways of a fewshot_holdout sequence are drawn with replacement (as in the "
            "original), so even a perfect in-context learner scores at most " + "; ".join(parts) + ".")


def write_markdown(sweep: Sweep, rows: list[Row], checks: list[CheckResult], columns: list[str], path: Path,
                   command: str) -> Path:
    title = f"# Sweep `{sweep.name}`" + (f" — {sweep.figure}" if sweep.figure else "")
    lines = [title, ""]
    if sweep.claim:
        lines += [f"Claim: {sweep.claim}", ""]
    if sweep.deviations:
        lines += ["Deviations from the paper: " + "; ".join(sweep.deviations) + ".", ""]
    seeds = f"; seeds {', '.join(map(str, sweep.seeds))}" if sweep.seeds is not None else ""
    lines += [
        f"Command: `{command}`", "",
        *_provenance_lines(path.parent, rows),
        f"Sweep file: `{sweep.path}`; x = `{sweep.x_label}`; training set {sweep.train_seqs} sequences; "
        f"evaluation sets {sweep.eval_seqs} sequences each ({', '.join(t.value for t in sweep.eval_types)}){seeds}.",
        "",
        "Columns: " + "; ".join(f"{column_of(t)} = {metric_key_of(t)} on {t.value}" for t in sweep.eval_types)
        + " (mean [95 % CI], n sequences).", "",
    ]
    note = _ceiling_note(sweep)
    if note:
        lines += [note, ""]
    if checks:
        lines += ["## Checks", "", "| verdict | claim | check | numbers |", "|---|---|---|---|"]
        for c in checks:
            cells = [c.verdict.value, c.spec.claim, c.spec.describe(), c.detail]
            lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
        lines.append("")
    if sweep.seeds is not None:
        lines += ["## Settings (mean ± standard deviation over seeds, then each seed)", ""]
        head = ["setting", sweep.x_label, "seeds done"] + columns
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in aggregate(sweep, rows):
            lines.append("| " + " | ".join([a.setting, str(a.x), f"{a.seeds_done}/{len(sweep.seeds)}"]
                                           + [_agg_cell(a.stats.get(c)) for c in columns]) + " |")
        lines += ["", "## Runs", ""]
    head = ["run", sweep.x_label, "steps", "status", "wall (min)"] + columns
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, str(r.spec.x), "" if r.steps is None else str(r.steps), r.status,
                 "" if r.wall_s is None else f"{r.wall_s / 60:.1f}"]
        lines.append("| " + " | ".join(cells + [_cell(r.values.get(c)) for c in columns]) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ---- figures ----------------------------------------------------------------------------------------
def _save_png(fig: Any, path: Path, dpi: int) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def _x_positions(sweep: Sweep) -> tuple[dict[str, float], list[str] | None]:
    xs = {r.setting: r.x for r in sweep.runs}
    if all(isinstance(x, (int, float)) for x in xs.values()):
        return {s: float(x) for s, x in xs.items()}, None
    return {s: float(i) for i, s in enumerate(sweep.settings)}, [str(xs[s]) for s in sweep.settings]


def _reference_lines(ax: Any, sweep: Sweep, column: str | None) -> None:
    ways = {r.train.sequence.ways for r in sweep.runs}
    if len(ways) == 1 and (column is None or column == "icl"):
        ax.axhline(1.0 / next(iter(ways)), color="grey", ls=":", lw=1, label="chance (1/ways)")
    fs = [cfg for r in sweep.runs for cfg in r.evals if cfg.seq_type.value == "fewshot_holdout"]
    if fs and (column is None or column == "icl"):
        holdout: dict[float, set[int]] = {}  # ceiling -> the holdout class counts that give it
        for c in fs:
            holdout.setdefault(icl_ceiling(c.sequence.ways, c.split.n_holdout_classes), set()).add(
                c.split.n_holdout_classes)
        for i, (ceiling, counts) in enumerate(sorted(holdout.items())):  # one line each (num_classes: two)
            label = "ICL ceiling" if len(holdout) == 1 else \
                f"ICL ceiling {ceiling:.3f} ({', '.join(map(str, sorted(counts)))} holdout classes)"
            ax.axhline(ceiling, color="tab:blue", ls=("--", "-.")[i % 2], lw=0.8, alpha=0.6, label=label)


def write_figure(sweep: Sweep, rows: list[Row], columns: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xpos, ticks = _x_positions(sweep)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    seeded = sweep.seeds is not None
    for t, c in zip(sweep.eval_types, columns):
        lw = 2 if c in ("icl", "iwl") else 1
        if seeded:
            aggs = [(xpos[a.setting], a.stats[c]) for a in aggregate(sweep, rows) if a.stats.get(c)]
            if not aggs:
                continue
            aggs.sort(key=lambda p: p[0])
            line, = ax.plot([x for x, _ in aggs], [s["mean"] for _, s in aggs], marker="o", lw=lw, label=label_of(t))
            ax.fill_between([x for x, _ in aggs], [s["min"] for _, s in aggs], [s["max"] for _, s in aggs],
                            color=line.get_color(), alpha=0.15, lw=0)
            for x, s in aggs:
                ax.scatter([x] * len(s["values"]), list(s["values"].values()), color=line.get_color(), alpha=0.35, s=12)
        else:
            pts = sorted(((xpos[r.spec.setting], r.values[c]) for r in rows
                          if r.status == "done" and r.values.get(c) is not None), key=lambda p: p[0])
            if not pts:
                continue
            err = [[max(0.0, v["mean"] - v["ci95"][0]) for _, v in pts], [max(0.0, v["ci95"][1] - v["mean"]) for _, v in pts]]
            ax.errorbar([x for x, _ in pts], [v["mean"] for _, v in pts], yerr=err, marker="o", capsize=4, lw=lw,
                        label=label_of(t))
    _reference_lines(ax, sweep, None)
    if ticks is not None:
        ax.set_xticks(sorted(xpos.values()), ticks)
    elif sweep.x_scale == "log" and all(x > 0 for x in xpos.values()):
        ax.set_xscale("log")
        xs = sorted(set(xpos.values()))
        ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the settings' values, not only the powers of 10
        ax.minorticks_off()
    ax.set_xlabel(sweep.x_label)
    ax.set_ylabel("accuracy" + (" (mean over seeds; band: min-max; dots: seeds)" if seeded else ""))
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{sweep.figure + ': ' if sweep.figure else ''}{sweep.name}", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, path, dpi=120)
    plt.close(fig)
    return path


def write_curves(sweep: Sweep, rows: list[Row], columns: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(columns)
    cols = min(n, 2)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.8 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seeded = sweep.seeds is not None
    for ax, t, c in zip(axes.flat, sweep.eval_types, columns):
        for i, setting in enumerate(sweep.settings):
            color = colors[i % len(colors)]
            mine = [r for r in rows if r.spec.setting == setting and r.curves.get(c)]
            label = f"{setting} ({sweep.x_label} = {mine[0].spec.x})" if mine else None
            for r in mine:
                steps, means = zip(*r.curves[c])
                ax.plot(steps, means, color=color, lw=1 if seeded else 1.5, alpha=0.3 if seeded else 1.0,
                        marker=None if seeded else "o", ms=3, label=None if seeded else label)
            if seeded and mine:
                common = sorted(set.intersection(*(set(s for s, _ in r.curves[c]) for r in mine)))
                if common:
                    by = [dict(r.curves[c]) for r in mine]
                    ax.plot(common, [statistics.fmean(d[s] for d in by) for s in common], color=color, lw=2,
                            marker="o", ms=3, label=f"{label}, mean of {len(mine)}")
        _reference_lines(ax, sweep, c)
        ax.set_title(label_of(t), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    _save_png(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep: Sweep, results: Path, *, command: str, shards_dir: Path) -> list[Path]:
    """results.csv (+ summary.csv with seeds), results.md, figure.png and curves.png in `results`."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep, results, Path(shards_dir))
    checks = run_checks(sweep, rows)
    columns = columns_of(sweep)
    out = [write_csv(rows, columns, results / "results.csv")]
    if sweep.seeds is not None:
        out.append(write_summary_csv(aggregate(sweep, rows), columns, results / "summary.csv"))
    out += [
        write_markdown(sweep, rows, checks, columns, results / "results.md", command),
        write_figure(sweep, rows, columns, results / "figure.png"),
        write_curves(sweep, rows, columns, results / "curves.png"),
    ]
    return out


def check_report(sweep: Sweep, results: Path, shards_dir: Path) -> list[CheckResult]:
    return run_checks(sweep, collect(sweep, Path(results), Path(shards_dir)))


__all__ = ["Row", "Verdict", "aggregate", "check_report", "collect", "record_provenance", "write_report"]
