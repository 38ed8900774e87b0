"""The `trainer analyze` command (registered in trainer/cli.py); the work is in `trainer.analyze`."""

from __future__ import annotations

import click

from seqgen.cliopts import cache_dir_option, omniglot_option
from trainer.runtime.errors import rerun_errors


@click.command("analyze")
@click.argument("run_dir", type=click.Path())
@click.option("--eval", "eval_dir", required=True, type=click.Path(),
              help="The fixed eval set (e.g. a fewshot_holdout set) every checkpoint is analysed on.")
@click.option("--train", "train_dir", type=click.Path(), help="Training shard set, if it moved since fit.")
@click.option("--steps", help="Checkpoints to analyse: comma-separated steps, or 'all' (default).")
@click.option("--ablate-steps", default="last", show_default=True,
              help="Where to ablate each head: comma-separated steps, 'all', 'last' or 'none'.")
@click.option("--ablation", type=click.Choice(["zero", "mean", "both"]), default="both", show_default=True,
              help="Replace an ablated head's output by 0, by its mean over the eval sequences, or do both.")
@click.option("--joint-top", type=click.IntRange(min=0), default=2, show_default=True,
              help="At the ablated steps, also ablate together the K heads with the highest previous-token "
                   "scores (0: no joint ablation).")
@click.option("--max-seqs", type=click.IntRange(min=1), default=512, show_default=True,
              help="Analyse each checkpoint on at most this many eval sequences.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Sequences per batch of the model's forward passes.")
@omniglot_option()
@cache_dir_option
@rerun_errors
def analyze_command(run_dir, eval_dir, train_dir, steps, ablate_steps, ablation, joint_top, max_seqs,
                    batch_size, omniglot_dir, cache_dir) -> None:
    """Induction / previous-token scores per layer and head for every checkpoint of RUN_DIR, and head
    ablations: RUN_DIR/analysis.jsonl and RUN_DIR/plots/{induction,prev_token,ablation}.png."""
    from trainer.analyze.measures import analyze_run
    from trainer.analyze.plots import plot_analysis

    analyze_run(run_dir, eval_dir, train_dir=train_dir, steps=steps, ablate_steps=ablate_steps, ablation=ablation,
                joint_top=joint_top, max_seqs=max_seqs, batch_size=batch_size, omniglot_dir=omniglot_dir,
                cache_dir=cache_dir, echo=click.echo)
    for path in plot_analysis(run_dir):
        click.echo(str(path))
