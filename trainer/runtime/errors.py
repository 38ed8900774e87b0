"""The trainer's side of the one-line error policy (`seqgen.errors`): what its commands advise after a
full disk, no memory or an interrupt, as ready decorators.

`one_line_errors` wraps `trainer fit` and `claims`; `rerun_errors` the commands that are simply run again
after a failure (`trainer evaluate / plot / analyze`: they have no --resume); `sweep_errors` wraps
`trainer sweep` and its worker processes (a sweep resumes by being run again, not with --resume).
"""

from __future__ import annotations

from seqgen.errors import Advice, UserError, error_line, fail
from seqgen.errors import one_line_errors as _one_line_errors

__all__ = ["RERUN", "SWEEP", "TRAINER", "UserError", "error_line", "fail", "one_line_errors", "rerun_errors",
           "sweep_errors"]

TRAINER = Advice(
    disk_full="free space, then continue with --resume (complete checkpoints are kept)",
    out_of_memory="lower --batch-size / eval batch size, or use a machine with more memory",
)
RERUN = Advice(
    disk_full="free space, then run the same command again (what it already recorded is kept)",
    out_of_memory="lower --batch-size, or use a machine with more memory",
)
SWEEP = Advice(
    disk_full="free space, then rerun the same command to resume (finished sets and runs are kept)",
    out_of_memory="lower --jobs, --group or --workers, or use a machine with more memory",
    interrupted="rerun the same command to resume (finished sets and runs are kept)",
)

one_line_errors = _one_line_errors(TRAINER)
rerun_errors = _one_line_errors(RERUN)
sweep_errors = _one_line_errors(SWEEP)
