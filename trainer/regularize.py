"""Regularisers for long runs (beyond the paper, which used none): decoupled weight decay and an L2 penalty.

Two definitions, kept apart because they differ under Adam (Loshchilov & Hutter 2019, "Decoupled Weight
Decay Regularization"):

- `weight_decay` = lambda: **decoupled** weight decay, exactly `optax.adamw`'s update
  `theta <- theta - lr(t) * (adam_direction + lambda * theta)`: the decay is added AFTER Adam's moment
  normalisation and scaled by the scheduled learning rate lr(t) (optax's convention; Loshchilov &
  Hutter write the decay with the schedule multiplier eta_t alone, `theta <- theta - eta_t (alpha *
  adam_direction + lambda * theta)`, so optax's lambda is theirs divided by the peak learning rate alpha).
  The same composition as optax.adamw (`scale_by_adam`, `add_decayed_weights`, `scale_by_learning_rate`);
  Adam still runs on one flat vector (optax.flatten), the decay per array.
- `l2` = mu: the **classic L2 penalty** `(mu / 2) * sum ||theta||^2` added to the training loss, so its
  gradient `mu * theta` is part of the gradient Adam normalises (what "L2 regularisation" meant before
  AdamW). Singh et al. 2023 report that L2 regularisation makes ICL fade later; which of the two forms
  their runs used was not checked here, so both are offered.

Both act on the arrays `decay_mask` selects: "weights" (default) excludes every bias and every LayerNorm
/ BatchNorm scale and offset (arrays named `bias`, `qkv_bias`, `scale`, `offset`), "all" decays
everything (optax.adamw's own default, mask=None). Embedding tables, dense and convolution kernels are
weights. With weight_decay = l2 = 0 (the default) the optimizer and loss are exactly the paper's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

_NOT_DECAYED = frozenset({"bias", "qkv_bias", "scale", "offset"})


def _leaf_name(path: tuple) -> str:
    last = path[-1] if path else None
    return str(getattr(last, "name", getattr(last, "key", "")))


def decay_mask(params: Any, mode: str = "weights") -> Any:
    """A pytree of bools shaped like `params`: which arrays weight decay / L2 act on."""
    if mode == "all":
        return jax.tree_util.tree_map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in _NOT_DECAYED, params)


def l2_penalty(params: Any, l2: float, mode: str = "weights") -> jax.Array:
    """(l2 / 2) * the sum of squares of the masked arrays (a float32 scalar)."""
    mask = decay_mask(params, mode)
    leaves = [jnp.sum(jnp.square(p)) for p, m in zip(jax.tree_util.tree_leaves(params),
                                                      jax.tree_util.tree_leaves(mask)) if m]
    return jnp.float32(0.5 * l2) * (sum(leaves) if leaves else jnp.float32(0.0))


def decoupled_optimizer(cfg: Any, schedule: Any) -> optax.GradientTransformation:
    """optax.adamw(schedule, b1, b2, eps, weight_decay, mask) (plus clipping first when clip_norm is set),
    with the Adam part on one flat vector."""
    inner = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.clip_norm is not None:
        inner = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), inner)
    mask = None if cfg.decay_mask == "all" else (lambda params: decay_mask(params, cfg.decay_mask))
    return optax.chain(optax.flatten(inner), optax.add_decayed_weights(cfg.weight_decay, mask),
                       optax.scale_by_learning_rate(schedule))


def global_norm(tree: Any) -> jax.Array:
    """sqrt of the sum of squares of every array of `tree` (what optax.tree.norm computes), float32."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)) if leaves else jnp.float32(0)


__all__ = ["decay_mask", "decoupled_optimizer", "global_norm", "l2_penalty"]
