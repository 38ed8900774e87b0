"""`trainer plot RUN_DIR`: PNGs of ICL, IWL and loss against step, from the run's `metrics.jsonl` (its evaluation
store: `trainer.runlog`; the curve is fit's and --watch's evaluations).

- `plots/icl_iwl.png`: the paper's headline numbers (`trainer.metrics.HEADLINES`: ICL = accuracy_closed on
  fewshot_holdout sets, chance line at 1/ways, and the ICL ceiling of `trainer.metrics.icl_ceiling`: ways
  are drawn with replacement; IWL = accuracy_query on no_support_zipfian sets) with their 95 % intervals as
  bands; every other eval set's accuracy_closed is drawn thinner.
- `plots/loss.png`: training loss (and eval losses) against step, log-scaled steps.

`trainer plot RUN... --out FILE` (`plot_compare`): several runs in one figure, a panel each for ICL and IWL,
a line per run labelled by its path below the runs' common folder (a sweep's `<setting>/seed-<s>`); the
seeds of a setting (`<setting>/seed-<s>`, two or more given) drawn faint under their mean, with the band
from their lowest to their highest value at each step.
"""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from seqgen.atomic import atomic_write  # noqa: E402
from seqgen.config import SeqType  # noqa: E402
from trainer.metrics import HEADLINES, icl_ceiling, label_of, metric_key_of  # noqa: E402
from trainer.run import RunDir, RunError  # noqa: E402
from trainer.runlog import series  # noqa: E402


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    run = RunDir(run_dir)
    run.read()
    train, evals = series(run)
    if not train and not evals:
        raise RunError(f"{run.metrics_path} has no metrics yet; train with `trainer fit` first")
    run.plots_dir.mkdir(parents=True, exist_ok=True)
    data = run.read().get("data", {})
    data = data if isinstance(data, dict) else {}
    ways, n_holdout = data.get("ways"), data.get("n_holdout")
    ceiling = icl_ceiling(ways, n_holdout) if isinstance(ways, int) and isinstance(n_holdout, int) \
        and ways >= 1 and n_holdout >= 1 else None
    return [_plot_accuracy(run, evals, ways, ceiling), _plot_loss(run, train, evals)]


def band(ax, points, metric, label, **kw):
    """Plot `metric`'s mean against step with its 95 % interval as a band; False when no point has it."""
    pts = [(s, m[metric]) for s, m in points if metric in m]
    if not pts:
        return False
    steps = [s for s, _ in pts]
    ax.plot(steps, [m["mean"] for _, m in pts], marker="o", ms=3, label=label, **kw)
    ax.fill_between(steps, [m["ci95"][0] for _, m in pts], [m["ci95"][1] for _, m in pts], alpha=0.2)
    return True


def _plot_accuracy(run: RunDir, evals, ways, ceiling: float | None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drew = False
    headline_types = {t.value for t in HEADLINES}
    for (name, seq_type), pts in sorted(evals.items()):
        if seq_type in headline_types:
            drew |= band(ax, pts, metric_key_of(seq_type), f"{label_of(seq_type)} ({name})", lw=2)
        else:
            drew |= band(ax, pts, "accuracy_closed", f"accuracy_closed, {name}", lw=1, alpha=0.7)
    ax.axhline(0.5 if not ways else 1.0 / ways, color="grey", ls=":", lw=1, label="ICL chance")
    if ceiling is not None and any(seq_type == SeqType.FEWSHOT_HOLDOUT.value for _, seq_type in evals):
        ax.axhline(ceiling, color="tab:blue", ls="--", lw=0.8, alpha=0.6, label=f"ICL ceiling ({ceiling:.2f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"In-context vs in-weights learning — {run.path.name}")
    if drew:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    out = run.plots_dir / "icl_iwl.png"
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out


def _plot_loss(run: RunDir, train, evals) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train.get("loss"):
        steps, vals = zip(*train["loss"])
        ax.plot(steps, vals, lw=1, label="train loss")
    for (name, _), pts in sorted(evals.items()):
        pts = [(s, m["loss"]["mean"]) for s, m in pts if "loss" in m]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, label=f"eval loss, {name}")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(f"Loss — {run.path.name}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = run.plots_dir / "loss.png"
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out


# ---- trainer plot RUN... --out FILE ----------------------------------------------------------------------
_SEED = re.compile(r"^(?P<setting>.+)/seed-\d+$")
Curve = list[tuple[int, float]]  # (step, mean of the headline metric)


def run_labels(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Each run's path below the runs' common folder (`runs/a`, `runs/b` -> `a`, `b`; a sweep's
    `<setting>/seed-<s>`), a seed folder always with its setting (`runs/p/seed-0` -> `p/seed-0`); a lone run's
    folder name."""
    paths = [Path(d).resolve() for d in run_dirs]
    common = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    labels = []
    for p in paths:
        label = p.relative_to(common).as_posix() if p != common else p.name
        labels.append(f"{p.parent.name}/{label}" if re.fullmatch(r"seed-\d+", label) else label)
    return labels


def _headline_curves(evals: dict[tuple[str, str], list[tuple[int, dict]]], seq_type: SeqType) -> dict[str, Curve]:
    """{eval set name: curve} of a run's curve evaluations (`series`) of `seq_type` on its headline metric."""
    key = metric_key_of(seq_type)
    return {name: [(s, m[key]["mean"]) for s, m in pts if key in m]
            for (name, t), pts in sorted(evals.items()) if t == seq_type.value}


def _settings(labels: list[str], mean: bool) -> dict[str, list[int]]:
    """{legend label: indices of its runs}, in the order given: with `mean`, the seeds of one setting
    (`<setting>/seed-<s>`, two or more given) together under the setting's name; else each run alone."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        m = _SEED.match(label) if mean else None
        groups.setdefault(m["setting"] if m else label, []).append(i)
    return {(key if len(members) > 1 else labels[members[0]]): members for key, members in groups.items()}


def _ways(runs: list[RunDir]) -> int | None:
    """The ways of the runs' few-shot sets when they all agree (for the chance line), else None."""
    found = set()
    for run in runs:
        data = run.read().get("data")
        found.add(data.get("ways") if isinstance(data, dict) else None)
    ways = found.pop() if len(found) == 1 else None
    return ways if isinstance(ways, int) and ways >= 1 else None


def _draw_setting(ax: Any, label: str, curves: list[Curve], color: str) -> None:
    """A setting's seeds faint, their mean bold and the min-max band over the steps they share."""
    for c in curves:
        ax.plot(*zip(*c), color=color, lw=1, alpha=0.3)
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
    if not common:
        return
    by = [dict(c) for c in curves]
    ax.plot(common, [statistics.fmean(d[s] for d in by) for s in common], color=color, lw=2, marker="o", ms=3,
            label=f"{label} (mean of {len(curves)} seeds)")
    ax.fill_between(common, [min(d[s] for d in by) for s in common], [max(d[s] for d in by) for s in common],
                    color=color, alpha=0.15)


def plot_compare(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, mean: bool = True) -> Path:
    """One PNG comparing the runs' ICL and IWL curves (module docstring); RunError when none has any."""
    runs = [RunDir(d) for d in run_dirs]
    for run in runs:
        run.read()  # a path that is not a run: one line naming it
    labels = run_labels(run_dirs)
    evals = [series(run)[1] for run in runs]
    panels = {t: [_headline_curves(e, t) for e in evals] for t in HEADLINES}
    panels = {t: per_run for t, per_run in panels.items() if any(c for curves in per_run for c in curves.values())}
    if not panels:
        raise RunError(f"none of the {len(runs)} runs has evaluations on "
                       f"{' or '.join(t.value for t in HEADLINES)} yet; evaluate them first")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ways = _ways(runs)
    for ax, (seq_type, per_run) in zip(axes.flat, panels.items()):
        for n, (label, members) in enumerate(_settings(labels, mean).items()):
            names = sorted({name for i in members for name, c in per_run[i].items() if c})
            for name in names:  # a run's sets of this type (usually one)
                curves = [per_run[i][name] for i in members if per_run[i].get(name)]
                shown = f"{label}, {name}" if len(names) > 1 else label
                if len(curves) > 1:
                    _draw_setting(ax, shown, curves, colors[n % len(colors)])
                else:
                    ax.plot(*zip(*curves[0]), color=colors[n % len(colors)], lw=1.5, marker="o", ms=3, label=shown)
        if seq_type is SeqType.FEWSHOT_HOLDOUT and ways:
            ax.axhline(1.0 / ways, color="grey", ls=":", lw=1, label="ICL chance")
        ax.set_title(label_of(seq_type), fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out
