"""`trainer sweep`: whole figures of the paper as one command.

- `spec`: the sweep file (runs, seeds, checks), loaded and validated;
- `plan`: which shard sets to build or reuse and which runs to train, resume, evaluate or skip;
- `execute`: carry a plan out, in this process or in `--jobs` worker processes (`worker`);
- `cluster`: `--executor slurm | local`, the same units of work as submitit jobs (`job`, each a worker);
- `rows` (each run read back from its metrics), `report` (tables, results.md), `figures`, `provenance`: the
  report of a results folder, from the runs' files alone;
- `compare` (the comparisons a check can make, one table) and `checks`: the paper's claims as comparisons with PASS / FAIL / INCONCLUSIVE verdicts;
- `page`: every claim of every figure in one table (`trainer claims`);
- `cli`: the command.

The names below are imported on first use (PEP 562), so that `python -m trainer.sweep.worker` starts
without loading JAX before it has installed its signal handling.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CheckResult": "checks", "Verdict": "checks", "evaluate_check": "checks",
    "Outcome": "execute",
    "Plan": "plan", "RunAction": "plan", "RunPlan": "plan", "SetAction": "plan", "SetPlan": "plan",
    "config_hash": "plan", "describe_plan": "plan", "make_plan": "plan", "set_folder": "plan",
    "DEFAULT_EVAL_SEQS": "spec", "DEFAULT_EVAL_TYPES": "spec", "DEFAULT_SHARDS_DIR": "spec", "CheckSpec": "spec",
    "COMPARISONS": "compare", "RunSpec": "spec", "Sweep": "spec", "SweepError": "spec", "eval_config": "spec",
    "load_sweep": "spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"trainer.sweep.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'trainer.sweep' has no attribute {name!r}")
