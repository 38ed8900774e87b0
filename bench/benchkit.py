"""Helpers shared by the trainer benchmarks: FLOPs from XLA's cost analysis.

XLA's cost analysis counts the body of a loop once, so FLOPs must be counted on programs whose transformer
blocks are unrolled (`trainer.models.kernels.layer_loop()`, the default "unroll"), not run by `lax.scan`.
"""

from __future__ import annotations


def cost_flops(compiled) -> float:
    """FLOPs of a compiled program (jax's or equinox's Compiled), NaN where the backend gives none."""
    try:
        ca = getattr(compiled, "compiled", compiled).cost_analysis()
    except Exception:  # cost analysis is best effort across jax versions
        return float("nan")
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))
