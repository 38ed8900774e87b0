"""The original's causal transformer tower (`modules/transformer.py`, `modules/transformer_core.py`).

For one sequence of tokens `[T, D]`:

    num_layers x [ x += Dropout(Attn(LN(x)));  x += Dropout(MLP(LN(x))) ]   (pre-LayerNorm blocks)
    -> LN -> Linear(num_classes)

Attention is multi-head causal self-attention (scores scaled by 1/sqrt(head_dim), queries attend to
themselves and earlier tokens) with biased q/k/v/output projections; the MLP widens by 4 with GELU (the
tanh approximation, `jax.nn.gelu`'s default, as the original). Every dense layer uses
`VarianceScaling(init_scale)`; LayerNorms have scale and offset, eps 1e-5. Dropout (rate `dropout_prob`)
acts at training only; the original's attention-weight dropout is 0 and is not offered.

Implementation choices (same arithmetic as the original): q, k and v come from one fused [D, 3D] matrix
(three independently initialised [D, D] blocks side by side); attention, LayerNorm and GELU are
`kernels.causal_attention`, `kernels.layer_norm` and `kernels.gelu` (XLA's on both paths); the identical blocks are stacked (built
with `eqx.filter_vmap`) and run as an unrolled Python loop or as one `jax.lax.scan` body, by the speed
switch `kernels.layer_loop()` (the same function either way).
With `query_only` (the loss and metrics read only the query's logits) the last block computes the query
token's output alone: its keys and values still come from every token, nothing else of it is used.

The forward pass computes logits only. Analysis (attention weights, per-head outputs, head ablation)
is a separate traced function, `trainer.analyze.inspect.inspect`, built from the same two halves of a
block (`TransformerBlock.project` and `TransformerBlock.finish`), so it cannot drift from this arithmetic.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from trainer.models import kernels
from trainer.models.layers import Dense, LayerNorm, dropout, not_decayed, truncated_normal, variance_scaling_std


class TransformerBlock(eqx.Module):
    ln_attn: LayerNorm
    qkv_weight: Float[Array, "d 3d"]
    qkv_bias: Float[Array, " 3d"] = not_decayed()
    attn_out: Dense
    ln_mlp: LayerNorm
    mlp_in: Dense
    mlp_out: Dense
    inference: bool
    num_heads: int = eqx.field(static=True)
    dropout_prob: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        widening_factor: int = 4,
        dropout_prob: float = 0.0,
        self_att_init_scale: float = 1.0,
        dense_init_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        kq, kk, kv, ko, k1, k2 = jr.split(key, 6)
        att_std = variance_scaling_std(dim, self_att_init_scale)
        self.ln_attn = LayerNorm(dim)
        self.qkv_weight = jnp.concatenate([truncated_normal(k, (dim, dim), att_std) for k in (kq, kk, kv)], axis=1)
        self.qkv_bias = jnp.zeros((3 * dim,), jnp.float32)
        self.attn_out = Dense(dim, dim, std=att_std, key=ko)
        self.ln_mlp = LayerNorm(dim)
        hidden = widening_factor * dim
        self.mlp_in = Dense(dim, hidden, std=variance_scaling_std(dim, dense_init_scale), key=k1)
        self.mlp_out = Dense(hidden, dim, std=variance_scaling_std(hidden, dense_init_scale), key=k2)
        self.inference = False
        self.num_heads = num_heads
        self.dropout_prob = dropout_prob

    def project(self, x: Float[Array, "t d"]) -> tuple[Array, Array, Array]:
        """The first half of the block: q, k, v `[T, H, head_dim]` from LN(x)."""
        t, d = x.shape
        qkv = self.ln_attn(x) @ self.qkv_weight + self.qkv_bias
        q, k, v = jnp.split(qkv.reshape(t, 3 * self.num_heads, d // self.num_heads), 3, axis=1)
        return q, k, v

    def finish(self, x: Float[Array, "t d"], heads: Array, *, key: PRNGKeyArray | None) -> Float[Array, "t d"]:
        """The second half: the heads' outputs `[T, H, head_dim]` through the output projection into the
        residual stream, then the MLP."""
        rate = 0.0 if self.inference else self.dropout_prob
        k_att, k_mlp = jr.split(key) if (key is not None and rate > 0) else (None, None)
        x = x + dropout(self.attn_out(heads.reshape(x.shape)), rate, k_att)
        h = kernels.gelu(self.mlp_in(self.ln_mlp(x)))
        return x + dropout(self.mlp_out(h), rate, k_mlp)

    def __call__(self, x: Float[Array, "t d"], *, key: PRNGKeyArray | None, last_only: bool = False) -> Array:
        """`[T, D] -> [T, D]`, or `[1, D]` (the last token's output alone) with `last_only`."""
        q, k, v = self.project(x)
        if last_only:
            q, x = q[-1:], x[-1:]
        return self.finish(x, kernels.causal_attention(q, k, v), key=key)


class Transformer(eqx.Module):
    """Stacked identical blocks (leading axis num_layers on every array), final LayerNorm and the head."""

    blocks: TransformerBlock
    final_ln: LayerNorm
    head: Dense
    num_layers: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_layers: int,
        num_heads: int,
        *,
        widening_factor: int = 4,
        dropout_prob: float = 0.0,
        self_att_init_scale: float = 1.0,
        dense_init_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        k_blocks, k_head = jr.split(key)

        def make_block(k):
            return TransformerBlock(
                dim,
                num_heads,
                widening_factor=widening_factor,
                dropout_prob=dropout_prob,
                self_att_init_scale=self_att_init_scale,
                dense_init_scale=dense_init_scale,
                key=k,
            )

        self.blocks = eqx.filter_vmap(make_block)(jr.split(k_blocks, num_layers))
        self.final_ln = LayerNorm(dim)
        self.head = Dense(dim, num_classes, std=variance_scaling_std(dim, dense_init_scale), key=k_head)
        self.num_layers = num_layers

    def __call__(self, x: Float[Array, "t d"], *, key: PRNGKeyArray | None,
                 query_only: bool = False) -> Float[Array, "t c"]:
        """Logits `[T, C]` (`[1, C]` with `query_only`)."""
        params, static = eqx.partition(self.blocks, eqx.is_array)
        keys = None if key is None else jr.split(key, self.num_layers)

        def layer(h, xs):
            p, k = xs
            return eqx.combine(p, static)(h, key=k), None

        def select(i):
            return jax.tree_util.tree_map(lambda a: a[i], (params, keys))

        # With query_only the last block computes the query token's output alone (its keys and values
        # still come from every token): the other tokens' outputs of the last block reach nothing.
        full = self.num_layers - 1 if query_only else self.num_layers
        if kernels.layer_loop() == "unroll":
            for i in range(full):
                x, _ = layer(x, select(i))
        elif full > 0:
            x, _ = jax.lax.scan(layer, x, jax.tree_util.tree_map(lambda a: a[:full], (params, keys)))
        if query_only:
            p, k = select(self.num_layers - 1)
            x = eqx.combine(p, static)(x, key=k, last_only=True)
        return self.head(self.final_ln(x))
