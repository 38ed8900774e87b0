"""Tables and figures of a sweep (`trainer sweep`), from its runs' `metrics.jsonl` alone.

One row per run, from its final evaluations (at its latest checkpoint): ICL = `accuracy_closed` on
`fewshot_holdout`, IWL = `accuracy_query` on `no_support_zipfian`; every other evaluation type gets a
column of its own headline metric (`accuracy_query` on no-support sets, `accuracy_closed` on few-shot
sets), e.g. `iwl_common` / `iwl_rare` for `no_support_common` / `no_support_rare`. Each value comes
with its 95 % interval and the number of sequences it is measured on.

- `results.csv`: name, x, steps, status, then `<metric>_mean, <metric>_ci_lo, <metric>_ci_hi, <metric>_n`.
- `results.md`: the same table, with the sweep's figure and claim, the exact command that reproduces
  it, and the hardware (`platform.processor()` / `jax.devices()`).
- `figure.png`: every metric against x, with 95 % error bars and the ICL chance line at 1/ways.
- `curves.png`: every metric against training step, one line per run.
"""

from __future__ import annotations

import csv
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from seqgen.config import SeqType

_NAMES = {
    SeqType.FEWSHOT_HOLDOUT: "icl",
    SeqType.NO_SUPPORT_ZIPFIAN: "iwl",
    SeqType.NO_SUPPORT_COMMON: "iwl_common",
    SeqType.NO_SUPPORT_RARE: "iwl_rare",
}


def metric_of(seq_type: SeqType) -> tuple[str, str]:
    """(column name, metric key) of an evaluation type's headline number."""
    key = "accuracy_closed" if seq_type.is_fewshot else "accuracy_query"
    return _NAMES.get(seq_type, seq_type.value), key


def label_of(seq_type: SeqType) -> str:
    column, key = metric_of(seq_type)
    return f"{column.upper().replace('_', ' ')}: {key} on {seq_type.value}" if column != seq_type.value \
        else f"{key} on {seq_type.value}"


def final_records(run_dir: Path, step: int, set_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{set name: metrics} of the evaluations at `step` found in metrics.jsonl or evaluations/step-N.json
    (the latest record wins)."""
    from trainer.run import RunDir

    run = RunDir(run_dir)
    wanted = set(set_names)
    found: dict[str, dict[str, Any]] = {}
    for r in run.read_metrics():
        if r.get("kind") == "eval" and r.get("step") == step and r.get("set") in wanted:
            found[r["set"]] = r["metrics"]
    path = run.evaluations_dir / f"step-{step}.json"
    if path.is_file():
        try:
            for s in json.loads(path.read_text()).get("sets", []):
                if s.get("set") in wanted and s["set"] not in found:
                    found[s["set"]] = s["metrics"]
        except (json.JSONDecodeError, AttributeError, KeyError):
            pass
    return found


@dataclass(frozen=True)
class Row:
    name: str
    x: float | str
    steps: int | None
    status: str
    values: dict[str, dict[str, Any] | None]  # column -> {"mean", "ci95", "n"} or None
    curves: dict[str, list[tuple[int, float]]]  # column -> [(step, mean)]
    ways: int


def collect(sweep: Any, out: Path, shards_dir: Path) -> list[Row]:
    from trainer.checkpoint import latest_step
    from trainer.run import RunDir
    from trainer.sweep import set_folder

    rows = []
    for spec in sweep.runs:
        run_dir = out / "runs" / spec.name
        names = {set_folder(shards_dir, cfg).name: cfg.seq_type for cfg in spec.evals}
        latest = latest_step(run_dir) if run_dir.is_dir() else None
        final = final_records(run_dir, latest, list(names)) if latest is not None else {}
        values: dict[str, dict[str, Any] | None] = {}
        curves: dict[str, list[tuple[int, float]]] = {}
        for set_name, seq_type in names.items():
            column, key = metric_of(seq_type)
            values[column] = final.get(set_name, {}).get(key)
            curves[column] = []
        by_step: dict[tuple[str, int], float] = {}
        for r in RunDir(run_dir).read_metrics():
            if r.get("kind") == "eval" and r.get("set") in names:
                column, key = metric_of(names[r["set"]])
                if key in r.get("metrics", {}):
                    by_step[(column, r["step"])] = r["metrics"][key]["mean"]
        for (column, step), mean in sorted(by_step.items(), key=lambda kv: kv[0][1]):
            curves[column].append((step, mean))
        if latest is None:
            status = "not started" if not (run_dir / "config.json").is_file() else "started"
        elif latest < spec.steps:
            status = f"partial ({latest}/{spec.steps})"
        else:
            status = "done" if all(v is not None for v in values.values()) else "not evaluated"
        rows.append(Row(spec.name, spec.x, latest, status, values, curves, spec.train.sequence.ways))
    return rows


def _columns(sweep: Any) -> list[str]:
    return [metric_of(t)[0] for t in sweep.eval_types]


def write_csv(rows: list[Row], columns: list[str], path: Path) -> Path:
    header = ["name", "x", "steps", "status"]
    for c in columns:
        header += [f"{c}_mean", f"{c}_ci_lo", f"{c}_ci_hi", f"{c}_n"]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            line: list[Any] = [r.name, r.x, "" if r.steps is None else r.steps, r.status]
            for c in columns:
                v = r.values.get(c)
                line += ["", "", "", ""] if v is None else [f"{v['mean']:.4f}", f"{v['ci95'][0]:.4f}",
                                                            f"{v['ci95'][1]:.4f}", v["n"]]
            w.writerow(line)
    tmp.replace(path)
    return path


HARDWARE_FILE = "hardware.json"


def hardware() -> str:
    """`platform.processor()` / `jax.devices()` (and the device kind) of this machine."""
    import jax

    devices = jax.devices()
    return f"{platform.processor() or platform.machine()} / {devices} ({devices[0].device_kind})"


def record_hardware(out: Path, run_name: str) -> None:
    """Remember on which hardware a run was trained (`<out>/hardware.json`), for the report."""
    path = Path(out) / HARDWARE_FILE
    try:
        known = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}
    known[run_name] = hardware()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    tmp.replace(path)


def _hardware_lines(out: Path, rows: list[Row]) -> list[str]:
    try:
        known = json.loads((out / HARDWARE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}
    used = sorted({known[r.name] for r in rows if r.name in known})
    lines = [f"Hardware: `{h}` ({', '.join(r.name for r in rows if known.get(r.name) == h)})" for h in used]
    if not lines or any(r.steps is not None and r.name not in known for r in rows):
        lines.append(f"Hardware of this report: `{hardware()}`")
    return [x for line in lines for x in (line, "")]


def write_markdown(sweep: Any, rows: list[Row], columns: list[str], path: Path, command: str) -> Path:
    title = f"# Sweep `{sweep.name}`" + (f" — {sweep.figure}" if sweep.figure else "")
    lines = [title, ""]
    if sweep.claim:
        lines += [f"Claim: {sweep.claim}", ""]
    lines += [
        f"Command: `{command}`", "",
        *_hardware_lines(path.parent, rows),
        f"Sweep file: `{sweep.path}`; x = `{sweep.x_label}`; training set {sweep.train_seqs} sequences; "
        f"evaluation sets {sweep.eval_seqs} sequences each ({', '.join(t.value for t in sweep.eval_types)}).",
        "",
        "Columns: " + "; ".join(f"{metric_of(t)[0]} = {metric_of(t)[1]} on {t.value}" for t in sweep.eval_types)
        + " (mean [95 % CI], n sequences).", "",
    ]
    head = ["run", sweep.x_label, "steps", "status"] + columns
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, str(r.x), "" if r.steps is None else str(r.steps), r.status]
        for c in columns:
            v = r.values.get(c)
            cells.append("" if v is None else f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] (n={v['n']})")
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
    return path


def _x_positions(rows: list[Row]) -> tuple[list[float], list[str] | None]:
    if all(isinstance(r.x, (int, float)) for r in rows):
        return [float(r.x) for r in rows], None
    return [float(i) for i in range(len(rows))], [str(r.x) for r in rows]


def write_figure(sweep: Any, rows: list[Row], columns: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ticks = _x_positions(rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for t, c in zip(sweep.eval_types, columns):
        pts = [(x, r.values[c]) for x, r in zip(xs, rows) if r.values.get(c) is not None]
        if not pts:
            continue
        pts.sort(key=lambda p: p[0])
        mean = [v["mean"] for _, v in pts]
        err = [[max(0.0, v["mean"] - v["ci95"][0]) for _, v in pts],
               [max(0.0, v["ci95"][1] - v["mean"]) for _, v in pts]]
        ax.errorbar([x for x, _ in pts], mean, yerr=err, marker="o", capsize=4, lw=2 if c in ("icl", "iwl") else 1,
                    label=label_of(t))
    ways = {r.ways for r in rows}
    if len(ways) == 1:
        ax.axhline(1.0 / ways.pop(), color="grey", ls=":", lw=1, label="chance (1/ways)")
    if ticks is not None:
        ax.set_xticks(xs, ticks)
    elif sweep.x_scale == "log" and all(x > 0 for x in xs):
        ax.set_xscale("log")
    ax.set_xlabel(sweep.x_label)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{sweep.figure + ': ' if sweep.figure else ''}{sweep.name}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_curves(sweep: Any, rows: list[Row], columns: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(columns)
    cols = min(n, 2)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 3.8 * nrows), squeeze=False)
    for ax, t, c in zip(axes.flat, sweep.eval_types, columns):
        for r in rows:
            if r.curves.get(c):
                steps, means = zip(*r.curves[c])
                ax.plot(steps, means, marker="o", ms=3, lw=1.5, label=f"{r.name} ({sweep.x_label} = {r.x})")
        if c == "icl" and len({r.ways for r in rows}) == 1:
            ax.axhline(1.0 / rows[0].ways, color="grey", ls=":", lw=1)
        ax.set_title(label_of(t), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep: Any, out: Path, *, command: str, shards_dir: Path) -> list[Path]:
    """results.csv, results.md, figure.png and curves.png in `out`; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(sweep, out, Path(shards_dir))
    columns = _columns(sweep)
    return [
        write_csv(rows, columns, out / "results.csv"),
        write_markdown(sweep, rows, columns, out / "results.md", command),
        write_figure(sweep, rows, columns, out / "figure.png"),
        write_curves(sweep, rows, columns, out / "curves.png"),
    ]
