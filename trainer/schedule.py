"""When `fit` evaluates and checkpoints: every N steps (the default), log-spaced, or at listed steps.

Long runs (Singh et al. 2023 trained for 10^7+ steps to see ICL fade) want evaluations and checkpoints
dense where things change (early) and sparse later. `TrainingConfig` chooses, separately for
evaluations and checkpoints:

- `every` (default, today's behaviour): at every multiple of `eval_every` / `checkpoint_every`;
- `log`: at the integers `round(10 ** (k / per_decade))`, k = 0, 1, 2, ... (deduplicated), i.e.
  `eval_per_decade` / `checkpoint_per_decade` points per factor of 10: with 10 per decade
  1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100, 126, ...;
- `list`: at the steps of `eval_steps` / `checkpoint_steps`.

In every case also at the last step of the run (as before). Steps beyond the run's length are never
reached (a resumed, extended run reaches them). `fit` also cuts its multi-step dispatches at these
points, so a scheduled step is never skipped.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

from trainer.config import ScheduleKind, TrainingConfig  # the kinds and their checks live with the config


@functools.lru_cache(maxsize=64)
def log_steps(total: int, per_decade: int) -> tuple[int, ...]:
    """The distinct integers round(10 ** (k / per_decade)) in [1, total], ascending."""
    out: list[int] = []
    k = 0
    while True:
        s = int(round(10 ** (k / per_decade)))
        if s > total:
            return tuple(out)
        if not out or s != out[-1]:
            out.append(s)
        k += 1


@dataclass(frozen=True)
class StepSchedule:
    kind: ScheduleKind
    every: int
    steps: tuple[int, ...]
    per_decade: int
    total: int

    @classmethod
    def of(cls, t: TrainingConfig, what: str) -> "StepSchedule":
        """The schedule of `what` ("eval" or "checkpoint") in a `TrainingConfig`."""
        return cls(ScheduleKind(getattr(t, f"{what}_schedule")), getattr(t, f"{what}_every"),
                   tuple(getattr(t, f"{what}_steps")), getattr(t, f"{what}_per_decade"), t.steps)

    @functools.cached_property
    def points(self) -> tuple[int, ...]:
        """Ascending scheduled steps in [1, total] (log / list; the last step included)."""
        if self.kind is ScheduleKind.LOG:
            pts = set(log_steps(self.total, self.per_decade))
        else:
            pts = {s for s in self.steps if 1 <= s <= self.total}
        return tuple(sorted(pts | {self.total}))

    def due(self, step: int) -> bool:
        if self.kind is ScheduleKind.EVERY:
            return step % self.every == 0 or step == self.total
        i = bisect.bisect_left(self.points, step)
        return i < len(self.points) and self.points[i] == step

    def until_next(self, step: int) -> int:
        """Steps from `step` to the next scheduled step after it (>= 1)."""
        if self.kind is ScheduleKind.EVERY:
            return self.every - step % self.every
        i = bisect.bisect_right(self.points, step)
        return self.points[i] - step if i < len(self.points) else max(1, self.total - step)

    def all_steps(self) -> list[int]:
        """Every scheduled step of the run (for inspection and `--dry-run`-like listings)."""
        if self.kind is ScheduleKind.EVERY:
            return sorted(set(range(self.every, self.total + 1, self.every)) | {self.total})
        return list(self.points)


__all__ = ["ScheduleKind", "StepSchedule", "log_steps"]
