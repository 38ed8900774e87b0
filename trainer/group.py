"""Vectorized runs: several runs of one model shape trained in ONE jitted step.

The runs' train states are stacked along a leading run axis and `trainer.step.make_one_step` is vmapped
over it: each run keeps its own key, BatchNorm state (the statistics are reductions over the run's own
batch, so vmap keeps them per run), optimizer state and data stream (one `BatchStream` per run; each
dispatch gathers the K batches of every run into one [K, R, B, ...] array). The loop is `trainer.loop`'s, as
`trainer fit`'s (same dispatch sizes, logging windows, evaluations and checkpoints), and every run writes its own ordinary
run directory: `config.json`, `metrics.jsonl`, `checkpoints/step-N` in the format `trainer fit` writes,
evaluations. So `trainer evaluate`, the reports and `trainer fit --resume` work on a run of a group
unchanged, and a group resumes from per-run checkpoints at the same step (written by a group or by fit).

On several devices the run axis is spread over them (`make_group_step`): R/D runs per device, each run
whole on its device (its batch, its BatchNorm statistics), with no communication between devices; a
group whose R does not divide by D is padded with copies of run 0 (`padded_runs`). A single run keeps
data parallelism (`trainer.fit`).

A run trained in a group equals the same run trained alone up to float round-off (the batched matmuls
sum in another order; tests/test_group.py, tests/test_multidevice.py on 4 devices); a resumed group
equals an uninterrupted one bitwise.

Which runs may share a group: `group_key` (same model, optimizer and loop options but the seed; training
sets whose sequences have the same shape, labels and pixels pipeline; the same image table). `plan_groups`
partitions a list of runs by it (and, when resuming, by the step each run resumes from).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from seqgen.config import BuildConfig
from seqgen.configio import to_plain
from trainer.config import TrainConfig
from trainer.data import BatchStream, ShardSet, open_shard_set
from trainer.engine import RunSetup, redo, resolve, session, start_runs
from trainer.fit import fit
from trainer.loop import FitResult, Pending, TrainingRun, pad_batches, train_loop
from trainer.memory import check_fits
from trainer.run import RunDir, RunError, run_lock
from trainer.runtime.distributed import RUNS, Topology, make_topology, replicate, to_global
from trainer.runtime.platform import releases_programs
from trainer.runtime.signals import GracefulInterrupt
from trainer.sinks import Tracking
from trainer.state import TrainState
from trainer.step import StepContext, make_one_step, run_steps

PathLike = str | os.PathLike

__all__ = ["GroupError", "fit_group", "group_key", "make_group_step", "padded_runs", "plan_groups",
           "stack_states", "unstack_state"]

# Sequence options that decide only which sequences a set holds (how they were drawn), not what the train
# step computes on them: two training sets differing only in these (and in size, seed and shard size) can
# feed one vectorized step. Everything else of the BuildConfig (dataset, split, labeling, polysemy, noise,
# random rare images, ways, lengths, sequence type) enters the step and must be equal.
_DRAW_ONLY = ("p_bursty", "p_bursty_common", "p_bursty_zipfian", "p_fewshot", "non_bursty_type", "grouped",
              "bursty_shots")


class GroupError(RunError):
    """Runs that cannot be trained as one group; one-line message."""


def _step_data_config(cfg: BuildConfig) -> BuildConfig:
    """The part of a training set's BuildConfig the train step depends on (draw-only options reset)."""
    base = BuildConfig()
    seq = replace(cfg.sequence, **{f: getattr(base.sequence, f) for f in _DRAW_ONLY})
    return replace(cfg, num_seqs=base.num_seqs, seed=base.seed, shard_size=base.shard_size, sequence=seq)


def group_key(cfg: TrainConfig, train: ShardSet) -> str:
    """Runs with equal keys can be trained in one group: the same TrainConfig up to `training.seed`, and
    training sets that differ only in how their sequences were drawn (`_DRAW_ONLY`, seed, size)."""
    train_cfg = replace(cfg, training=replace(cfg.training, seed=0))
    return json.dumps({
        "trainer": train_cfg.to_dict(),
        "data": _plain(_step_data_config(train.config)),
        "length": train.length,
        "num_labels": train.num_labels,
        "image_table": train.image_table_fingerprint,
    }, sort_keys=True)


def _plain(cfg: BuildConfig) -> Any:
    return to_plain(dataclasses.asdict(cfg))


def _as_list(resume: bool | Sequence[bool], n: int) -> list[bool]:
    if isinstance(resume, bool):
        return [resume] * n
    resume = list(resume)
    if len(resume) != n:
        raise GroupError(f"{len(resume)} resume flags for {n} runs; give one per run")
    return resume


def plan_groups(
    cfgs: Sequence[TrainConfig],
    train_paths: Sequence[str | os.PathLike],
    run_dirs: Sequence[str | os.PathLike] | None = None,
    *,
    resume: bool | Sequence[bool] = False,
    max_size: int | None = None,
) -> list[list[int]]:
    """Partition runs (indices into the lists) into groups `fit_group` can train together, in order of
    first appearance; groups of at most `max_size` runs. With `run_dirs` and `resume`, runs that resume go
    by their stored config and only share a group with runs starting at the same step."""
    n = len(cfgs)
    if len(train_paths) != n or (run_dirs is not None and len(run_dirs) != n):
        raise GroupError("plan_groups needs one training set (and run directory) per config")
    if max_size is not None and max_size < 1:
        raise GroupError(f"the group size must be >= 1, got {max_size}")
    flags = _as_list(resume, n)
    sets: dict[str, ShardSet] = {}
    groups: dict[tuple[str, int], list[list[int]]] = {}
    order: list[list[int]] = []
    for i in range(n):
        if run_dirs is None:
            cfg, start = cfgs[i].validate(), 0
        else:
            cfg, _, start, _ = resolve(cfgs[i], RunDir(run_dirs[i]), flags[i])
            start = start or 0
        path = str(Path(train_paths[i]).resolve())
        if path not in sets:
            sets[path] = open_shard_set(path)
        key = (group_key(cfg, sets[path]), start)
        chunks = groups.setdefault(key, [])
        if not chunks or (max_size is not None and len(chunks[-1]) >= max_size):
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(i)
    return order


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """One train state whose arrays have a leading run axis (non-array leaves from the first run)."""
    arrays = [eqx.filter(s, eqx.is_array) for s in states]
    static = eqx.filter(states[0], eqx.is_array, inverse=True)
    return eqx.combine(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *arrays), static)


def unstack_state(stacked: TrainState, i: int) -> TrainState:
    """Run `i`'s train state from a stacked one (numpy in, numpy out; device arrays stay on the device)."""
    arrays, static = eqx.partition(stacked, eqx.is_array)
    return eqx.combine(jax.tree_util.tree_map(lambda x: x[i], arrays), static)


def padded_runs(n: int, topo: Topology | None) -> int:
    """The width of the run axis of a group of `n` runs on `topo`'s devices: `n` rounded up to a multiple of
    the device count. The extra runs are copies of run 0, trained alongside and never read: a device's
    step takes as long as its ceil(n/D) runs do either way, and refusing such groups would refuse e.g. a
    sweep's 3 seeds on 4 GPUs."""
    d = 1 if topo is None else topo.num_devices
    return -(-n // d) * d


def make_group_step(ctx: StepContext, topo: Topology | None = None) -> Callable:
    """`step(table, states, batches, n) -> (states, metrics)`: states stacked along a run axis R, batches
    [K, R, B, ...], metrics [K, R]; the first n (an int32 array) of K steps of every run in one jitted call
    (`trainer.step.run_steps` of the vmapped step).

    With a `topo` of D > 1 devices the run axis (R a multiple of D: `padded_runs`) is sharded over them
    (`Topology.runs_sharding`; batches on axis 1): the vmapped step runs as a `shard_map`, each device
    training its R/D runs whole (each run's whole batch and BatchNorm statistics on its device), so the
    program holds no communication between devices. A single run keeps data parallelism (`trainer.fit`)."""
    one_step = make_one_step(ctx)
    mesh = topo.runs_mesh if topo is not None and topo.num_devices > 1 else None

    @eqx.filter_jit(donate="all-except-first")
    def step(table, states: TrainState, batches, n):
        # Only the arrays are vmapped and carried (the model's bool fields stay static Python values).
        arrays, static = eqx.partition(states, eqx.is_array)

        def runs(table, arrays, batches, n):  # the runs of one device (all of them without a mesh)
            def one_run(a, b):
                new, metrics = one_step(table, eqx.combine(a, static), b)
                return eqx.filter(new, eqx.is_array), metrics

            return run_steps(jax.vmap(one_run), arrays, batches, n)

        if mesh is not None:
            # check_vma off: run_steps' metric buffers start as device-invariant zeros and are filled per run
            runs = jax.shard_map(runs, mesh=mesh, in_specs=(P(), P(RUNS), P(None, RUNS), P()),
                                 out_specs=(P(RUNS), P(None, RUNS)), check_vma=False)
        arrays, metrics = runs(table, arrays, batches, n)
        return eqx.combine(arrays, static), metrics

    return step


@releases_programs
def fit_group(
    cfgs: Sequence[TrainConfig],
    train_paths: Sequence[PathLike],
    eval_paths: Sequence[Sequence[PathLike]],
    run_dirs: Sequence[PathLike],
    *,
    resume: bool | Sequence[bool] = False,
    omniglot_dir: PathLike | None = None,
    cache_dir: PathLike | None = "data/cache",
    topo: Topology | None = None,
    progress: bool | None = None,
    interrupt: GracefulInterrupt | None = None,
    tracking: Sequence[Tracking | None] | None = None,
) -> list[FitResult]:
    """Train the runs `i` (config, training set, evaluation sets, run directory) as one vectorized group,
    as `trainer.fit.fit` would train each; `resume` is one flag or one per run; `tracking` None or one per
    run (the sinks mirroring its records, `trainer.sinks`). A group of one is `fit`.
    Refuses (GroupError) runs of different `group_key`s or resuming from different steps: `plan_groups`."""
    n = len(cfgs)
    if n == 0 or not len(train_paths) == len(eval_paths) == len(run_dirs) == n:
        raise GroupError("fit_group needs one training set, evaluation list and run directory per config")
    flags = _as_list(resume, n)
    trackings = list(tracking) if tracking is not None else [None] * n
    if len(trackings) != n:
        raise GroupError(f"{len(trackings)} trackings for {n} runs; give one per run (or none)")
    if n == 1:
        return [fit(cfgs[0], train_paths[0], eval_paths[0], run_dirs[0], resume=flags[0], omniglot_dir=omniglot_dir,
                    cache_dir=cache_dir, topo=topo, progress=progress, interrupt=interrupt, tracking=trackings[0])]
    topo = topo or make_topology()
    if topo.process_count != 1:
        raise GroupError("vectorized groups run in one process; train multi-host runs one by one with trainer fit")
    runs = [RunDir(d) for d in run_dirs]
    if len({r.path.resolve() for r in runs}) != n:
        raise GroupError("two runs of the group share a run directory; give each its own")
    with contextlib.ExitStack() as locks:
        for r in runs:  # one writer per run directory, as trainer fit
            locks.enter_context(run_lock(r.path, "trainer sweep (vectorized group)", enabled=topo.is_main))
        return _fit_group(cfgs, train_paths, eval_paths, runs, flags, omniglot_dir, cache_dir, topo, progress,
                          interrupt, trackings)


def _fit_group(cfgs: Sequence[TrainConfig], train_paths: Sequence[PathLike], eval_paths: Sequence[Sequence[PathLike]],
               runs: list[RunDir], flags: list[bool], omniglot_dir: PathLike | None, cache_dir: PathLike | None,
               topo: Topology, progress: bool | None, interrupt: GracefulInterrupt | None,
               trackings: list[Tracking | None]) -> list[FitResult]:
    n = len(runs)

    def compatible(cfgs, opened, starts) -> None:
        keys = [group_key(c, train) for c, (train, _) in zip(cfgs, opened)]
        for i in range(1, n):
            if keys[i] != keys[0]:
                raise GroupError(f"runs {runs[0].path} and {runs[i].path} differ in more than the seed and the "
                                 "sequence draw, so they cannot share a vectorized step; group them with plan_groups")
        per_device = -(-padded_runs(n, topo) // topo.num_devices)
        check_fits(cfgs[0], opened[0][0].num_labels, opened[0][0].config.length, runs=per_device)
        if len({s or 0 for s in starts}) != 1:
            listed = ", ".join(f"{r.path}: {s or 0}" for r, s in zip(runs, starts))
            raise GroupError(f"the runs resume from different steps ({listed}); group runs at the same step "
                             "(plan_groups) or resume them one by one with trainer fit --resume")

    setups = [RunSetup(c, tp, eps, r, f, tr)
              for c, tp, eps, r, f, tr in zip(cfgs, train_paths, eval_paths, runs, flags, trackings)]
    started = start_runs(setups, topo, check=compatible, omniglot_dir=omniglot_dir, cache_dir=cache_dir)
    # The model's `inference` flags are Python bools in a fresh state but arrays in a restored (device_put)
    # one: make them bools again, so that they stay static and the states have one structure.
    states = [eqx.tree_at(lambda s: s.model, s.state, eqx.nn.inference_mode(s.state.model, value=False))
              for s in started]
    start = started[0].start
    with session(started, interrupt) as stop:
        if not redo(started, states, stop, place=lambda s: replicate(topo, s)):  # evaluations an interrupt cut short
            return [FitResult(step=start, interrupted=True, run_dir=str(r.path)) for r in runs]
        # the run axis: padded to a multiple of the devices, and spread over them (`make_group_step`)
        arrays, static = eqx.partition(stack_states(states + states[:1] * (padded_runs(n, topo) - n)), eqx.is_array)
        arrays = jax.device_put(arrays, topo.runs_sharding()) if topo.num_devices > 1 else replicate(topo, arrays)
        stacked = eqx.combine(arrays, static)
        del states, arrays
        return _group_loop([s.job for s in started], started[0].ctx, [s.train for s in started], stacked, start,
                           stop, progress)


def _group_loop(jobs: list[TrainingRun], ctx: StepContext, trains: list[ShardSet], states: TrainState, start: int,
                stop: GracefulInterrupt, progress: bool | None) -> list[FitResult]:
    """`trainer.loop.train_loop` for R runs at once: the same dispatches, metric windows, evaluations and saves."""
    t, topo, table = jobs[0].cfg.training, jobs[0].topo, jobs[0].evaluator.table
    sharded = topo.num_devices > 1  # the runs spread over the devices, whole (`make_group_step`)
    group_step = make_group_step(ctx, topo if sharded else None)
    streams = [BatchStream(train, t.batch_size, start_step=start) for train in trains]
    pad = padded_runs(len(jobs), topo) - len(jobs)

    def advance(k: int) -> dict[str, Any]:
        nonlocal states
        local = [pad_batches([next(stream) for _ in range(k)], t.steps_per_dispatch) for stream in streams]
        local += local[:1] * pad  # the padding runs train on run 0's batches
        batches = {name: np.stack([np.stack([b[name] for b in run]) for run in local], axis=1)
                   for name in local[0][0]}
        placed = jax.device_put(batches, topo.runs_sharding(1)) if sharded else to_global(topo, batches, leading=2)
        states, metrics = group_step(table, states, placed, np.int32(k))
        return metrics

    def log(pending: Pending, bar: tqdm | None) -> None:
        host = jax.device_get([m for _, _, m in pending])
        for r, job in enumerate(jobs):
            job.log([(s, k, {name: v[:, r] for name, v in m.items()}) for (s, k, _), m in zip(pending, host)],
                    bar if r == 0 else None)

    def run_state(r: int, host: TrainState | None) -> TrainState:
        # spread runs are evaluated data-parallel over every device, like a run of trainer fit
        return unstack_state(states, r) if host is None else replicate(topo, unstack_state(host, r))

    def evaluate(step: int) -> bool:
        host = jax.device_get(states) if sharded else None
        return all(job.evaluate(run_state(r, host), step, lambda: stop.stop_requested)
                   for r, job in enumerate(jobs))  # all(): stops at the first run cut short

    def save(step: int) -> None:
        host = jax.device_get(states)
        for r, job in enumerate(jobs):
            job.save(unstack_state(host, r), step)

    try:
        step, interrupted = train_loop(t, start, advance=advance, log=log, evaluate=evaluate, save=save,
                                       should_stop=lambda: stop.stop_requested,
                                       stop_now=lambda: stop.stop_requested, progress=progress,
                                       desc=f"{len(jobs)} runs")
    finally:
        for stream in streams:
            stream.close()
    return [FitResult(step=step, interrupted=interrupted, run_dir=str(job.run.path)) for job in jobs]
