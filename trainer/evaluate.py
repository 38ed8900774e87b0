"""Evaluation: a model on shard sets, every metric of the original with 95 % intervals; `trainer evaluate`.

`Evaluator` is the evaluation of a model on a list of eval sets, built once (one jitted eval step per set)
and used by `trainer fit` at its evaluation steps and by `trainer evaluate`: `evaluate_run` scores one
checkpoint, `watch_run` (`--watch`) every new checkpoint of a running fit. ICL / IWL, the paper's headline
numbers, are defined in `trainer.metrics` (`metric_key_of`, `column_of`, `headline`).

`--watch` is the original's separate eval job (e.g. on the CPU beside a GPU training run): it polls the
run's checkpoints, evaluates each one not yet evaluated, records the results in the run's evaluation store
(`trainer.runlog`: metrics.jsonl records with `"source": "watch"`, and the derived `evaluations/step-N.json`),
and stops once the final step of the run has been evaluated (or at Ctrl+C). `trainer evaluate` of one
checkpoint records `"source": "evaluate"` the same way. With `tracking`, those records are mirrored live to
TensorBoard / W&B as fit's are (`trainer.sinks`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import equinox as eqx
import jax
import numpy as np

from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import ShardSet, data_record, eval_name, manifest_fingerprint, open_sets
from trainer.images import device_table
from trainer.metrics import headline, masked_sums, summarize
from trainer.run import RunDir, RunError, run_lock
from trainer.runlog import Evaluation
from trainer.runtime.distributed import Topology, TopologyError, replicate, to_global
from trainer.runtime.multihost import agree, any_process, eval_batch_size, eval_split
from trainer.runtime.platform import releases_programs, resolve_compute, start_line
from trainer.runtime.signals import GracefulInterrupt
from trainer.sinks import Tracking, check_available, mirrored
from trainer.state import TrainState, load_state
from trainer.step import StepContext, eval_key, make_eval_step

Summary = dict[str, dict[str, Any]]  # {metric: {"mean", "ci95": [lo, hi], "n"}}
Result = tuple[str, str, Summary]  # (eval set name, its seq_type, summary)
PathLike = str | os.PathLike


def set_name(shard_set: ShardSet) -> str:
    """The name a set's results are recorded under (`trainer.data.eval_name`: --eval NAME=PATH, else its folder's)."""
    return eval_name(shard_set)


def evaluate_set(
    eval_step: Callable,
    table: jax.Array,
    model: eqx.Module,
    bn_state: eqx.nn.State,
    shard_set: ShardSet,
    topo: Topology,
    *,
    max_seqs: int | None,
    batch_size: int,
    should_stop: Callable[[], bool] = lambda: False,
    key: jax.Array | None = None,
) -> Summary | None:
    """Summaries {metric: {"mean", "ci95", "n"}} over the first `max_seqs` sequences; None if stopped.

    `key` (`trainer.step.eval_key(seed, step)`): batch b is evaluated with `fold_in(key, b)`; needed only by
    models with example dropout (active at evaluation, as the original)."""
    batch_size = eval_batch_size(topo, batch_size)
    sums: dict[str, float] = {}
    sumsq: dict[str, float] = {}
    n = 0
    for b, batch in enumerate(eval_split(shard_set, topo, batch_size, max_seqs)):
        if any_process(topo, should_stop()):  # all processes stop at the same batch
            return None
        batch["valid"] = np.asarray(batch["valid"], np.float32)
        batch = to_global(topo, batch)
        valid = batch.pop("valid")
        batch_key = None if key is None else replicate(topo, jax.random.fold_in(key, b))
        per = eval_step(table, model, bn_state, batch, batch_key)
        # reduced on the device: replicated scalars are readable on every host of a multi-host job
        s, sq, count = jax.device_get(masked_sums(per, valid))
        for k in s:
            sums[k] = sums.get(k, 0.0) + float(s[k])
            sumsq[k] = sumsq.get(k, 0.0) + float(sq[k])
        n += int(round(float(count)))
    return summarize(sums, sumsq, n)


@dataclass(frozen=True)
class Evaluator:
    """A model's evaluation on eval sets at a fixed size: one compiled eval step per set, made once."""

    sets: tuple[ShardSet, ...]
    steps: tuple[Callable, ...]  # make_eval_step of each set (each compiles on its first call)
    table: jax.Array  # the device image table (`trainer.images.device_table`)
    topo: Topology
    seed: int  # the run's seed: evaluation keys are `eval_key(seed, step)`
    max_seqs: int | None
    batch_size: int

    @classmethod
    def create(cls, ctx: StepContext, sets: Sequence[ShardSet], table: jax.Array, topo: Topology, *,
               max_seqs: int | None, batch_size: int, compiled: dict[str, Callable] | None = None) -> "Evaluator":
        """`compiled` (by set path) shares eval steps between evaluators of one model shape (`trainer.group`)."""
        def step_of(s: ShardSet) -> Callable:
            if compiled is None:
                return make_eval_step(ctx, s.config)
            key = str(Path(s.path).resolve())
            if key not in compiled:
                compiled[key] = make_eval_step(ctx, s.config)
            return compiled[key]

        steps = tuple(step_of(s) for s in sets)
        return cls(tuple(sets), steps, table, topo, ctx.train_cfg.training.seed, max_seqs, batch_size)

    @property
    def names(self) -> list[str]:
        return [set_name(s) for s in self.sets]

    def run(self, state: TrainState, step: int, should_stop: Callable[[], bool], *, only: set[str] | None = None,
            each: Callable[[Result], None] | None = None) -> list[Result] | None:
        """Evaluate `state` (the checkpoint at `step`) on every set, or on those named in `only`; `each` gets
        every set's result as soon as it is done. None when stopped (the unfinished set is not reported)."""
        results = []
        for shard_set, eval_step in zip(self.sets, self.steps):
            if only is not None and set_name(shard_set) not in only:
                continue
            summary = evaluate_set(eval_step, self.table, state.model, state.bn_state, shard_set, self.topo,
                                   max_seqs=self.max_seqs, batch_size=self.batch_size, should_stop=should_stop,
                                   key=eval_key(self.seed, step))
            if summary is None:
                return None
            result = (set_name(shard_set), shard_set.config.seq_type.value, summary)
            if each is not None:
                each(result)
            results.append(result)
        return results


def evaluation(step: int, result: Result, source: str, max_seqs: int | None = None) -> Evaluation:
    """The store's record (`trainer.runlog.Evaluation`) of one set's result."""
    name, seq_type, summary = result
    return Evaluation(step, name, seq_type, source, summary, max_seqs)


def format_table(step: int, results: Iterable[Result]) -> str:
    """A plain-text table: one row per (set, metric)."""
    lines = [f"step {step}", f"{'set':<22} {'metric':<22} {'mean':>8} {'95% CI':>17} {'n':>7}"]
    heads = []
    for name, seq_type, summary in results:
        for metric, s in summary.items():
            lo, hi = s["ci95"]
            lines.append(f"{name:<22} {metric:<22} {s['mean']:>8.4f} [{lo:>6.4f}, {hi:>6.4f}] {s['n']:>7d}")
        h = headline(seq_type, summary)
        if h:
            heads.append(h)
    return "\n".join(lines + heads)


# ---- `trainer evaluate` -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Target:
    """A run to evaluate, opened: its config, its training set (for the class split) and the evaluator."""

    run: RunDir
    cfg: TrainConfig
    train: ShardSet
    evaluator: Evaluator


def _open(run_dir: PathLike, eval_dirs: Sequence[PathLike], train_dir: PathLike | None, max_seqs: int | None,
          batch_size: int, omniglot_dir: PathLike | None, cache_dir: PathLike | None, topo: Topology) -> _Target:
    run = RunDir(run_dir)
    cfg = resolve_compute(run.train_config())  # computed as the run was trained (config.json's compute)
    train, evals = open_sets(run.train_path(train_dir), eval_dirs, train_role=False)  # the run trained already
    _check_train_is_the_runs(run, train)
    table = device_table(train, cfg.training.image_size, topo, omniglot_dir, cache_dir)
    ctx = StepContext.create(cfg, train.config)
    return _Target(run, cfg, train, Evaluator.create(ctx, evals, table, topo, max_seqs=max_seqs,
                                                      batch_size=batch_size))


def _check_train_is_the_runs(run: RunDir, train: ShardSet) -> None:
    """The training set given (or found) must be the one the run trained on (same manifest fingerprint), so
    that eval sets are checked against the run's own class split, not another set's."""
    recorded = run.read()["data"]["train"]
    if manifest_fingerprint(train) != recorded["fingerprint"]:
        raise RunError(f"training set {train.path} is not the one run {run.path} was trained on "
                       f"({recorded['path']}); pass that set (or a copy of it) as --train")


def _evaluate_step(target: _Target, step: int, stop: GracefulInterrupt,
                   announce: Callable[[str], None] | None = None) -> list[Result] | None:
    """Evaluate checkpoint `step`; `announce` gets the start line once the checkpoint has loaded (so a bad
    step or a damaged checkpoint is still the command's one line of output)."""
    ev = target.evaluator
    loaded = load_state(target.run.path, step, target.cfg, target.train.num_labels)
    if announce is not None and ev.topo.is_main:
        announce(start_line(target.cfg, ev.topo.num_devices))
    record = data_record(target.train, list(ev.sets))
    agree(ev.topo, {"checkpoint step": step, "config": target.cfg.to_dict(), "max_seqs": ev.max_seqs,
                    "batch size": ev.batch_size, "training set": record["train"]["fingerprint"],
                    "evaluation sets": [e["fingerprint"] for e in record["eval"]]})
    return ev.run(replicate(ev.topo, loaded), step, lambda: stop.stop_requested)


@releases_programs
def evaluate_run(run_dir: PathLike, eval_dirs: Sequence[PathLike], *, step: int | None, train_dir: PathLike | None,
                 max_seqs: int | None, batch_size: int, omniglot_dir: PathLike | None, cache_dir: PathLike | None,
                 topo: Topology, echo: Callable[[str], None] = print,
                 interrupt: GracefulInterrupt | None = None, record: bool = True,
                 tracking: Tracking | None = None) -> list[Result] | None:
    """Evaluate one checkpoint; None when interrupted (nothing written). With `record` False (the Python API's
    default, `trainer.api.Run.evaluate`) the same evaluation writes nothing to the run directory. `tracking`:
    the sinks its records are mirrored to (opened once they are computed)."""
    if tracking is not None:
        check_available(tracking.sinks)
    target = _open(run_dir, eval_dirs, train_dir, max_seqs, batch_size, omniglot_dir, cache_dir, topo)
    run = target.run
    if step is None:
        step = checkpoint.latest_step(run.path)
        if step is None:
            folders = sorted(p.name for p in checkpoint.checkpoint_dir(run.path).glob("step-*")
                             if not p.name.endswith(".tmp"))
            if folders:
                raise RunError(f"{run.path} has no complete checkpoint: {', '.join(folders[:4])} "
                               f"lack{'s' if len(folders) == 1 else ''} a metadata.json or state.eqx file; name one "
                               "with --step N to see what is wrong with it, or wait for `trainer fit` to save one")
            raise RunError(f"{run.path} has no complete checkpoint yet; wait for `trainer fit` to save one")
    record = record and topo.is_main
    with run_lock(run.path, "trainer evaluate", enabled=record, folder=run.evaluations_dir):
        with (interrupt or GracefulInterrupt("stopping the evaluation; nothing is saved")) as stop:
            results = _evaluate_step(target, step, stop, announce=echo)
        if results is None:
            echo("interrupted: no evaluation written")
            return None
        if record:
            with mirrored(run, tracking, "evaluate"):
                for result in results:
                    run.record_evaluation(evaluation(step, result, "evaluate", max_seqs))
    echo(format_table(step, results))
    return results


@releases_programs
def watch_run(run_dir: PathLike, eval_dirs: Sequence[PathLike], *, poll: float, train_dir: PathLike | None,
              max_seqs: int | None, batch_size: int, omniglot_dir: PathLike | None, cache_dir: PathLike | None,
              topo: Topology, echo: Callable[[str], None] = print,
              interrupt: GracefulInterrupt | None = None, tracking: Tracking | None = None) -> list[int]:
    """Evaluate each new checkpoint; return the steps evaluated. Ends after the run's last step (or at an
    interrupt: `interrupt.stop_requested` then tells). `tracking`: the sinks its records are mirrored to."""
    if tracking is not None:
        check_available(tracking.sinks)
    if topo.process_count > 1:
        raise TopologyError("--watch runs in one process (the processes would each see checkpoints appear at "
                            "different times); drop --distributed, or evaluate one --step at a time")
    target = _open(run_dir, eval_dirs, train_dir, max_seqs, batch_size, omniglot_dir, cache_dir, topo)
    run = target.run
    echo(start_line(target.cfg, topo.num_devices))
    names = set(target.evaluator.names)
    done = {e.step for e in run.evaluations() if e.source == "watch" and e.set in names}
    evaluated: list[int] = []
    with run_lock(run.path, "trainer evaluate --watch", enabled=topo.is_main, folder=run.evaluations_dir), \
            (interrupt or GracefulInterrupt("stopping --watch; evaluations already written are kept")) as stop, \
            mirrored(run, tracking, "watch", enabled=topo.is_main):
        while not stop.stop_requested:
            final = run.train_config().training.steps
            todo = [s for s in checkpoint.list_steps(run.path) if s not in done]
            if not todo:
                if final in done:
                    break
                _sleep(poll, stop)
                continue
            step = todo[-1]  # newest first: a slow evaluator skips ahead rather than lagging behind
            try:
                results = _evaluate_step(target, step, stop)
            except checkpoint.CheckpointError:
                done.add(step)  # deleted by checkpoint rotation while we waited: skip it
                continue
            if results is None:
                break
            if topo.is_main:
                for result in results:
                    run.record_evaluation(evaluation(step, result, "watch", max_seqs))
            echo(format_table(step, results))
            done.add(step)
            done.update(s for s in todo if s < step)  # older ones are skipped for good
            evaluated.append(step)
    return evaluated


def _sleep(seconds: float, stop: GracefulInterrupt) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop.stop_requested:
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))
