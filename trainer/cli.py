"""`trainer` command line: fit, evaluate (one-off or --watch), plot, export-tb, sweep, analyze.

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
from seqgen.configio import flatten, load_toml
from seqgen.errors import OneLineGroup
from trainer.config import COMPUTE_OPTIONS, FIT_OPTIONS, TrainConfig, train_config_from_toml, with_overrides
from trainer.runtime.errors import one_line_errors, rerun_errors


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
    if not run.exists():
        run.restore_config()  # config.json gone but the checkpoints hold it (RunDir.describe advises --resume)
    return run.train_config() if run.exists() else None


def _evaluated_config(run_dir: str) -> TrainConfig | None:
    """The config of the run `evaluate` reads, for how to compute (None when it has none: `evaluate` then says
    what is wrong, once the backend has started). Read only: unlike a --resume, nothing is restored."""
    from trainer.run import RunDir, RunError

    try:
        return RunDir(run_dir).train_config()
    except RunError:
        return None


_allow_train_eval_option = click.option(
    "--allow-train-eval", is_flag=True,
    help="Allow an evaluation set that is the training set itself (refused otherwise: it measures memorised "
         "training sequences).")


SINK_CHOICES = ("tensorboard", "wandb")  # trainer.sinks.SINK_NAMES (not imported here: the CLI starts fast)
_log_to_option = click.option(
    "--log-to", "log_to", multiple=True, type=click.Choice(SINK_CHOICES),
    help="Mirror every record of metrics.jsonl live to TensorBoard (event files in the run directory) or W&B "
         "(repeat for both; needs the extra: pip install -e \".[tensorboard]\" / \".[wandb]\").")


def _tracking(log_to: tuple[str, ...]):
    """The `trainer.sinks.Tracking` of --log-to (None without it); a missing library is refused here, in one
    line, before anything starts."""
    if not log_to:
        return None
    from trainer.sinks import Tracking, check_available

    check_available(log_to)
    return Tracking(tuple(dict.fromkeys(log_to)))


def _eval_specs(eval_dirs: tuple[str, ...], allow_train_eval: bool) -> list:
    """The evaluation sets given (DIR or NAME=DIR), as `trainer.data.EvalSpec`s; names and roles are checked
    with the sets (`trainer.data.open_sets`)."""
    from trainer.data import parse_eval_spec

    return [parse_eval_spec(e, also_train=allow_train_eval) for e in eval_dirs]


def _check_run_dir_path(run_dir: str, what: str = "run directory") -> None:
    """fit's --run-dir (and --profile) may be missing (it is created) but not something else than a folder (a
    file, a link loop, ...): described as it is (`seqgen.files.describe_path`)."""
    from seqgen.files import describe_path
    from trainer.run import RunError

    problem = describe_path(run_dir, "dir")
    if problem is not None and problem != "does not exist":
        raise RunError(f"{what} {run_dir} {problem}; pass a folder (it is created if missing)")


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
    fn = click.option("--platform", type=click.Choice(["auto", "cpu", "gpu"]), default=None,
                      help="Where to compute (default: $JAX_PLATFORMS, else JAX's choice: a GPU when its CUDA "
                           "backend is installed); gpu where none is usable is refused (trainer doctor).")(fn)
    fn = click.option("--distributed", is_flag=True,
                      help="Multi-host: call jax.distributed.initialize() (Slurm / MPI / TPU detected, "
                           "else --coordinator, --num-processes, --process-id).")(fn)
    return fn


def _start(platform: str | None, cfg: TrainConfig | None, devices: int | None, distributed: bool, *multihost: Any):
    """Before JAX's backend starts: the platform, XLA's flags and the compilation cache
    (`trainer.runtime.platform.prepare`); then the distributed job, the backend (refused in one line when it
    cannot start) and the devices. Warns when an NVIDIA GPU is present but unused."""
    from trainer.runtime.distributed import initialize, make_topology
    from trainer.runtime.platform import start

    coordinator, num_processes, process_id, init_timeout, heartbeat_timeout = multihost
    start(platform, cfg.compute if cfg is not None else None, warn=lambda w: click.echo(w, err=True),
          initialize=lambda: initialize(distributed, coordinator, num_processes, process_id,
                                        init_timeout=init_timeout, heartbeat_timeout=heartbeat_timeout))
    return make_topology(devices)


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file; its [trainer.*] tables.")
@click.option("--platform", type=click.Choice(["auto", "cpu", "gpu"]), default=None,
              help="Where to compute (default: $JAX_PLATFORMS, else JAX's choice).")
@COMPUTE_OPTIONS
@one_line_errors
def doctor(config_file, platform, **opts) -> None:
    """Where and how runs would compute: versions, backend, devices, GPU present but unused, settings."""
    from trainer.runtime.platform import doctor_lines, prepare

    cfg = _config_from(config_file, COMPUTE_OPTIONS.overrides(opts))
    prepare(platform, cfg.compute)
    lines, ok = doctor_lines(cfg)
    for line in lines:
        click.echo(line)
    if not ok:
        sys.exit(1)


@main.command()
@click.option("--train", "train_dir", required=True, type=click.Path(), help="Training shard set (seqgen build).")
@click.option("--eval", "eval_dirs", multiple=True, type=click.Path(),
              help="Eval shard set, or NAME=PATH to record its results as NAME (default: the folder's name); "
                   "repeat for several.")
@click.option("--run-dir", required=True, type=click.Path(), help="Run directory (e.g. runs/NAME).")
@click.option("--config", "config_file", type=click.Path(), help="TOML file; its [trainer.*] tables.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its latest checkpoint.")
@_allow_train_eval_option
@FIT_OPTIONS
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when on a terminal).")
@_log_to_option
@click.option("--profile", "profile_dir", type=click.Path(),
              help="Write a jax.profiler trace of training dispatches 2-4 (after compiling and warm-up) into "
                   "DIR, for TensorBoard or Perfetto (docs/speed.md).")
@_common_data_options
@one_line_errors
def fit(train_dir, eval_dirs, run_dir, config_file, resume, allow_train_eval, progress, log_to, profile_dir,
        omniglot_dir,
        cache_dir, devices, platform, distributed, coordinator, num_processes, process_id, init_timeout,
        heartbeat_timeout, **opts) -> None:
    """Train on TRAIN shards, evaluating on each --eval set every --eval-every steps.

    Settings: defaults (shown) < the [trainer.*] tables of --config FILE < the options given; with --resume
    the run's stored config replaces the defaults, and only --steps may differ from it."""
    from trainer.fit import fit as run_fit
    from trainer.runtime.multihost import exit_on_failure

    _check_run_dir_path(run_dir)
    tracking = _tracking(log_to)
    if profile_dir is not None:
        _check_run_dir_path(profile_dir, "--profile")
    eval_dirs = _eval_specs(eval_dirs, allow_train_eval)
    # --resume continues the stored config: options given now must agree with it (only --steps may change)
    cfg = _config_from(config_file, FIT_OPTIONS.overrides(opts),
                       base=_stored_config(run_dir) if resume else None)
    topo = _start(platform, cfg, devices, distributed, coordinator, num_processes, process_id, init_timeout,
                  heartbeat_timeout)
    with exit_on_failure(topo):
        result = run_fit(cfg, train_dir, eval_dirs, run_dir, resume=resume, omniglot_dir=omniglot_dir,
                         cache_dir=cache_dir, topo=topo, progress=progress, strict_resume=True, announce=click.echo,
                         tracking=tracking, profile=profile_dir)
    if result.interrupted:
        click.echo(f"interrupted: checkpoint saved at step {result.step} in {run_dir}; continue with --resume")
        sys.exit(130)
    click.echo(f"done: {result.step} steps; run directory {run_dir}")


@main.command()
@click.argument("eval_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--run-dir", required=True, type=click.Path(), help="Run directory of a fit.")
@click.option("--step", type=int, help="Checkpoint step (default: the latest).")
@click.option("--train", "train_dir", type=click.Path(), help="Training shard set, if it moved since fit.")
@click.option("--max-seqs", type=click.IntRange(min=1), help="Evaluate at most this many sequences per set.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Sequences per evaluation batch.")
@click.option("--watch", is_flag=True, help="Follow a running fit: evaluate each new checkpoint as it appears.")
@click.option("--poll", type=float, default=30.0, show_default=True, callback=_positive_finite,
              help="Seconds between checks with --watch.")
@_allow_train_eval_option
@_log_to_option
@_common_data_options
@rerun_errors
def evaluate(eval_dirs, run_dir, step, train_dir, max_seqs, batch_size, watch, poll, allow_train_eval, log_to,
             omniglot_dir, cache_dir, devices, platform, distributed, coordinator, num_processes, process_id,
             init_timeout, heartbeat_timeout) -> None:
    """Evaluate a run's checkpoint on EVAL_DIRS (each DIR, or NAME=DIR to record it as NAME): a table on stdout,
    records in RUN_DIR/metrics.jsonl and RUN_DIR/evaluations/."""
    from trainer.evaluate import evaluate_run, watch_run
    from trainer.runtime.multihost import exit_on_failure

    from trainer.runtime.signals import GracefulInterrupt, set_early_message

    set_early_message("before any evaluation was written")
    tracking = _tracking(log_to)
    eval_dirs = _eval_specs(eval_dirs, allow_train_eval)
    topo = _start(platform, _evaluated_config(run_dir), devices, distributed, coordinator, num_processes,
                  process_id, init_timeout, heartbeat_timeout)
    stop = GracefulInterrupt("stopping the evaluation; nothing is saved")
    kwargs = dict(train_dir=train_dir, max_seqs=max_seqs, batch_size=batch_size, omniglot_dir=omniglot_dir,
                  cache_dir=cache_dir, topo=topo, echo=click.echo, interrupt=stop, tracking=tracking)
    with exit_on_failure(topo):
        if watch:
            watch_run(run_dir, eval_dirs, poll=poll, **kwargs)
        else:
            evaluate_run(run_dir, eval_dirs, step=step, **kwargs)
    if stop.stop_requested:
        sys.exit(130)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Compare the runs in one PNG written here: ICL and IWL against step, one line per run (a "
                   "mean and min-max band per setting whose seeds are all given); needed for several runs.")
@click.option("--each", is_flag=True, help="With --out: a line per run, seeds not averaged.")
@rerun_errors
def plot(run_dirs, out, each) -> None:
    """Write PNGs of ICL / IWL accuracy and loss against step into RUN_DIR/plots/; with several RUN_DIRS and
    --out FILE, one figure comparing them."""
    from trainer.plots import plot_compare, plot_run
    from trainer.run import RunError

    if out is None:
        if len(run_dirs) > 1:
            raise RunError(f"{len(run_dirs)} runs are compared in one figure: name it with --out FILE.png")
        if each:
            raise RunError("--each goes with --out FILE.png (a comparison figure)")
        paths = plot_run(run_dirs[0])
    else:
        paths = [plot_compare(run_dirs, out, mean=not each)]
    for path in paths:
        click.echo(str(path))


@main.command("export-tb")
@click.argument("run_dir", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of the event file (default: the run directory, where --log-to tensorboard writes).")
@rerun_errors
def export_tb(run_dir, out) -> None:
    """Write TensorBoard event files of a run from its metrics.jsonl (a run trained without --log-to
    tensorboard, or whose live sink failed)."""
    from trainer.sinks import export_tensorboard

    click.echo(str(export_tensorboard(run_dir, out)))


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


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--train", "train_dir", required=True, type=click.Path(),
              help="The run's training set (its manifest fingerprint must be the recorded one).")
@click.option("--steps", type=click.IntRange(min=1), required=True, help="Replay the first this many steps.")
@click.option("--scratch", type=click.Path(), help="Train the replay here (default: a temporary folder, removed).")
@click.option("--platform", type=click.Choice(["auto", "cpu", "gpu"]), default=None,
              help="Where to compute (default: $JAX_PLATFORMS, else JAX's choice).")
@omniglot_option()
@cache_dir_option
@rerun_errors
def replay(run_dir, train_dir, steps, scratch, platform, omniglot_dir, cache_dir) -> None:
    """Train the first --steps steps of the run in RUN_DIR again, here, and compare its logged training
    losses with the recorded ones; exit 0 when every logged step is bitwise equal, 1 when one differs."""
    from trainer.replay import replay as run_replay
    from trainer.runtime.platform import start

    stored = _evaluated_config(run_dir)
    start(platform, stored.compute if stored is not None else None, warn=lambda w: click.echo(w, err=True))
    result = run_replay(run_dir, train_dir, steps, omniglot_dir=omniglot_dir, cache_dir=cache_dir,
                        scratch=scratch, echo=click.echo)
    for line in result.lines():
        click.echo(line)
    sys.exit(0 if result.first_difference is None else 1)


def _register_analyze() -> None:
    from trainer.analyze.cli import analyze_command

    main.add_command(analyze_command, "analyze")


_register_analyze()

if __name__ == "__main__":  # pragma: no cover
    main()
