"""`trainer replay RUN --train DIR --steps N`: train the first N steps of a recorded run again, here and now,
and compare its logged training losses with the recorded ones, step by step.

A run's numbers depend on its config, its training set, the code and the machine (the CPU model and its
vector width, the device, the compute settings: docs/gpu.md). The replay holds the first two fixed (the
stored config; a training set whose manifest fingerprint is the recorded one) so that a difference points
at the last two: "bitwise equal through step N" says this machine and code reproduce the run; a first
difference at the first logged step says they compute differently from the start (round-off), which then
compounds. The replay trains in a scratch run directory with no evaluations, and leaves the run alone.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from seqgen.errors import UserError
from trainer.data import manifest_fingerprint, open_sets
from trainer.run import RunDir
from trainer.runtime.platform import platform_record, resolve_compute

PathLike = str | os.PathLike


class ReplayError(UserError):
    """A replay that cannot be made as asked; one-line message."""


@dataclasses.dataclass(frozen=True)
class Replay:
    """The recorded and replayed training losses at each logged step both have, and what they ran on."""

    steps: tuple[int, ...]
    recorded: tuple[float, ...]
    replayed: tuple[float, ...]
    recorded_platform: dict[str, Any] | None
    platform: dict[str, Any]

    @property
    def first_difference(self) -> int | None:
        """The first logged step whose losses differ in any bit; None when all are equal."""
        return next((s for s, a, b in zip(self.steps, self.recorded, self.replayed) if a != b), None)

    def lines(self) -> list[str]:
        """The comparison table and its verdict, as `trainer replay` prints them."""
        out = [f"{'step':>8} {'recorded loss':>16} {'replayed loss':>16} {'|difference|':>13}"]
        for s, a, b in zip(self.steps, self.recorded, self.replayed):
            out.append(f"{s:>8} {a:>16.9g} {b:>16.9g} {abs(a - b):>13.3g}")
        was = (self.recorded_platform or {}).get("cpu", "not recorded")
        out.append(f"recorded on: {was}; replayed on: {self.platform.get('cpu')} ({self.platform.get('backend')})")
        first = self.first_difference
        if first is None:
            out.append(f"bitwise equal at every logged step through step {self.steps[-1]}: this machine and code "
                       "reproduce the run")
        else:
            out.append(f"differs from step {first} on (the first logged step that differs): this machine or code "
                       "computes differently from the recording")
        return out


def _train_losses(run: RunDir, until: int) -> dict[int, float]:
    return {int(r["step"]): float(r["metrics"]["loss"]) for r in run.read_metrics()
            if r.get("kind") == "train" and int(r["step"]) <= until and "loss" in r.get("metrics", {})}


def replay(run_dir: PathLike, train_dir: PathLike, steps: int, *, omniglot_dir: PathLike | None = None,
           cache_dir: PathLike | None = "data/cache", scratch: PathLike | None = None,
           echo: Callable[[str], None] = print) -> Replay:
    """Train the first `steps` steps of the run in `run_dir` again on `train_dir` (its recorded training set,
    checked by fingerprint) in `scratch` (default: a temporary folder, removed after) and compare."""
    from trainer.fit import fit

    run = RunDir(run_dir)
    stored = resolve_compute(run.train_config())
    record = run.read()
    t = stored.training
    if not 1 <= steps <= t.steps:
        raise ReplayError(f"--steps must be between 1 and the run's {t.steps} steps, got {steps}")
    recorded = _train_losses(run, steps)
    if not recorded:
        raise ReplayError(f"{run.path} has no logged training loss at or before step {steps} (it logs every "
                          f"{t.log_every} steps); replay at least --steps {t.log_every}")
    train, _ = open_sets(train_dir, [])
    want = record["data"]["train"]["fingerprint"]
    if manifest_fingerprint(train) != want:
        raise ReplayError(f"{train_dir} is not the run's training set (its manifest fingerprint differs from the "
                          f"recorded {want[:12]}); pass the set the run trained on, or rebuild it with the "
                          "seqgen config recorded in its manifest")
    # the same config but for its length (its schedules too: they decide where dispatches end); no evaluations
    cfg = dataclasses.replace(stored, training=dataclasses.replace(t, steps=steps, keep_checkpoints=1))
    with tempfile.TemporaryDirectory(prefix="replay-") as tmp:
        where = Path(scratch) if scratch is not None else Path(tmp) / "run"
        fit(cfg, train_dir, [], where, omniglot_dir=omniglot_dir, cache_dir=cache_dir, progress=False,
            announce=echo)
        replayed = _train_losses(RunDir(where), steps)
    common = tuple(sorted(set(recorded) & set(replayed)))
    return Replay(common, tuple(recorded[s] for s in common), tuple(replayed[s] for s in common),
                  record.get("platform"), platform_record())
