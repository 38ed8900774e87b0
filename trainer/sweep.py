"""`trainer sweep FILE`: one command per figure of the paper (build sets, train runs, tabulate, plot).

The sweep file's format is documented in `trainer.sweep_file`. For each run: the training set and the
evaluation sets are built into a shared folder (default `data/shards/sweeps/`), one per config, named
`<seq_type>-<sha256 of the BuildConfig, 12 hex>`, so sets are reused across runs and across sweeps. Runs
train into `<out>/runs/<name>` (default out: `runs/sweeps/<sweep name>`); a rerun skips finished runs,
resumes partial ones and evaluates a finished run on evaluation sets it has not seen. Ctrl+C stops the
sweep after the current run saves a checkpoint. `<out>` receives `results.csv`, `results.md`,
`figure.png`, `curves.png` (see `trainer.sweep_report`) and `sweep.json` (the resolved plan).
"""


from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from seqgen.config import BuildConfig, ConfigError, flatten
from trainer.errors import fail, known_errors

from trainer.sweep_file import (  # noqa: F401  (re-exported)
    DEFAULT_EVAL_SEQS, DEFAULT_EVAL_TYPES, DEFAULT_SHARDS_DIR, RunSpec, Sweep, SweepError, eval_config, load_sweep,
    _BOOKKEEPING,
)


# ---- planning ---------------------------------------------------------------------------------------
def config_hash(cfg: BuildConfig) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def set_folder(shards_dir: str | Path, cfg: BuildConfig) -> Path:
    return Path(shards_dir) / f"{cfg.seq_type.value}-{config_hash(cfg)}"


class SetAction(str, enum.Enum):
    BUILD = "build"
    RESUME = "resume build"
    REUSE = "reuse"


class RunAction(str, enum.Enum):
    TRAIN = "train"
    RESUME = "resume"
    EVALUATE = "evaluate"  # trained to the end, but not yet evaluated on (some of) the current sets
    SKIP = "skip"


@dataclasses.dataclass(frozen=True)
class SetPlan:
    cfg: BuildConfig
    folder: Path
    action: SetAction


@dataclasses.dataclass(frozen=True)
class RunPlan:
    spec: RunSpec
    run_dir: Path
    train_dir: Path
    eval_dirs: tuple[Path, ...]
    action: RunAction
    step: int  # latest checkpoint (0 when none)


@dataclasses.dataclass(frozen=True)
class Plan:
    sweep: Sweep
    out: Path
    shards_dir: Path
    sets: tuple[SetPlan, ...]
    runs: tuple[RunPlan, ...]


def set_action(cfg: BuildConfig, folder: Path) -> SetAction:
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            stored = json.loads(manifest.read_text()).get("config")
        except (json.JSONDecodeError, AttributeError):
            stored = None
        if stored != cfg.to_dict():
            raise SweepError(f"{folder} holds a different shard set than its name says; delete that folder")
        return SetAction.REUSE
    return SetAction.RESUME if folder.is_dir() and any(folder.iterdir()) else SetAction.BUILD


def final_results(run_dir: Path, step: int, set_names: Sequence[str]) -> dict[str, dict[str, Any]] | None:
    """{set name: metrics} of the evaluations at `step` on every named set (fit's metrics.jsonl or
    `trainer evaluate`'s evaluations/step-N.json); None when one is missing."""
    from trainer.sweep_report import final_records

    found = final_records(run_dir, step, set_names)
    return found if all(n in found for n in set_names) else None


def run_action(spec: RunSpec, run_dir: Path, train_dir: Path, eval_dirs: Sequence[Path]) -> tuple[RunAction, int]:
    from trainer.checkpoint import latest_step

    config = run_dir / "config.json"
    latest = latest_step(run_dir)
    if not config.is_file():
        if latest is not None:
            raise SweepError(f"{run_dir} holds checkpoints but no config.json; delete it or choose another --out")
        return RunAction.TRAIN, 0
    from trainer.config import TrainConfig

    try:
        stored = json.loads(config.read_text())
        old = TrainConfig.from_dict(stored["trainer"])
        old_train = Path(stored["data"]["train"]["path"]).name
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError):
        raise SweepError(f"{config} is unreadable; delete {run_dir} or choose another --out") from None
    diff = _difference(flatten(old.to_dict()), flatten(spec.trainer.to_dict()), ignore=_BOOKKEEPING)
    if diff or old_train != train_dir.name:
        what = f"trainer options ({diff})" if diff else f"a training set ({old_train}) of other seqgen options"
        raise SweepError(f"{run_dir} was trained with {what} than run '{spec.name}' of this sweep; "
                         "delete it or choose another --out")
    if latest is None:
        return RunAction.TRAIN, 0  # started but stopped before its first checkpoint: start afresh
    if latest < spec.steps:
        return RunAction.RESUME, latest
    if final_results(run_dir, latest, [p.name for p in eval_dirs]) is None:
        return RunAction.EVALUATE, latest
    return RunAction.SKIP, latest


def _difference(old: dict[str, Any], new: dict[str, Any], ignore: set[str]) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if k not in ignore and old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in keys[:2]) + (", ..." if len(keys) > 2 else "")


def default_out(sweep: Sweep) -> Path:
    return Path("runs/sweeps") / sweep.name


def make_plan(sweep: Sweep, *, out: str | Path | None = None, shards_dir: str | Path = DEFAULT_SHARDS_DIR,
              only: Sequence[str] = ()) -> Plan:
    """What a sweep would do now: which sets to build or reuse, which runs to train, resume or skip."""
    names = [r.name for r in sweep.runs]
    for n in only:
        if n not in names:
            raise ConfigError(f"--only {n}: no such run in {sweep.path}; runs: {', '.join(names)}")
    out = Path(out) if out is not None else default_out(sweep)
    shards_dir = Path(shards_dir)
    sets: dict[Path, SetPlan] = {}
    runs = []
    for spec in sweep.runs:
        if only and spec.name not in only:
            continue
        folders = []
        for cfg in (spec.train, *spec.evals):
            folder = set_folder(shards_dir, cfg)
            if folder not in sets:
                sets[folder] = SetPlan(cfg, folder, set_action(cfg, folder))
            folders.append(folder)
        run_dir = out / "runs" / spec.name
        action, step = run_action(spec, run_dir, folders[0], folders[1:])
        runs.append(RunPlan(spec, run_dir, folders[0], tuple(folders[1:]), action, step))
    return Plan(sweep, out, shards_dir, tuple(sets.values()), tuple(runs))


def describe_plan(plan: Plan) -> list[str]:
    lines = [f"sweep {plan.sweep.name} ({plan.sweep.path}): {len(plan.runs)} runs, output {plan.out}"]
    for s in plan.sets:
        lines.append(f"  set  {s.action.value:<12} {s.folder}  ({s.cfg.num_seqs} seqs)")
    for r in plan.runs:
        at = f" from step {r.step}" if r.action is RunAction.RESUME and r.step else ""
        passes = r.spec.steps * r.spec.trainer.training.batch_size / r.spec.train.num_seqs
        reuse = f", {passes:.1f} passes over its training set" if passes > 1 else ""
        lines.append(f"  run  {r.action.value:<12} {r.run_dir}  (x = {r.spec.x}, {r.spec.steps} steps{at}{reuse})")
    return lines


# ---- execution --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Outcome:
    interrupted: bool
    trained: tuple[str, ...]
    skipped: tuple[str, ...]
    outputs: tuple[Path, ...]


def _write_plan(plan: Plan) -> None:
    plan.out.mkdir(parents=True, exist_ok=True)
    record = {
        "sweep": str(plan.sweep.path), "name": plan.sweep.name, "x": plan.sweep.x_label,
        "sweep_file": plan.sweep.path.read_text(),
        "runs": [{"name": r.spec.name, "x": r.spec.x, "bases": list(r.spec.bases), "run_dir": str(r.run_dir),
                  "train": str(r.train_dir), "eval": [str(e) for e in r.eval_dirs],
                  "trainer": r.spec.trainer.to_dict(), "seqgen": r.spec.train.to_dict()} for r in plan.runs],
    }
    tmp = plan.out / "sweep.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(plan.out / "sweep.json")


def execute(plan: Plan, *, command: str, omniglot_dir: Any = None, cache_dir: Any = "data/cache",
            workers: int = 1, progress: bool | None = None, interrupt: Any = None,
            echo: Callable[[str], None] = print) -> Outcome:
    """Build the missing sets, train / resume / evaluate the runs, then write the report."""
    from seqgen.build import build
    from trainer.evaluate_cli import evaluate_run
    from trainer.fit import fit
    from trainer.signals import GracefulInterrupt
    from trainer.sweep_report import record_hardware, write_report

    stop = interrupt or GracefulInterrupt()
    _write_plan(plan)
    for s in plan.sets:
        if s.action is not SetAction.REUSE:
            echo(f"{s.action.value}: {s.folder}")
            build(s.cfg, s.folder, workers=workers, omniglot_dir=omniglot_dir, cache_dir=cache_dir,
                  progress=bool(progress) if progress is not None else True)
    trained, skipped, interrupted = [], [], False
    for r in plan.runs:
        if r.action is RunAction.SKIP:
            skipped.append(r.spec.name)
            continue
        if stop.stop_requested:
            interrupted = True
            break
        if r.action is RunAction.EVALUATE:
            echo(f"evaluate: {r.spec.name} at step {r.step}")
            from trainer.distributed import make_topology

            res = evaluate_run(r.run_dir, r.eval_dirs, step=r.step, train_dir=r.train_dir,
                               max_seqs=r.spec.trainer.training.eval_seqs,
                               batch_size=r.spec.trainer.training.eval_batch_size, omniglot_dir=omniglot_dir,
                               cache_dir=cache_dir, topo=make_topology(), echo=lambda _: None)
            if res is None:
                interrupted = True
                break
        else:
            if r.action is RunAction.TRAIN:  # a run of this config that never saved a checkpoint
                for stale in ("config.json", "metrics.jsonl"):
                    (r.run_dir / stale).unlink(missing_ok=True)
            where = f" from step {r.step}" if r.action is RunAction.RESUME else ""
            echo(f"{r.action.value}: {r.spec.name} (x = {r.spec.x}){where} -> {r.run_dir}")
            result = fit(r.spec.trainer, r.train_dir, r.eval_dirs, r.run_dir, resume=r.action is RunAction.RESUME,
                         omniglot_dir=omniglot_dir, cache_dir=cache_dir, progress=progress, interrupt=stop)
            if result.interrupted:
                interrupted = True
                break
        trained.append(r.spec.name)
        record_hardware(plan.out, r.spec.name)
        write_report(plan.sweep, plan.out, command=command, shards_dir=plan.shards_dir)
    outputs = write_report(plan.sweep, plan.out, command=command, shards_dir=plan.shards_dir)
    return Outcome(interrupted, tuple(trained), tuple(skipped), tuple(outputs))


# ---- command line -----------------------------------------------------------------------------------
def reproduce_command(sweep_file: str, out: str | None, shards_dir: str | None, only: Sequence[str]) -> str:
    parts = ["trainer", "sweep", sweep_file]
    if out:
        parts += ["--out", out]
    if shards_dir:
        parts += ["--shards-dir", shards_dir]
    for n in only:
        parts += ["--only", n]
    return shlex.join(parts)


@click.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: runs/sweeps/<sweep name>).")
@click.option("--shards-dir", type=click.Path(file_okay=False), default=None,
              help=f"Shared folder of shard sets (default: {DEFAULT_SHARDS_DIR}).")
@click.option("--omniglot", "omniglot_dir", type=click.Path(file_okay=False), default=None,
              help="Omniglot folder (default: $OMNIGLOT_DIR or data/omniglot).")
@click.option("--cache-dir", default="data/cache", show_default=True, type=click.Path(file_okay=False),
              help="Where the cached image table lives.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes building each shard set (seqgen build --workers).")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when on a terminal).")
@click.option("--only", multiple=True, metavar="NAME", help="Only this run (repeat for several).")
@click.option("--dry-run", is_flag=True, help="Print the plan (sets to build / reuse, runs to train / skip) only.")
@click.option("--report-only", is_flag=True, help="Rewrite tables and figures from the existing runs only.")
def sweep_command(sweep_file, out, shards_dir, omniglot_dir, cache_dir, workers, progress, only, dry_run,
                  report_only) -> None:
    """Build the shard sets, train every run of SWEEP_FILE, and write results.csv/md and figures."""
    try:
        _sweep(sweep_file, out, shards_dir, omniglot_dir, cache_dir, workers, progress, only, dry_run, report_only)
    except (SweepError, *known_errors()) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.strerror or e}" + (f" ({e.filename})" if getattr(e, "filename", None) else ""))
    except KeyboardInterrupt:
        click.echo("interrupted; rerun the same command to resume (finished sets and runs are kept)", err=True)
        sys.exit(130)


def _sweep(sweep_file, out, shards_dir, omniglot_dir, cache_dir, workers, progress, only, dry_run,
           report_only) -> None:
    if dry_run and report_only:
        raise ConfigError("--dry-run and --report-only exclude each other; pass one")
    sweep = load_sweep(sweep_file)
    command = reproduce_command(sweep_file, out, shards_dir, only)
    shards = Path(shards_dir) if shards_dir else DEFAULT_SHARDS_DIR
    if report_only:
        from trainer.sweep_report import write_report

        target = Path(out) if out else default_out(sweep)
        if not (target / "runs").is_dir():
            raise SweepError(f"{target} holds no runs yet; run `{command}` first")
        for p in write_report(sweep, target, command=command, shards_dir=shards):
            click.echo(str(p))
        return
    plan = make_plan(sweep, out=out, shards_dir=shards, only=only)
    for line in describe_plan(plan):
        click.echo(line)
    if dry_run:
        return
    outcome = execute(plan, command=command, omniglot_dir=omniglot_dir, cache_dir=cache_dir, workers=workers,
                      progress=progress, echo=click.echo)
    for p in outcome.outputs:
        click.echo(str(p))
    if outcome.interrupted:
        click.echo(f"interrupted: progress saved; rerun `{command}` to resume "
                   f"({len(outcome.trained)} runs finished this time)")
        sys.exit(130)
    click.echo(f"done: {len(outcome.trained)} runs trained, {len(outcome.skipped)} already finished; "
               f"results in {plan.out}")
