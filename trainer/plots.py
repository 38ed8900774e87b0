"""`trainer plot RUN_DIR`: PNGs of ICL, IWL and loss against step, from the run's `metrics.jsonl` (its evaluation
store: `trainer.run`; the curve is fit's and --watch's evaluations).

- `plots/icl_iwl.png`: the paper's headline numbers (`trainer.metrics.HEADLINES`: ICL = accuracy_closed on
  fewshot_holdout sets, chance line at 1/ways, and the ICL ceiling of `trainer.metrics.icl_ceiling`: ways
  are drawn with replacement; IWL = accuracy_query on no_support_zipfian sets) with their 95 % intervals as
  bands; every other eval set's accuracy_closed is drawn thinner.
- `plots/loss.png`: training loss (and eval losses) against step, log-scaled steps.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from seqgen.atomic import atomic_write  # noqa: E402
from seqgen.config import SeqType  # noqa: E402
from trainer.metrics import HEADLINES, icl_ceiling, label_of, metric_key_of  # noqa: E402
from trainer.run import CURVE_SOURCES, RunDir, RunError  # noqa: E402


def series(run: RunDir):
    """(train metrics {name: [(step, value)]}, curve evaluations {(set, seq_type): [(step, metrics)]}) of a run."""
    train = defaultdict(list)
    evals: dict[tuple[str, str], list[tuple[int, dict]]] = defaultdict(list)
    for r in run.read_metrics():
        if r.get("kind") == "train":
            for k, v in r["metrics"].items():
                train[k].append((r["step"], v))
    for e in run.evaluations():
        if e.source in CURVE_SOURCES:
            evals[(e.set, e.seq_type)].append((e.step, e.metrics))
    for key in evals:
        by_step = {s: m for s, m in evals[key]}  # a re-evaluated step keeps its latest record
        evals[key] = sorted(by_step.items())
    return train, evals


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
