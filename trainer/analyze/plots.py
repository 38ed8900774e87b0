"""Plots of `trainer analyze`: one PNG a measure, heads as lines against the step, the ICL / IWL curves below.

- `plots/induction.png`, `plots/prev_token.png`: the score of every (layer, head) against the training
  step (one colour per layer, the head with the highest final score labelled), and under it the run's ICL
  (accuracy_closed on fewshot_holdout) and IWL (accuracy_query on no_support_zipfian) from metrics.jsonl,
  on the same step axis;
- `plots/ablation.png`: for the last ablated step, heat maps (layers x heads) of the ICL accuracy with
  each head ablated (zero / mean), the unablated accuracy in the title.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from seqgen.atomic import atomic_write  # noqa: E402
from trainer.analyze.records import read_analysis  # noqa: E402
from trainer.metrics import HEADLINES, column_of, metric_key_of  # noqa: E402
from trainer.plots import band  # noqa: E402
from trainer.runlog import series  # noqa: E402
from trainer.run import RunDir, RunError  # noqa: E402


def plot_analysis(run_dir: str | os.PathLike) -> list[Path]:
    run = RunDir(run_dir)
    records = read_analysis(run.path)
    if not records:
        raise RunError(f"{run.path} has no analysis.jsonl yet; run `trainer analyze {run.path} --eval SET`")
    run.plots_dir.mkdir(parents=True, exist_ok=True)
    _, evals = series(run)
    out = []
    for measure, title in (("induction", "induction score (query -> labels of its class, minus uniform)"),
                           ("prev_token", "previous-token score (label -> its exemplar, minus uniform)")):
        out.append(_plot_measure(run, records, evals, measure, title))
    abl = [r for r in records if r.get("ablation")]
    if abl:
        out.append(_plot_ablation(run, max(abl, key=lambda r: r["step"])))
    return out


def _plot_measure(run: RunDir, records, evals, measure: str, title: str) -> Path:
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    by_set: dict[str, list] = {}
    for r in records:
        if r.get(measure) is not None:
            by_set.setdefault(r["set"], []).append(r)
    for name, rs in sorted(by_set.items()):
        rs = sorted(rs, key=lambda r: r["step"])
        steps = [r["step"] for r in rs]
        grid = np.asarray([r[measure] for r in rs])  # [steps, layers, heads]
        n_layers, n_heads = grid.shape[1:]
        colours = plt.cm.viridis(np.linspace(0, 0.9, n_layers))
        for layer in range(n_layers):
            for head in range(n_heads):
                ax.plot(steps, grid[:, layer, head], color=colours[layer], lw=1, alpha=0.8, marker=".",
                        label=f"layer {layer}" if head == 0 else None)
        layer, head = np.unravel_index(int(np.argmax(grid[-1])), grid.shape[1:])
        ax.annotate(f"L{layer}H{head} ({name})", (steps[-1], grid[-1, layer, head]), fontsize=8,
                    textcoords="offset points", xytext=(-60, 6))
    ax.axhline(0.0, color="grey", ls=":", lw=1)
    ax.set_ylabel("score")
    ax.set_title(f"{title} — {run.path.name}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    headline_types = {t.value for t in HEADLINES}
    for (name, seq_type), pts in sorted(evals.items()):
        if seq_type in headline_types:  # ICL / IWL, as trainer.metrics defines them
            band(ax2, pts, metric_key_of(seq_type), f"{column_of(seq_type).upper()}, {name}", lw=2)
    acc = sorted((r["step"], r["accuracy_closed"]) for r in records)
    ax2.plot(*zip(*acc), color="k", ls="--", lw=1, label="accuracy_closed on the analysis set")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(-0.02, 1.02)
    ax2.legend(fontsize=7, loc="best")
    ax2.grid(alpha=0.3)
    path = run.plots_dir / f"{measure}.png"
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def _plot_ablation(run: RunDir, rec) -> Path:
    modes = sorted(rec["ablation"])
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        grid = np.asarray(rec["ablation"][mode]["accuracy_closed"])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
        for (layer, head), v in np.ndenumerate(grid):
            ax.text(head, layer, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{mode} ablation", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"accuracy_closed on {rec['set']} with one head ablated, step {rec['step']} "
                 f"(unablated {rec['accuracy_closed']:.3f})", fontsize=9)
    path = run.plots_dir / "ablation.png"
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
