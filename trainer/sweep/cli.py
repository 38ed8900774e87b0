"""`trainer sweep FILE`: one command per figure of the paper (build sets, train runs, tabulate, plot, check)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

import click

from seqgen.cliopts import cache_dir_option, omniglot_option
from seqgen.config import ConfigError
from trainer.runtime.errors import sweep_errors
from trainer.sweep.checks import Verdict
from trainer.sweep.execute import execute
from trainer.sweep.plan import default_out, describe_plan, make_plan
from trainer.sweep.spec import DEFAULT_SHARDS_DIR, Sweep, SweepError, load_sweep


def reproduce_command(sweep_file: str, out: str | None, shards_dir: str | None, only: Sequence[str],
                      results: str | None = None) -> str:
    parts = ["trainer", "sweep", sweep_file]
    if out:
        parts += ["--out", out]
    if results:
        parts += ["--results", results]
    if shards_dir:
        parts += ["--shards-dir", shards_dir]
    for n in only:
        parts += ["--only", n]
    return shlex.join(parts)


def results_folder(sweep: Sweep, out: str | None, results: str | None) -> Path:
    """--results, else <out> when --out is given (the report beside the runs), else results/<sweep name>."""
    if results:
        return Path(results)
    return Path(out) if out else Path("results") / sweep.name


@click.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of the run directories, checkpoints included (default: runs/sweeps/<sweep name>).")
@click.option("--results", type=click.Path(file_okay=False), default=None,
              help="Folder of the report and of the copies of each run's config.json / metrics.jsonl that it is "
                   "built from (default: results/<sweep name>, or --out when --out is given).")
@click.option("--shards-dir", type=click.Path(file_okay=False), default=None,
              help=f"Shared folder of shard sets (default: {DEFAULT_SHARDS_DIR}).")
@omniglot_option()
@cache_dir_option
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes building each shard set (seqgen build --workers).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Units of work at once, each in its own process on its share of the CPU cores (default: one per "
                   "core on the CPU, where that is fastest; 1 on an accelerator).")
@click.option("--group", type=click.IntRange(min=1), default=None,
              help="Train up to this many runs of one model shape as one vectorized step (default: 1 on the CPU, "
                   "where it is slower; 8 on an accelerator).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when on a terminal).")
@click.option("--only", multiple=True, metavar="NAME",
              help="Only this run: a setting (all its seeds) or SETTING/seed-S (repeat for several).")
@click.option("--dry-run", is_flag=True, help="Print the plan (sets to build / reuse, runs to train / skip) only.")
@click.option("--report-only", is_flag=True, help="Rewrite tables and figures from the results folder only.")
@click.option("--check", is_flag=True,
              help="Print each check's verdict; exit 1 if any is FAIL or PENDING (with --report-only or after a run).")
@sweep_errors
def sweep_command(sweep_file, out, results, shards_dir, omniglot_dir, cache_dir, workers, jobs, group, progress,
                  only, dry_run, report_only, check) -> None:
    """Build the shard sets, train every run of SWEEP_FILE, write results.csv/md and figures, check its claims."""
    code = _sweep(sweep_file, out, results, shards_dir, omniglot_dir, cache_dir, workers, jobs, group, progress,
                  only, dry_run, report_only, check)
    if code:
        sys.exit(code)


def _print_checks(sweep: Sweep, folder: Path, shards: Path) -> int:
    from trainer.sweep.report import check_report

    checks = check_report(sweep, folder, shards)
    if not checks:
        click.echo(f"{sweep.path} states no [[checks]]")
        return 0
    for c in checks:
        click.echo(f"{c.verdict.value:<12} {c.spec.claim}: {c.spec.describe()}; {c.detail}")
    bad = [c for c in checks if c.verdict in (Verdict.FAIL, Verdict.PENDING)]
    counts = {v: sum(c.verdict is v for c in checks) for v in Verdict}
    click.echo(", ".join(f"{n} {v.value}" for v, n in counts.items() if n))
    return 1 if bad else 0


def _sweep(sweep_file, out, results, shards_dir, omniglot_dir, cache_dir, workers, jobs, group, progress, only,
           dry_run, report_only, check) -> int:
    if dry_run and report_only:
        raise ConfigError("--dry-run and --report-only exclude each other; pass one")
    sweep = load_sweep(sweep_file)
    # the whole figure's command goes into the report; an interrupted subset is resumed with its own
    command = reproduce_command(sweep_file, out, shards_dir, (), results)
    resume = reproduce_command(sweep_file, out, shards_dir, only, results)
    shards = Path(shards_dir) if shards_dir else DEFAULT_SHARDS_DIR
    folder = results_folder(sweep, out, results)
    if report_only:
        from trainer.sweep.report import write_report

        if not (folder / "runs").is_dir():
            raise SweepError(f"{folder} holds no runs yet; run `{command}` first")
        for p in write_report(sweep, folder, command=command, shards_dir=shards):
            click.echo(str(p))
        return _print_checks(sweep, folder, shards) if check else 0
    plan = make_plan(sweep, out=out if out else default_out(sweep), shards_dir=shards, only=only, results=folder)
    for line in describe_plan(plan):
        click.echo(line)
    if dry_run:
        return 0
    from trainer.sweep.execute import cpu_groups, default_group, default_jobs

    # JAX in this process must not take most of an accelerator's memory from the workers (it only
    # looks up the platform and the hardware); the workers inherit the setting.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    jobs = default_jobs() if jobs is None else jobs
    cpu_groups(jobs)  # refuses more jobs than cores now, before any set is built
    group = default_group() if group is None else group
    outcome = execute(plan, command=command, results=folder, omniglot_dir=omniglot_dir, cache_dir=cache_dir,
                      workers=workers, jobs=jobs, group=group, progress=progress, echo=click.echo)
    for p in outcome.outputs:
        click.echo(str(p))
    if outcome.interrupted:
        click.echo(f"interrupted: progress saved; rerun `{resume}` to resume "
                   f"({len(outcome.trained)} runs finished this time)")
        return 130
    if outcome.failed:
        click.echo(f"error: {len(outcome.failed)} runs failed ({', '.join(outcome.failed)}); see their logs in "
                   f"{plan.out / 'logs'}", err=True)
        return 2
    click.echo(f"done: {len(outcome.trained)} runs trained, {len(outcome.skipped)} already finished; "
               f"results in {folder}")
    return _print_checks(sweep, folder, shards) if check else 0
