"""The records of `trainer analyze` (RUN_DIR/analysis.jsonl): the file, its checked reader, and what a
sweep's checks may read from them (`ANALYSIS_COLUMNS`, `analysis_values`). Light on purpose (numpy and the
validated JSON reader, no JAX model code): `trainer sweep` reads these for its reports and checks.

One JSON line per (checkpoint step, eval set); the fields are written by `trainer.analyze.measures`
(docs/analysis.md): the top-level ones of ANALYSIS_SCHEMA, and the grids `induction` / `prev_token`
([layers][heads] scores, or null), `ablation` ({mode: {metric: [layers][heads]}}, at ablated steps) and
`joint_ablation` ({"heads": [[layer, head], ...], "by": "prev_token", mode: {metric: value}}, the same steps).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from seqgen.files import read_jsonl_objects
from trainer.run import RunError

ANALYSIS_FILE = "analysis.jsonl"

ANALYSIS_SCHEMA = {"step": int, "set": str, "seq_type": str, "n": int, "accuracy_closed": float,
                   "accuracy_query": float, "num_layers": int, "num_heads": int}


def read_analysis(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of RUN_DIR/analysis.jsonl (checked: a line cut by a hard kill is skipped, one that is not
    an analysis record is a one-line RunError); [] when there is none yet."""
    path = Path(run_dir) / ANALYSIS_FILE
    if not path.is_file():
        return []
    return list(read_jsonl_objects(path, what="analysis records", error=RunError, schema=ANALYSIS_SCHEMA,
                                   fix="delete it and rerun `trainer analyze`"))


# What a sweep's checks may read from a run's analysis.jsonl (trainer.sweep.spec: `metric` / `than_metric`),
# at the run's final step, on the run's fewshot_holdout evaluation set. {column: meaning}
ANALYSIS_COLUMNS = {
    "analysis_icl": "ICL (accuracy_closed) on the analysed fewshot_holdout sequences, no head ablated",
    "ablated_icl_min": "the lowest ICL over single-head zero ablations (the head that carries most of it)",
    "mean_ablated_icl_min": "the lowest ICL over single-head mean ablations",
    "joint_ablated_icl": "ICL with the top previous-token heads (`--joint-top`, default 2) zero-ablated together",
    "mean_joint_ablated_icl": "ICL with the top previous-token heads mean-ablated together",
    "induction_max": "the highest induction score over all heads",
    "prev_token_max": "the highest previous-token score over all heads",
}
# The `trainer analyze --ablation` mode each ablation column needs (the default, both, writes either).
ABLATION_OF_COLUMN = {"ablated_icl_min": "zero", "mean_ablated_icl_min": "mean", "joint_ablated_icl": "zero",
                      "mean_joint_ablated_icl": "mean"}


def analysis_values(records: Sequence[dict[str, Any]], step: int, set_name: str,
                    source: str = ANALYSIS_FILE) -> dict[str, float]:
    """The ANALYSIS_COLUMNS that the record of (`step`, `set_name`) holds (none of them without that record;
    the ablation columns only where that step was analysed with that ablation); a malformed grid is a
    one-line RunError naming `source` (the file the records came from)."""
    record = next((r for r in records if r.get("step") == step and r.get("set") == set_name), None)
    if record is None:
        return {}
    where = f"{source}: the record of step {step} on {set_name}"
    out = {"analysis_icl": float(record["accuracy_closed"])}
    for mode, grid in _closed_by_mode(record, "ablation", where).items():
        column = {"zero": "ablated_icl_min", "mean": "mean_ablated_icl_min"}[mode]
        out[column] = float(np.min(_grid(grid, record, f"{where}: ablation.{mode}.accuracy_closed")))
    for mode, value in _closed_by_mode(record, "joint_ablation", where).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise RunError(f"{where}: joint_ablation.{mode}.accuracy_closed is not a number; delete the file "
                           "and rerun `trainer analyze`")
        out[{"zero": "joint_ablated_icl", "mean": "mean_joint_ablated_icl"}[mode]] = float(value)
    for key, column in (("induction", "induction_max"), ("prev_token", "prev_token_max")):
        if record.get(key) is not None:
            out[column] = float(np.max(_grid(record[key], record, f"{where}: {key}")))
    return out


def _closed_by_mode(record: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """{ablation mode: its accuracy_closed} of the record's `key` table (modes absent or without it left out);
    a one-line RunError when `key` is not a table."""
    table = record.get(key) or {}
    if not isinstance(table, dict):
        raise RunError(f"{where}: '{key}' is not a table; delete the file and rerun `trainer analyze`")
    return {mode: table[mode]["accuracy_closed"] for mode in ("zero", "mean")
            if isinstance(table.get(mode), dict) and table[mode].get("accuracy_closed") is not None}


def _grid(value: Any, record: dict[str, Any], where: str) -> np.ndarray:
    """A [layers][heads] grid of finite numbers, as the record's num_layers / num_heads say; else RunError."""
    try:
        a = np.asarray(value, float)
    except (TypeError, ValueError):
        a = None
    if a is None or a.shape != (record["num_layers"], record["num_heads"]) or not np.isfinite(a).all():
        raise RunError(f"{where} is not a {record['num_layers']} x {record['num_heads']} grid of numbers; "
                       "delete the file and rerun `trainer analyze`")
    return a
