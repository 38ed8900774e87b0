"""Starting or resuming a run directory: what `trainer fit --resume` may change, which evaluations it owes.

`resume_step` is the checkpoint a resume continues from; `prepare_run` refuses a fresh start over a run
that saved a checkpoint, and a resume with another training set.

A resumed run continues its stored config (`config.json`). Only the number of steps may change: more
steps extend the run (config.json then records the larger number), fewer steps (but not below the
checkpoint's step) train only that far this time, and config.json keeps the larger stored number. Any
other option that differs from the stored one is refused with one line naming it and both values; the
loop's bookkeeping options (logging, evaluation and checkpoint intervals, eval sizes, steps per call) are
refused too when `strict` (the command line: the user typed them), and otherwise kept from the stored
config (`trainer sweep`, whose sweep files may change them between invocations).

Evaluations owed: an interrupt during an evaluation saves the checkpoint of that step without the
evaluation (or with only some sets done). On resume, every kept checkpoint at or before the resume step
that is an evaluation step (a multiple of `eval_every`, or a final step) and lacks a `fit` evaluation of an
eval set in the run's evaluation store (`trainer.runlog`) is evaluated on that set, from that checkpoint, before training goes on.
"""

from __future__ import annotations

from typing import Any, Iterable

from seqgen.configio import changed_keys, flatten
from trainer import checkpoint
from trainer.config import BOOKKEEPING, FIT_OPTIONS, TrainConfig, with_overrides
from trainer.run import RunDir, RunError
from trainer.runlog import Evaluation
from trainer.schedule import StepSchedule

# The command-line spelling of options, for messages (the `trainer fit` option table).
OPTION_NAMES = FIT_OPTIONS.flags


def resume_step(run: RunDir) -> int:
    """The checkpoint a --resume continues from; RunError (one line) when there is none."""
    if not run.exists():
        run.restore_config()  # a run whose config.json is gone, but whose checkpoints hold it
    if not run.exists():
        problem = run.describe()
        if problem is not None and "does not exist" not in problem and "no config.json" not in problem:
            raise RunError(f"--resume given but run directory {run.path} {problem}")
        raise RunError(f"--resume given but {run.path} holds no run; drop --resume to start one there")
    step = checkpoint.latest_step(run.path)
    if step is None:
        raise RunError(f"--resume given but {run.path} has no complete checkpoint (it stopped before its first "
                       "save); drop --resume to start afresh")
    return step


def prepare_run(run: RunDir, resume: bool, data: dict[str, Any]) -> None:
    """Validate the run directory for a fresh start or a resume (`data`: `trainer.data.data_record` of the sets
    given). A fresh start is refused where a checkpoint exists; a run that never saved one is started afresh
    (its config and metrics replaced)."""
    if resume:
        stored = run.read()
        if stored["data"]["train"]["fingerprint"] != data["train"]["fingerprint"]:
            raise RunError(
                f"--train differs from the shard set this run was trained on ({stored['data']['train']['path']}); "
                "resume with the same --train"
            )
        return
    if checkpoint.list_steps(run.path):
        raise RunError(f"{run.path} already holds a run; use --resume to continue it or pick another --run-dir")


def option_name(key: str) -> str:
    return OPTION_NAMES.get(key, key)


def resumed_config(stored: TrainConfig, given: TrainConfig, checkpoint_step: int, run_path: object, *,
                   strict: bool) -> tuple[TrainConfig, TrainConfig]:
    """(config to train with now, config to record in config.json) for resuming `stored` at
    `checkpoint_step` with the options `given`; RunError (one line) for a change it cannot make."""
    old, new = flatten(stored.to_dict()), flatten(given.to_dict())
    changed = changed_keys(stored.to_dict(), given.to_dict(),
                           ignore={"training.steps"} | (set() if strict else BOOKKEEPING))
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more option{'s' if len(changed) > 2 else ''})" if len(changed) > 1 else ""
        raise RunError(
            f"--resume continues the stored run: {option_name(k)} is {old.get(k)!r} in {run_path}/config.json "
            f"but {new.get(k)!r} here{more}; drop the option (only --steps may change) or start a new --run-dir")
    steps = given.training.steps
    if steps < checkpoint_step:
        raise RunError(
            f"--steps {steps} is below the step of the checkpoint to resume from ({checkpoint_step}); "
            f"give --steps >= {checkpoint_step} (the run is configured for {stored.training.steps})")
    now = with_overrides(stored, {"training.steps": steps})
    record = with_overrides(stored, {"training.steps": max(steps, stored.training.steps)})
    return now, record


def is_eval_step(step: int, cfg: TrainConfig, final_steps: Iterable[int]) -> bool:
    """Whether fit evaluates at `step`: its evaluation schedule (`trainer.schedule`) or a final step."""
    return step > 0 and (StepSchedule.of(cfg.training, "eval").due(step) or step in set(final_steps))


def owed_evaluations(evaluations: Iterable[Evaluation], checkpoints: Iterable[int], start: int,
                     cfg: TrainConfig, final_steps: Iterable[int], set_names: list[str]) -> list[tuple[int, list[str]]]:
    """[(checkpoint step, names of the eval sets it lacks)] in step order: evaluation steps at or before
    `start` (the resume step) with a kept checkpoint and no `fit` evaluation (`RunDir.evaluations`) for some set."""
    done: dict[int, set[str]] = {}
    for e in evaluations:
        if e.source == "fit":
            done.setdefault(e.step, set()).add(e.set)
    finals = set(final_steps)
    owed = []
    for step in sorted(checkpoints):
        if step > start or not is_eval_step(step, cfg, finals):
            continue
        missing = [n for n in set_names if n not in done.get(step, set())]
        if missing:
            owed.append((step, missing))
    return owed
