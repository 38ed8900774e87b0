"""Helpers shared by the trainer benchmarks: FLOPs from XLA's cost analysis, counted correctly.

XLA's cost analysis counts the body of a loop once. The transformer runs its blocks with `lax.scan`, so a
12-layer model would be reported with the FLOPs of one block; `unrolled_transformer()` swaps in a Python
loop over the blocks (the same arithmetic) while a program is traced for counting.
"""

from __future__ import annotations

import contextlib

import equinox as eqx
import jax
import jax.random as jr

from trainer.models import transformer as transformer_mod


def _unrolled_call(self, x, *, key, query_only=False):
    keys = [None] * self.num_layers if key is None else list(jr.split(key, self.num_layers))
    params, static = eqx.partition(self.blocks, eqx.is_array)
    for i in range(self.num_layers):
        block = eqx.combine(jax.tree_util.tree_map(lambda a: a[i], params), static)
        x = block(x, key=keys[i])
    return self.head(self.final_ln(x[-1:] if query_only else x))


@contextlib.contextmanager
def unrolled_transformer():
    """Within the block, newly traced models run their transformer blocks as a Python loop."""
    original = transformer_mod.Transformer.__call__
    transformer_mod.Transformer.__call__ = _unrolled_call
    try:
        yield
    finally:
        transformer_mod.Transformer.__call__ = original


def cost_flops(compiled) -> float:
    """FLOPs of a compiled program (jax's or equinox's Compiled), NaN where the backend gives none."""
    try:
        ca = getattr(compiled, "compiled", compiled).cost_analysis()
    except Exception:  # cost analysis is best effort across jax versions
        return float("nan")
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))
