"""`trainer fit --profile DIR`: a `jax.profiler` trace of a few training dispatches after warm-up.

Dispatch 0 compiles the train program and dispatch 1 runs warm; the trace covers dispatches 2 to 4 (or
those the run has): it starts once dispatch 1 has finished and stops once dispatch 4 has, so it holds
whole dispatches and nothing of compiling. Waiting for those dispatches changes when the host issues
work, never what is computed: the run's metrics and checkpoints are the same with and without it.

JAX writes `DIR/plugins/profile/<time>/<host>.xplane.pb` (TensorBoard's profile plugin or XProf:
`tensorboard --logdir DIR`) and, beside it, `perfetto_trace.json.gz` (open it at ui.perfetto.dev). In a
multi-process job each process traces into `DIR/process-<i>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

FIRST, LAST = 2, 4  # the dispatches traced


class DispatchProfile:
    """`on_dispatch(i, metrics)` for `trainer.loop.train_loop`: traces dispatches FIRST..LAST into `folder`.
    A context manager: leaving it ends a trace the run was too short to end."""

    def __init__(self, folder: str | os.PathLike, process_index: int = 0, process_count: int = 1,
                 first: int = FIRST, last: int = LAST) -> None:
        self.folder = Path(folder) / f"process-{process_index}" if process_count > 1 else Path(folder)
        self.first, self.last = first, last
        self.active = False
        self.traced: list[int] = []  # the dispatches inside the trace

    def __call__(self, i: int, metrics: Any) -> None:
        if self.active:
            self.traced.append(i)
            if i >= self.last:
                self._stop(metrics)
        elif i == self.first - 1:
            jax.block_until_ready(metrics)  # the trace starts with the device idle: whole dispatches only
            self.folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.folder), create_perfetto_trace=True)
            self.active = True

    def _stop(self, metrics: Any = None) -> None:
        if metrics is not None:
            jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        self.active = False

    def files(self) -> list[Path]:
        """The trace files written (xplane.pb and the Perfetto trace)."""
        return sorted(p for p in self.folder.glob("plugins/profile/*/*") if p.is_file())

    def __enter__(self) -> "DispatchProfile":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self._stop()

    def summary(self) -> str:
        """One line: what was traced and where, or why nothing was."""
        if not self.traced:
            return (f"profile: nothing traced (the run had fewer than {self.first + 1} dispatches); "
                    f"--profile traces dispatches {self.first}-{self.last}")
        return (f"profile: dispatches {self.traced[0]}-{self.traced[-1]} traced in {self.folder} "
                "(tensorboard --logdir, or perfetto_trace.json.gz at ui.perfetto.dev)")
