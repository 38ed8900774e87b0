"""The transformer's forward pass, inspectable: attention weights, per-head outputs and head ablation.

A separate traced function, not a mode of the model: `Transformer.__call__` computes logits only. This one
runs the same blocks, built from the same two halves (`TransformerBlock.project`, then the attention, then
`TransformerBlock.finish`), as a Python loop over the layers, with the attention computed by
`kernels.attention_with_weights` (the same softmax as the training kernel, which also returns its
weights). With nothing ablated its logits equal the plain forward's (tests/test_analyze.py).

- `collect=True` also returns `{"attention": [layers, heads, T, T], "heads": [layers, T, heads, head_dim]}`
  (the attention-weighted values, before the output projection);
- `keep [layers, heads]` and `replace [layers, T, heads, head_dim]` replace head h of layer l by
  `keep * output + (1 - keep) * replace` before the output projection (keep 0 and replace 0: the head
  zeroed; replace = its mean output over an eval set: mean ablation). Any set of heads may be ablated at
  once (a joint ablation); the mask is an input, so changing it does not recompile.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from trainer.models import kernels
from trainer.models.transformer import Transformer


def inspect(tower: Transformer, x: Float[Array, "t d"], *, query_only: bool = False, collect: bool = False,
            keep: Array | None = None, replace: Array | None = None) -> Any:
    """Logits `[T, C]` (`[1, C]` with `query_only`) of `tower` at inference, as `tower(x, key=None)`;
    with `collect`, `(logits, {"attention", "heads"})`; with `keep` / `replace`, heads ablated (module doc)."""
    if collect and query_only:
        raise ValueError("collect=True needs every token's attention: call with query_only=False")
    if (keep is None) != (replace is None):
        raise ValueError("head ablation needs both keep [layers, heads] and replace [layers, T, heads, head_dim]")
    tower = eqx.nn.inference_mode(tower)  # no dropout: analysis reads the trained function
    params, static = eqx.partition(tower.blocks, eqx.is_array)
    weights, heads_out = [], []
    for i in range(tower.num_layers):
        block = eqx.combine(jax.tree_util.tree_map(lambda a: a[i], params), static)
        q, k, v = block.project(x)
        if query_only and i == tower.num_layers - 1:
            q, x = q[-1:], x[-1:]
        heads, w = kernels.attention_with_weights(q, k, v)
        if keep is not None:
            mask = keep[i][None, :, None]
            heads = heads * mask + (1.0 - mask) * replace[i][-heads.shape[0]:]
        x = block.finish(x, heads, key=None)
        weights.append(w)
        heads_out.append(heads)
    logits = tower.head(tower.final_ln(x))
    if not collect:
        return logits
    return logits, {"attention": jnp.stack(weights), "heads": jnp.stack(heads_out)}


__all__ = ["inspect"]
