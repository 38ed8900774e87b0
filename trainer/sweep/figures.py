"""The figures of a sweep's report, from its rows (`trainer.sweep.rows`): `figure.png` (each column
against x; with seeds every seed faint, the mean bold and the min-max band; without, 95 % error bars) and
`curves.png` (each column against training step). Chance (1 / ways) and the ICL ceiling
(`trainer.metrics.icl_ceiling`) are dashed.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from seqgen.atomic import atomic_write
from trainer.metrics import icl_ceiling, label_of
from trainer.sweep.rows import Row, aggregate
from trainer.sweep.spec import Sweep


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


__all__ = ["write_curves", "write_figure"]
