"""`trainer sweep`: whole figures of the paper as one command.

- `spec`: the sweep file (runs, seeds, checks), loaded and validated;
- `plan`: which shard sets to build or reuse and which runs to train, resume, evaluate or skip;
- `execute`: carry a plan out, in this process or in `--jobs` worker processes (`worker`);
- `report`: tables, figures and provenance from the runs' metrics alone;
- `checks`: the paper's claims as comparisons with PASS / FAIL / INCONCLUSIVE verdicts;
- `cli`: the command.
"""

from trainer.sweep.checks import CheckResult, Verdict, evaluate_check
from trainer.sweep.execute import Outcome, execute
from trainer.sweep.plan import (
    Plan, RunAction, RunPlan, SetAction, SetPlan, config_hash, describe_plan, make_plan, set_folder,
)
from trainer.sweep.spec import (
    DEFAULT_EVAL_SEQS, DEFAULT_EVAL_TYPES, DEFAULT_SHARDS_DIR, CheckSpec, Compare, RunSpec, Sweep, SweepError,
    eval_config, load_sweep,
)

__all__ = [
    "CheckResult", "CheckSpec", "Compare", "DEFAULT_EVAL_SEQS", "DEFAULT_EVAL_TYPES", "DEFAULT_SHARDS_DIR",
    "Outcome", "Plan", "RunAction", "RunPlan", "RunSpec", "SetAction", "SetPlan", "Sweep", "SweepError",
    "Verdict", "config_hash", "describe_plan", "eval_config", "evaluate_check", "execute", "load_sweep",
    "make_plan", "set_folder",
]
