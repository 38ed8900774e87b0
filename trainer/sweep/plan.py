"""What a sweep would do now: which shard sets to build or reuse, which runs to train, resume, evaluate or skip.

Shard sets live in a shared folder (default `data/shards/sweeps/`), one per config, named
`<seq_type>-<sha256 of the BuildConfig, 12 hex>`, so sets are reused across runs, seeds and sweeps. Runs
train into `<out>/runs/<run name>` (default out: `runs/sweeps/<sweep name>`); a run is skipped when its
final evaluations are there (with its final checkpoint, or with no checkpoints at all: a published results
folder copied back), resumed from its latest checkpoint when partial, and evaluated (not retrained) when
finished but not yet scored on (some of) the current evaluation sets. Only the sets of runs that are not
skipped are planned: a fresh clone whose results are all published builds nothing.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any, Sequence

from seqgen.config import BuildConfig
from seqgen.configio import ConfigError, changed_keys, flatten
from seqgen.files import canonical_sha256
from trainer.checkpoint import latest_step
from trainer.memory import FILE_OPTIONS, ModelTooLarge, check_fits
from seqgen.shards import ShardError, read_manifest
from trainer.run import RunDir, RunError
from trainer.runtime.platform import resolve_compute
from trainer.config import BOOKKEEPING
from trainer.sweep.spec import DEFAULT_SHARDS_DIR, RunSpec, Sweep, SweepError


def config_hash(cfg: BuildConfig) -> str:
    """12 hex digits naming a shard set's folder (`bursty-b07ae1470b2e`): existing folders keep their names."""
    return canonical_sha256(cfg.to_dict(), spaced=True)[:12]


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
    published: Path | None = None  # where a finished run without a run directory was found (SKIP only)


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
            stored = read_manifest(folder).get("config")
        except ShardError:
            stored = None
        if stored != cfg.to_dict():
            raise SweepError(f"{folder} holds a different shard set than its name says; delete that folder")
        return SetAction.REUSE
    return SetAction.RESUME if folder.is_dir() and any(folder.iterdir()) else SetAction.BUILD


def final_results(run_dir: Path, step: int, set_names: Sequence[str],
                  sizes: Sequence[int] | None = None) -> dict[str, dict[str, Any]] | None:
    """{set name: metrics} of the evaluations at `step` on every named set; None when one is missing, or, with
    `sizes` (each set's number of sequences), when one covered fewer sequences than its whole set (a sweep's
    final evaluations are on whole sets, while evaluations during training may read fewer: eval_seqs)."""
    found = RunDir(run_dir).final_evaluations(step, set_names)
    if not all(n in found for n in set_names):
        return None
    if sizes is not None and any(_seqs(found[n]) < size for n, size in zip(set_names, sizes)):
        return None
    return found


def _seqs(metrics: dict[str, Any]) -> int:
    return max((int(m.get("n") or 0) for m in metrics.values() if isinstance(m, dict)), default=0)


def _run_of(spec: RunSpec, folder: Path, train_dir: Path, option: str) -> RunDir:
    """The run in `folder`, when it is one of `spec` (the same trainer options and training set); else a
    one-line SweepError that names the difference."""
    config = folder / "config.json"
    try:
        run = RunDir(folder)
        old = run.train_config()
        old_train = Path(run.read()["data"]["train"]["path"]).name
    except (RunError, KeyError, TypeError, ConfigError):
        raise SweepError(f"{config} is unreadable; delete {folder} or choose another {option}") from None
    # a stored config records the kernel path and layer loop that ran; "auto" here resolves the same way
    diff = _difference(resolve_compute(old).to_dict(), resolve_compute(spec.trainer).to_dict(),
                       ignore=BOOKKEEPING | {"training.steps"})
    if diff or old_train != train_dir.name:
        what = f"trainer options ({diff})" if diff else f"a training set ({old_train}) of other seqgen options"
        raise SweepError(f"{folder} was trained with {what} than run '{spec.name}' of this sweep; "
                         f"delete it or choose another {option}")
    return run


def run_action(spec: RunSpec, run_dir: Path, train_dir: Path, eval_dirs: Sequence[Path],
               published: Path | None = None) -> tuple[RunAction, int]:
    """What to do with one run. `published`: its folder in a separate results folder (config.json, metrics.jsonl,
    no checkpoints), which counts as the finished run when the run directory is absent (a fresh clone)."""
    latest = latest_step(run_dir)
    names = [p.name for p in eval_dirs]
    if not (run_dir / "config.json").is_file():
        if latest is not None:
            raise SweepError(f"{run_dir} holds checkpoints but no config.json; delete it or choose another --out")
        if published is not None and (published / "config.json").is_file():
            _run_of(spec, published, train_dir, "--results")
            if final_results(published, spec.steps, names) is not None:
                return RunAction.SKIP, spec.steps  # finished and published; its checkpoints were not kept
        return RunAction.TRAIN, 0
    run = _run_of(spec, run_dir, train_dir, "--out")
    if latest is None:
        # A finished run without its checkpoints (a published results folder, copied back) is done when its
        # metrics hold the final evaluation on every set; otherwise it stopped before its first checkpoint.
        found = run.final_evaluations(spec.steps, names)
        if len(found) == len(names):
            return RunAction.SKIP, spec.steps
        if any(r.get("kind") == "train" and r.get("step") == spec.steps for r in run.read_metrics()):
            missing = ", ".join(n for n in names if n not in found)
            raise SweepError(f"{run_dir} is finished but has no checkpoints to evaluate on {missing}; "
                             "copy it with its checkpoints, or delete it to retrain")
        return RunAction.TRAIN, 0
    if latest < spec.steps:
        return RunAction.RESUME, latest
    if final_results(run_dir, latest, names, [e.num_seqs for e in spec.evals]) is None:
        return RunAction.EVALUATE, latest  # a set not scored yet, or scored on fewer sequences than it holds
    return RunAction.SKIP, latest


def _difference(old: dict[str, Any], new: dict[str, Any], ignore: set[str]) -> str:
    keys, a, b = changed_keys(old, new, ignore), flatten(old), flatten(new)
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in keys[:2]) + (", ..." if len(keys) > 2 else "")


def default_out(sweep: Sweep) -> Path:
    return Path("runs/sweeps") / sweep.name


def selected(sweep: Sweep, only: Sequence[str]) -> list[RunSpec]:
    """The runs named by --only (a setting name selects all its seeds; `<setting>/seed-<s>` one run)."""
    names = {r.name for r in sweep.runs} | set(sweep.settings)
    for n in only:
        if n not in names:
            raise ConfigError(f"--only {n}: no such run in {sweep.path}; runs: {', '.join(sweep.settings)}")
    return [r for r in sweep.runs if not only or r.name in only or r.setting in only]


def make_plan(sweep: Sweep, *, out: str | Path | None = None, shards_dir: str | Path = DEFAULT_SHARDS_DIR,
              only: Sequence[str] = (), results: str | Path | None = None) -> Plan:
    """What a sweep would do now: which sets to build or reuse, which runs to train, resume or skip. A run
    with no run directory in `out` that `results` (a separate results folder) holds finished is skipped."""
    specs = selected(sweep, only)
    out = Path(out) if out is not None else default_out(sweep)
    separate = results is not None and Path(results).resolve() != out.resolve()
    shards_dir = Path(shards_dir)
    sets: dict[Path, SetPlan] = {}
    runs = []
    sized: set[str] = set()
    for spec in specs:
        cfgs = (spec.train, *spec.evals)
        folders = [set_folder(shards_dir, cfg) for cfg in cfgs]
        run_dir = out / "runs" / spec.name
        published = Path(results) / "runs" / spec.name if separate else None
        action, step = run_action(spec, run_dir, folders[0], folders[1:], published)
        found = published if action is RunAction.SKIP and not (run_dir / "config.json").is_file() else None
        runs.append(RunPlan(spec, run_dir, folders[0], tuple(folders[1:]), action, step, found))
        if action is not RunAction.SKIP and spec.setting not in sized:  # as fit will, before any set is built
            sized.add(spec.setting)
            try:
                check_fits(spec.trainer, spec.train.num_labels, spec.train.length, options=FILE_OPTIONS)
            except ModelTooLarge as e:
                raise ConfigError(f"{sweep.path}: run '{spec.name}': {e}") from None
        if action is not RunAction.SKIP:  # a skipped run reads no set: its sets are neither built nor checked
            for cfg, folder in zip(cfgs, folders):
                if folder not in sets:
                    sets[folder] = SetPlan(cfg, folder, set_action(cfg, folder))
    return Plan(sweep, out, shards_dir, tuple(sets.values()), tuple(runs))


def describe_plan(plan: Plan) -> list[str]:
    lines = [f"sweep {plan.sweep.name} ({plan.sweep.path}): {len(plan.runs)} runs, output {plan.out}"]
    for s in plan.sets:
        lines.append(f"  set  {s.action.value:<12} {s.folder}  ({s.cfg.num_seqs} seqs)")
    for r in plan.runs:
        at = f" from step {r.step}" if r.action is RunAction.RESUME and r.step else ""
        passes = r.spec.steps * r.spec.trainer.training.batch_size / r.spec.train.num_seqs
        reuse = f", {passes:.1f} passes over its training set" if passes > 1 else ""
        where = f"{r.published} (published; no run directory)" if r.published else r.run_dir
        lines.append(f"  run  {r.action.value:<12} {where}  (x = {r.spec.x}, {r.spec.steps} steps{at}{reuse})")
    return lines
