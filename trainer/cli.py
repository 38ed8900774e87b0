"""`trainer` command line: fit, evaluate (one-off or --watch), plot, sweep, analyze.

Options resolve as: defaults < `[trainer.*]` tables of `--config FILE` < command-line options. Every
known error is printed as one line `error: ...` with exit code 2.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable

import click

from seqgen.cliopts import cache_dir_option, omniglot_option
from seqgen.config import flatten, load_toml
from seqgen.errors import OneLineGroup
from trainer.config import FIT_OPTIONS, TrainConfig, train_config_from_toml, with_overrides
from trainer.runtime.errors import one_line_errors


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train and evaluate the paper's model on seqgen shard sets."""


def _config_from(config_file: str | None, overrides: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """defaults (or `base`: a resumed run's stored config) < the file's [trainer.*] tables < `overrides`."""
    if base is None:
        base = train_config_from_toml(load_toml(config_file)) if config_file else TrainConfig()
    elif config_file:
        data = load_toml(config_file)
        train_config_from_toml(data)  # refuses unknown keys and wrong types, one line
        base = with_overrides(base, flatten(data.get("trainer", {})))
    return with_overrides(base, overrides).validate()


def _stored_config(run_dir: str) -> TrainConfig | None:
    """The config a --resume continues (None when the run directory holds no run: fit then says so)."""
    from trainer.run import RunDir

    run = RunDir(run_dir)
    return run.train_config() if run.exists() else None


def _positive_finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number of seconds > 0, got {value}")
    return value


def _common_data_options(fn: Callable) -> Callable:
    fn = omniglot_option()(fn)
    fn = cache_dir_option(fn)
    fn = click.option("--devices", type=click.IntRange(min=1), default=None,
                      help="Use only the first N local devices (default: all).")(fn)
    fn = click.option("--process-id", type=click.IntRange(min=0), envvar="JAX_PROCESS_ID",
                      help="Multi-host: this process's id (env JAX_PROCESS_ID).")(fn)
    fn = click.option("--num-processes", type=click.IntRange(min=1), envvar="JAX_NUM_PROCESSES",
                      help="Multi-host: number of processes (env JAX_NUM_PROCESSES).")(fn)
    fn = click.option("--coordinator", envvar="JAX_COORDINATOR_ADDRESS",
                      help="Multi-host: host:port of process 0 (env JAX_COORDINATOR_ADDRESS).")(fn)
    fn = click.option("--heartbeat-timeout", type=click.IntRange(min=1), default=100, show_default=True,
                      envvar="TRAINER_HEARTBEAT_TIMEOUT",
                      help="Multi-host: seconds of silence after which a hung process counts as dead and "
                           "the job ends (env TRAINER_HEARTBEAT_TIMEOUT).")(fn)
    fn = click.option("--init-timeout", type=click.IntRange(min=1), default=300, show_default=True,
                      envvar="TRAINER_INIT_TIMEOUT",
                      help="Multi-host: seconds to wait for every process to join (env TRAINER_INIT_TIMEOUT).")(fn)
    fn = click.option("--distributed", is_flag=True,
                      help="Multi-host: call jax.distributed.initialize() (Slurm / MPI / TPU detected, "
                           "else --coordinator, --num-processes, --process-id).")(fn)
    return fn


@main.command()
@click.option("--train", "train_dir", required=True, type=click.Path(), help="Training shard set (seqgen build).")
@click.option("--eval", "eval_dirs", multiple=True, type=click.Path(), help="Eval shard set; repeat for several.")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="Run directory (e.g. runs/NAME).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file; its [trainer.*] tables.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its latest checkpoint.")
@FIT_OPTIONS
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when on a terminal).")
@_common_data_options
@one_line_errors
def fit(train_dir, eval_dirs, run_dir, config_file, resume, progress, omniglot_dir, cache_dir, devices,
        distributed, coordinator, num_processes, process_id, init_timeout, heartbeat_timeout, **opts) -> None:
    """Train on TRAIN shards, evaluating on each --eval set every --eval-every steps.

    Settings: defaults (shown) < the [trainer.*] tables of --config FILE < the options given; with --resume
    the run's stored config replaces the defaults, and only --steps may differ from it."""
    from trainer.runtime.distributed import initialize, make_topology
    from trainer.fit import fit as run_fit
    from trainer.runtime.multihost import exit_on_failure

    initialize(distributed, coordinator, num_processes, process_id, init_timeout=init_timeout,
               heartbeat_timeout=heartbeat_timeout)
    # --resume continues the stored config: options given now must agree with it (only --steps may change)
    cfg = _config_from(config_file, FIT_OPTIONS.overrides(opts),
                       base=_stored_config(run_dir) if resume else None)
    topo = make_topology(devices)
    with exit_on_failure(topo):
        result = run_fit(cfg, train_dir, eval_dirs, run_dir, resume=resume, omniglot_dir=omniglot_dir,
                         cache_dir=cache_dir, topo=topo, progress=progress, strict_resume=True)
    if result.interrupted:
        click.echo(f"interrupted: checkpoint saved at step {result.step} in {run_dir}; continue with --resume")
        sys.exit(130)
    click.echo(f"done: {result.step} steps; run directory {run_dir}")


@main.command()
@click.argument("eval_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="Run directory of a fit.")
@click.option("--step", type=int, help="Checkpoint step (default: the latest).")
@click.option("--train", "train_dir", type=click.Path(), help="Training shard set, if it moved since fit.")
@click.option("--max-seqs", type=click.IntRange(min=1), help="Evaluate at most this many sequences per set.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Sequences per evaluation batch.")
@click.option("--watch", is_flag=True, help="Follow a running fit: evaluate each new checkpoint as it appears.")
@click.option("--poll", type=float, default=30.0, show_default=True, callback=_positive_finite,
              help="Seconds between checks with --watch.")
@_common_data_options
@one_line_errors
def evaluate(eval_dirs, run_dir, step, train_dir, max_seqs, batch_size, watch, poll, omniglot_dir, cache_dir,
             devices, distributed, coordinator, num_processes, process_id, init_timeout, heartbeat_timeout) -> None:
    """Evaluate a run's checkpoint on EVAL_DIRS: a table on stdout, JSON in RUN_DIR/evaluations/."""
    from trainer.runtime.distributed import initialize, make_topology
    from trainer.evaluate import evaluate_run, watch_run
    from trainer.runtime.multihost import exit_on_failure

    from trainer.runtime.signals import GracefulInterrupt, set_early_message

    set_early_message("before any evaluation was written")
    initialize(distributed, coordinator, num_processes, process_id, init_timeout=init_timeout,
               heartbeat_timeout=heartbeat_timeout)
    topo = make_topology(devices)
    stop = GracefulInterrupt("stopping the evaluation; nothing is saved")
    kwargs = dict(train_dir=train_dir, max_seqs=max_seqs, batch_size=batch_size, omniglot_dir=omniglot_dir,
                  cache_dir=cache_dir, topo=topo, echo=click.echo, interrupt=stop)
    with exit_on_failure(topo):
        if watch:
            watch_run(run_dir, eval_dirs, poll=poll, **kwargs)
        else:
            evaluate_run(run_dir, eval_dirs, step=step, **kwargs)
    if stop.stop_requested:
        sys.exit(130)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@one_line_errors
def plot(run_dir) -> None:
    """Write PNGs of ICL / IWL accuracy and loss against step into RUN_DIR/plots/."""
    from trainer.plots import plot_run

    for path in plot_run(run_dir):
        click.echo(str(path))


def _register_sweep() -> None:
    from trainer.sweep.cli import sweep_command
    from trainer.sweep.page import claims_command

    callback = sweep_command.callback

    @functools.wraps(callback)
    def sweep_with_its_own_interrupts(*args: Any, **kwargs: Any) -> Any:
        from trainer.runtime.signals import use_keyboard_interrupt

        use_keyboard_interrupt()  # the sweep turns KeyboardInterrupt into its one line and exit 130
        return callback(*args, **kwargs)

    sweep_command.callback = sweep_with_its_own_interrupts
    main.add_command(sweep_command, "sweep")
    main.add_command(claims_command, "claims")


_register_sweep()


def _register_analyze() -> None:
    from trainer.analyze.cli import analyze_command

    main.add_command(analyze_command, "analyze")


_register_analyze()

if __name__ == "__main__":  # pragma: no cover
    main()
