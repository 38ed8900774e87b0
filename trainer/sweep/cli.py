"""`trainer sweep FILE`: one command per figure of the paper (build sets, train runs, tabulate, plot, check)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

import click

from seqgen.cliopts import cache_dir_option, omniglot_option
from seqgen.configio import ConfigError
from trainer.runtime.errors import sweep_errors
from trainer.sweep.checks import Verdict
from trainer.sweep.cluster import (
    CLUSTER, EXECUTORS, Resources, job_lines, parse_slurm_args, planned_units, run_on_cluster,
)
from trainer.sweep.execute import Outcome, execute
from trainer.sweep.plan import Plan, RunAction, default_out, describe_plan, make_plan
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
@click.argument("sweep_file", type=click.Path())
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
@click.option("--log-to", "log_to", multiple=True, type=click.Choice(("tensorboard", "wandb")),
              help="Mirror every run's records live to TensorBoard / W&B (besides the file's [sweep] log_to), each "
                   "named <setting>/seed-<s> (trainer.sinks).")
@click.option("--check", is_flag=True,
              help="Print each check's verdict; exit 1 if any is FAIL or PENDING (with --report-only or after a run).")
@click.option("--executor", type=click.Choice(EXECUTORS), default="here", show_default=True,
              help="here: on this machine (this process, or --jobs worker processes). slurm: one Slurm job per unit "
                   "of work (a run, or a --group of runs), through submitit. local: submitit's local executor, for "
                   "trying a sweep's job layout on one machine.")
@click.option("--partition", default=None, help="Slurm partition of the jobs (--executor slurm).")
@click.option("--time", "time_min", type=click.IntRange(min=1), default=None,
              help="Time limit of each job in minutes (default 60); near it a job saves and is requeued.")
@click.option("--gpus-per-job", type=click.IntRange(min=0), default=None, help="GPUs per job (default 0).")
@click.option("--cpus-per-job", type=click.IntRange(min=1), default=None,
              help="CPU cores per job (default: the cluster's).")
@click.option("--mem", "mem_gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Memory per job in GB (default: the cluster's).")
@click.option("--slurm-arg", multiple=True, metavar="KEY=VALUE",
              help="Any other sbatch option, without its dashes (e.g. account=abc, qos=high); repeat for several.")
@click.option("--wait/--no-wait", default=True,
              help="After submitting: wait for the jobs and write the report (default), or return with their ids "
                   "(then --report-only writes the report).")
@sweep_errors
def sweep_command(sweep_file, out, results, shards_dir, omniglot_dir, cache_dir, workers, jobs, group, progress,
                  only, dry_run, report_only, log_to, check, executor, partition, time_min, gpus_per_job,
                  cpus_per_job, mem_gb, slurm_arg, wait) -> None:
    """Build the shard sets, train every run of SWEEP_FILE, write results.csv/md and figures, check its claims."""
    resources = _resources(executor, jobs, partition, time_min, gpus_per_job, cpus_per_job, mem_gb, slurm_arg, wait)
    code = _sweep(sweep_file, out, results, shards_dir, omniglot_dir, cache_dir, workers, jobs, group, progress,
                  only, dry_run, report_only, check, tuple(log_to), executor, resources, wait)
    if code:
        sys.exit(code)


def _resources(executor: str, jobs: int | None, partition: str | None, time_min: int | None, gpus: int | None,
               cpus: int | None, mem_gb: float | None, slurm_arg: Sequence[str], wait: bool) -> Resources | None:
    """The jobs' resources for a cluster executor; None for `here`, which refuses every job option."""
    given = {"--partition": partition, "--time": time_min, "--gpus-per-job": gpus, "--cpus-per-job": cpus,
             "--mem": mem_gb, "--slurm-arg": slurm_arg or None, "--no-wait": None if wait else True}
    if executor not in CLUSTER:
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise ConfigError(f"{named[0]} is an option of cluster jobs; add --executor slurm (or local)")
        return None
    if executor == "local" and jobs is not None:
        raise ConfigError("--jobs caps the Slurm jobs that run at once; the local executor starts every job at once")
    return Resources(time_min=Resources.time_min if time_min is None else time_min, partition=partition,
                     gpus=gpus or 0, cpus=cpus, mem_gb=mem_gb, slurm_args=parse_slurm_args(slurm_arg), at_once=jobs)


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
           dry_run, report_only, check, log_to: tuple[str, ...] = (), executor="here", resources=None,
           wait=True) -> int:
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
    if resources is not None:
        if sweep.log_to or log_to:
            raise SweepError("live tracking (--log-to, [sweep] log_to) runs with --executor here only; drop it for "
                             "cluster jobs and write event files afterwards with `trainer export-tb RUN`")
        return _on_cluster(plan, sweep, folder, shards, command, executor, resources, wait, omniglot_dir, cache_dir,
                           workers, group, progress, dry_run, check)
    if dry_run:
        return 0
    from trainer.sinks import check_available

    check_available(sweep.log_to + log_to)  # a missing library: one line, before anything starts
    from trainer.sweep.execute import cpu_groups, default_group, default_jobs

    # JAX in this process must not take most of an accelerator's memory from the workers (it only
    # looks up the platform and the hardware); the workers inherit the setting.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from trainer.runtime.platform import start, start_line

    start(None, plan.runs[0].spec.trainer.compute if plan.runs else None, warn=lambda w: click.echo(w, err=True))
    if plan.runs:
        click.echo(start_line(plan.runs[0].spec.trainer))
    jobs = default_jobs() if jobs is None else jobs
    cpu_groups(jobs)  # refuses more jobs than cores now, before any set is built
    group = default_group() if group is None else group
    run = dict(command=command, results=folder, omniglot_dir=omniglot_dir, cache_dir=cache_dir, workers=workers,
               jobs=jobs, group=group, progress=progress, echo=click.echo, log_to=log_to)
    outcome = execute(plan, **run)
    if not (outcome.interrupted or outcome.failed):
        # The runs trained now were evaluated on eval_seqs sequences per set during training; their final
        # evaluations read the whole sets (plan.final_results), as a second, evaluate-only pass.
        plan = make_plan(sweep, out=out if out else default_out(sweep), shards_dir=shards, only=only, results=folder)
        if any(r.action is RunAction.EVALUATE for r in plan.runs):
            final = execute(plan, **run)
            outcome = dataclasses.replace(final, trained=outcome.trained, skipped=outcome.skipped)
    return _ending(outcome, plan, sweep, folder, shards, f"rerun `{resume}` to resume", check)


def _on_cluster(plan: Plan, sweep: Sweep, folder: Path, shards: Path, command: str, executor: str,
                resources: Resources, wait: bool, omniglot_dir, cache_dir, workers: int, group: int | None,
                progress: bool | None, dry_run: bool, check: bool) -> int:
    """`--executor slurm | local` (trainer.sweep.cluster): one job per unit of work."""
    group = (8 if resources.gpus else 1) if group is None else group  # a GPU per job: runs share it in groups
    if dry_run:
        units, note = planned_units(plan, group)
        for line in job_lines(units, resources, executor, note):
            click.echo(line)
        return 0
    outcome = run_on_cluster(plan, executor=executor, resources=resources, command=command, results=folder,
                             omniglot_dir=omniglot_dir, cache_dir=cache_dir, workers=workers, group=group,
                             progress=progress, wait=wait, echo=click.echo)
    later = f"`{command} --report-only` writes the report when they end"
    if outcome.pending and not wait:
        click.echo(f"submitted {len(outcome.pending)} jobs ({', '.join(outcome.pending)}); they go on without this "
                   f"command: {later}")
        return 0
    if outcome.pending:
        click.echo(f"stopped waiting: {len(outcome.pending)} jobs go on ({', '.join(outcome.pending)}); {later}")
        return 130
    return _ending(outcome, plan, sweep, folder, shards, "rerun the same command to resubmit what is unfinished",
                   check)


def _ending(outcome: Outcome, plan: Plan, sweep: Sweep, folder: Path, shards: Path, resume: str,
            check: bool) -> int:
    """The sweep's last lines and exit status, whichever executor ran it."""
    for p in outcome.outputs:
        click.echo(str(p))
    if outcome.interrupted:
        click.echo(f"interrupted: progress saved; {resume} ({len(outcome.trained)} runs finished this time)")
        return 130
    if outcome.failed:
        click.echo(f"error: {len(outcome.failed)} runs failed ({', '.join(outcome.failed)}); see their logs in "
                   f"{plan.out / 'logs'}", err=True)
        return 2
    click.echo(f"done: {len(outcome.trained)} runs trained, {len(outcome.skipped)} already finished; "
               f"results in {folder}")
    return _print_checks(sweep, folder, shards) if check else 0
