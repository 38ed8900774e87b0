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
import io
from pathlib import Path
from typing import Any

from seqgen.atomic import atomic_write_text
from trainer.metrics import column_of, icl_ceiling, metric_key_of
from trainer.sweep.checks import CheckResult
from trainer.sweep.figures import write_curves, write_figure
from trainer.sweep.provenance import provenance_lines
from trainer.sweep.rows import Aggregate, Row, aggregate, collect, columns_of, run_checks
from trainer.sweep.spec import Sweep


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
        *provenance_lines(path.parent, rows),
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


__all__ = ["check_report", "write_csv", "write_markdown", "write_report", "write_summary_csv"]
