"""A sweep's claims as checks, evaluated on the final evaluation of every seed (`[[checks]]` of the sweep file).

Each check compares one metric (a column: icl, iwl, iwl_common, ...) of a run with another run, seed by
seed (seed s with seed s), or with a number. The verdict:

- `greater` (`less` mirrors it): a seed holds when its value is above the other's. PASS when every seed
  holds and the mean difference is at least `margin`; FAIL when no seed holds, or when every seed holds
  but the mean difference falls short of `margin`; INCONCLUSIVE when the seeds disagree.
- `near`: a seed holds when |value - other| <= `tolerance`. PASS when every seed holds, FAIL when none
  does, INCONCLUSIVE otherwise.
- PENDING: a run that the check needs has no final evaluation yet (nothing is concluded), or, for a metric
  read from analysis.jsonl, no analysis of its final checkpoint.

`than_metric` puts another metric on the right-hand side (e.g. ICL with a head ablated < ICL, of one run).

A sweep without a seed dimension has one "seed", so its checks PASS or FAIL. The thresholds are the
claim's: choose them from the paper before the runs, never after (docs/results.md, "How a claim is checked").
"""

from __future__ import annotations

import dataclasses
import enum
import statistics
from typing import Sequence

from trainer.analyze.records import ABLATION_OF_COLUMN
from trainer.sweep.spec import CheckSpec


class Verdict(str, enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"
    PENDING = "PENDING"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    spec: CheckSpec
    verdict: Verdict
    left: dict[int | None, float]  # seed -> value of the checked run
    right: dict[int | None, float]  # seed -> value of the other run (or the number, per seed)
    detail: str


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def evaluate_check(spec: CheckSpec, finals: dict[str, dict[int | None, float]], seeds: Sequence[int | None],
                   other_finals: dict[str, dict[int | None, float]] | None = None) -> CheckResult:
    """`finals[setting][seed]` = final value of `spec.metric` (absent when not evaluated yet); `other_finals`
    the same of `spec.than_metric` (default: `finals`)."""
    left_all = finals.get(spec.run, {})
    missing = [s for s in seeds if s not in left_all]
    if isinstance(spec.than, str):
        right_all = (finals if other_finals is None else other_finals).get(spec.than, {})
        missing += [s for s in seeds if s not in right_all and s not in missing]
    else:
        right_all = {s: spec.than for s in seeds}
    if missing:
        names = ", ".join("-" if s is None else str(s) for s in missing)
        what = "final evaluation"
        if spec.reads_analysis:
            modes = sorted({ABLATION_OF_COLUMN[m] for m in (spec.metric, spec.other_metric) if m in ABLATION_OF_COLUMN})
            ablation = f" --ablation {modes[0] if len(modes) == 1 else 'both'}" if modes else ""
            what += (" or analysis of the final checkpoint (`trainer analyze RUN_DIR --eval SET --ablate-steps last"
                     f"{ablation}`, then `trainer sweep FILE` to publish it to the results folder)")
        return CheckResult(spec, Verdict.PENDING, {}, {}, f"no {what} yet for seed(s) {names}")
    left = {s: left_all[s] for s in seeds}
    right = {s: right_all[s] for s in seeds}
    diffs = [left[s] - right[s] for s in seeds]
    mean_l, mean_r = statistics.fmean(left.values()), statistics.fmean(right.values())
    mean_d = mean_l - mean_r
    c, t = spec.comparison, spec.threshold
    holds = [c.holds(d, t) for d in diffs]
    if all(holds):
        verdict = Verdict.FAIL if c.short(mean_d, t) else Verdict.PASS
    elif not any(holds):
        verdict = Verdict.FAIL
    else:
        verdict = Verdict.INCONCLUSIVE
    per_seed = "; ".join(f"{'-' if s is None else s}: {_fmt(left[s])} vs {_fmt(right[s])}" for s in seeds)
    detail = (f"mean {_fmt(mean_l)} vs {_fmt(mean_r)} (difference {mean_d:+.3f}); "
              f"{sum(holds)}/{len(holds)} seeds hold; per seed {per_seed}")
    return CheckResult(spec, verdict, left, right, detail)


def evaluate_checks(checks: Sequence[CheckSpec], finals: dict[str, dict[int | None, float]],
                    seeds: Sequence[int | None],
                    other_finals: dict[str, dict[int | None, float]] | None = None) -> list[CheckResult]:
    return [evaluate_check(c, finals, seeds, other_finals) for c in checks]
