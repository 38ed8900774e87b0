"""Helpers shared by the trainer benchmarks: FLOPs from XLA's cost analysis, and steps fed other inputs.

XLA's cost analysis counts the body of a loop once, so FLOPs must be counted on programs whose transformer
blocks are unrolled (`trainer.models.kernels.layer_loop()`, the default "unroll"), not run by `lax.scan`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


def cost_flops(compiled) -> float:
    """FLOPs of a compiled program (jax's or equinox's Compiled), NaN where the backend gives none."""
    try:
        ca = getattr(compiled, "compiled", compiled).cost_analysis()
    except Exception:  # cost analysis is best effort across jax versions
        return float("nan")
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


@contextlib.contextmanager
def steps_fed_by(examples: Callable) -> Iterator[None]:
    """Train steps made inside this block take their model inputs from `examples(table, batch, set_cfg)`
    (e.g. a baseline's finished host images) instead of `trainer.images.examples_for(config)`. The
    substitution lives here, at the benchmark's edge; the trainer has no parameter for it."""
    import trainer.step

    made_by = trainer.step.examples_for
    trainer.step.examples_for = lambda cfg: examples
    try:
        yield
    finally:
        trainer.step.examples_for = made_by
