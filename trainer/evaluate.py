"""Evaluation of a model on shard sets: every metric of the original, with 95 % intervals.

ICL is `accuracy_closed` on `fewshot_holdout` (logits restricted to labels 0..ways-1, chance 1/ways);
IWL is `accuracy_query` on `no_support_zipfian`. The original logged `eval_accuracy` = accuracy_query
(open vocabulary), which is not the ICL measure; `headline()` names the paper's metrics plainly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

import numpy as np

from seqgen.atomic import atomic_write_json
from trainer.data import ShardSet
from trainer.runtime.distributed import Topology, replicate, to_global
from trainer.runtime.multihost import any_process, eval_batch_size, eval_split
from trainer.metrics import summarize


def evaluate_set(
    eval_step: Callable,
    table: Any,
    model: Any,
    bn_state: Any,
    shard_set: ShardSet,
    topo: Topology,
    *,
    max_seqs: int | None,
    batch_size: int,
    should_stop: Callable[[], bool] = lambda: False,
    key: Any = None,
) -> dict[str, dict[str, Any]] | None:
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
        s, sq, count = jax.device_get(_masked_sums(per, valid))
        for k in s:
            sums[k] = sums.get(k, 0.0) + float(s[k])
            sumsq[k] = sumsq.get(k, 0.0) + float(sq[k])
        n += int(round(float(count)))
    return summarize(sums, sumsq, n)


@jax.jit
def _masked_sums(per: dict[str, jax.Array], valid: jax.Array):
    per = {k: v.astype(jnp.float32) for k, v in per.items()}
    return ({k: jnp.sum(v * valid) for k, v in per.items()},
            {k: jnp.sum(v * v * valid) for k, v in per.items()},
            jnp.sum(valid))


def headline(seq_type: str, summary: dict[str, dict[str, Any]]) -> str | None:
    """The paper's name for the number that matters on this set, if any."""
    if seq_type == "fewshot_holdout" and "accuracy_closed" in summary:
        s = summary["accuracy_closed"]
        return f"ICL (accuracy_closed on fewshot_holdout) = {s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
    if seq_type == "no_support_zipfian" and "accuracy_query" in summary:
        s = summary["accuracy_query"]
        return f"IWL (accuracy on no_support_zipfian) = {s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"
    return None


def format_table(step: int, results: Iterable[tuple[str, str, dict[str, dict[str, Any]]]]) -> str:
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


EVALUATION_SCHEMA = {"step": int, "sets": [{"set": str, "seq_type": str, "metrics": dict}]}


def read_evaluation(path: Path) -> dict[str, Any] | None:
    """evaluations/step-N.json, type-checked (None when absent); RunError (one line) when malformed."""
    from seqgen.files import read_json_object
    from trainer.run import RunError

    try:
        return read_json_object(path, what="evaluation", error=RunError, schema=EVALUATION_SCHEMA,
                                fix="delete it and evaluate that step again")
    except FileNotFoundError:
        return None


def write_evaluation(path: Path, step: int, results: list[tuple[str, str, dict]], extra: dict[str, Any]) -> None:
    """Atomically write one evaluation as JSON, merged by set: the sets of `results` replace their earlier
    entries at this step, entries of other sets are kept (each `trainer evaluate` may score other sets)."""
    new = [{"set": name, "seq_type": st, "metrics": summary, **extra} for name, st, summary in results]
    old = read_evaluation(path)
    names = {r["set"] for r in new}
    kept = [r for r in (old["sets"] if old and old.get("step") == step else []) if r["set"] not in names]
    record = {"step": step, "time": time.time(), **extra, "sets": kept + new}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record, allow_nan=True)  # as before; read_evaluation refuses NaN (noted in #16)


def set_name(shard_set: ShardSet) -> str:
    return Path(shard_set.path).name


