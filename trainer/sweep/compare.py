"""The comparisons a sweep check can make (`compare = ...` in `[[checks]]`): one table, each entry saying
how a check reads in words, which threshold it takes, when one seed holds and when a check whose every
seed holds still falls short. `trainer.sweep.spec` validates a check against this table and
`trainer.sweep.checks` reaches its verdict from it; a new comparison is one entry here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal


@dataclasses.dataclass(frozen=True)
class Comparison:
    """`holds(d, t)`: whether one seed holds, d = its value minus the other side's, t = the threshold;
    `short(mean_d, t)`: whether a check whose every seed holds still fails on the mean difference;
    `words(left, other, t)`: the check in words, for tables."""

    threshold: Literal["margin", "tolerance"]  # the sweep-file key of its threshold
    holds: Callable[[float, float], bool]
    short: Callable[[float, float], bool]
    words: Callable[[str, str, float], str]


def _by(margin: float) -> str:
    return f", by >= {margin:g} on the mean" if margin else ""


COMPARISONS: dict[str, Comparison] = {
    "greater": Comparison("margin", lambda d, t: d > 0, lambda m, t: m < t,
                          lambda left, other, t: f"{left} > {other} in every seed{_by(t)}"),
    "less": Comparison("margin", lambda d, t: d < 0, lambda m, t: -m < t,
                       lambda left, other, t: f"{left} < {other} in every seed{_by(t)}"),
    "near": Comparison("tolerance", lambda d, t: abs(d) <= t, lambda m, t: False,
                       lambda left, other, t: f"{left} within {t:g} of {other} in every seed"),
}
