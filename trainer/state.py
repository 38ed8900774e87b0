"""The train state and how it is made: optimizer, learning-rate schedule, regularisers, initialisation, loading.

`TrainState` is the whole checkpoint: step, model, BatchNorm state, optimizer state and the training key
(a raw uint32 key, so it serialises). `init_state` makes a fresh one from the config (named key streams from
one root seed); `load_state` reads checkpoint `step` of a run back (into a `state_skeleton`).

Optimizer: Adam with the original's schedule (`learning_rate`), on one flat parameter vector.
Regularisers (beyond the paper, which used none): decoupled weight decay and an L2 penalty.

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

import dataclasses
import os
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

from trainer import checkpoint
from trainer.config import OptimizerConfig, TrainConfig
from trainer.models import make_model
from trainer.runtime.distributed import Topology, replicate

__all__ = ["TrainState", "decay_mask", "decoupled_optimizer", "global_norm", "init_state", "l2_penalty",
           "learning_rate", "load_state", "make_optimizer", "restore", "state_skeleton"]


class TrainState(eqx.Module):
    step: jax.Array  # int32 scalar: number of updates applied
    model: eqx.Module  # trainer.models.Model
    bn_state: eqx.nn.State
    opt_state: optax.OptState
    key: jax.Array  # uint32[2] raw key, split once per step


# ---- optimizer and schedule ----------------------------------------------------------------------
def learning_rate(cfg: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
    """Linear warm-up to max_lr over warmup_steps, then inverse square root decay (the original's schedule).

    lr(s) = min(max_lr / warmup * s, max_lr * sqrt(warmup) / sqrt(s)); lr(0) = 0 as in the original.
    """
    max_lr, warmup = cfg.max_lr, float(cfg.warmup_steps)

    def schedule(count: jax.Array) -> jax.Array:
        s = jnp.asarray(count, jnp.float32)
        return jnp.minimum(max_lr / warmup * s, max_lr * jnp.sqrt(warmup) * jnp.power(s, -0.5))

    return schedule


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Adam with the original's schedule (and optional global-norm clipping), run on ONE flat vector of all
    parameters (`optax.flatten`): the same elementwise arithmetic as per-array Adam, in a few fused
    operations instead of several per parameter array (about 450 small operations per step at paper size).
    The optimizer state therefore holds flat `mu` / `nu` vectors (checkpoint format 2).
    With `weight_decay` > 0: AdamW (`decoupled_optimizer`), a different state layout."""
    if cfg.weight_decay:
        return decoupled_optimizer(cfg, learning_rate(cfg))
    return optax.flatten(_per_array_optimizer(cfg))


def _per_array_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.clip_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam)


# ---- regularisers --------------------------------------------------------------------------------
def _decayed(params: Any, path: tuple) -> bool:
    """Whether the array at `path` of `params` is decayed: not when the field that holds it is declared
    `not_decayed()` where its layer is defined (`trainer.models.layers`; biases, normalisation scales and
    offsets); arrays outside a declared field (e.g. plain dicts) are decayed."""
    owner = params
    for entry in path[:-1]:
        owner = _child(owner, entry)
    last = path[-1] if path else None
    if not isinstance(last, jax.tree_util.GetAttrKey) or not dataclasses.is_dataclass(owner):
        return True
    field = next((f for f in dataclasses.fields(owner) if f.name == last.name), None)
    return field is None or field.metadata.get("decayed", True)


def _child(node: Any, entry: Any) -> Any:
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return getattr(node, entry.name)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return node[entry.idx]
    if isinstance(entry, jax.tree_util.DictKey):
        return node[entry.key]
    raise TypeError(f"decay_mask: cannot follow {entry!r}")


def decay_mask(params: Any, mode: str = "weights") -> Any:
    """A pytree of bools shaped like `params`: which arrays weight decay / L2 act on ("weights": those not
    declared `not_decayed()` by their layer; "all": every array)."""
    if mode == "all":
        return jax.tree_util.tree_map(lambda _: True, params)
    return jax.tree_util.tree_map_with_path(lambda path, _: _decayed(params, path), params)


def l2_penalty(params: Any, l2: float, mode: str = "weights") -> jax.Array:
    """(l2 / 2) * the sum of squares of the masked arrays (a float32 scalar)."""
    mask = decay_mask(params, mode)
    leaves = [jnp.sum(jnp.square(p)) for p, m in zip(jax.tree_util.tree_leaves(params),
                                                      jax.tree_util.tree_leaves(mask)) if m]
    return jnp.float32(0.5 * l2) * (sum(leaves) if leaves else jnp.float32(0.0))


def decoupled_optimizer(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
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


# ---- making, loading and upgrading states --------------------------------------------------------
def init_state(cfg: TrainConfig, num_classes: int) -> TrainState:
    """Fresh train state; named key streams from one root seed: model init and training (dropout)."""
    model_key, train_key = jr.split(jr.PRNGKey(cfg.training.seed))
    model, bn_state = make_model(cfg.model, num_classes, key=model_key, image_size=cfg.training.image_size)
    opt_state = make_optimizer(cfg.optimizer).init(eqx.filter(model, eqx.is_inexact_array))
    state = TrainState(jnp.asarray(0, jnp.int32), model, bn_state, opt_state, train_key)
    # The train step donates the state: every array leaf must own its buffer (initialisers may share one,
    # e.g. BatchNorm's zero statistics), or XLA refuses to donate the same buffer twice.
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, state)


def state_skeleton(cfg: TrainConfig, num_classes: int) -> TrainState:
    """A train state of the right structure, shapes and dtypes to load a checkpoint into."""
    return init_state(cfg, num_classes)


def restore(run_dir: str | os.PathLike, step: int, cfg: TrainConfig, num_classes: int, topo: Topology) -> TrainState:
    """Checkpoint `step` of the run (`load_state`), replicated over the devices of `topo`."""
    return replicate(topo, load_state(run_dir, step, cfg, num_classes))


def load_state(run_dir: str | os.PathLike, step: int, cfg: TrainConfig, num_classes: int) -> TrainState:
    """Checkpoint `step` read into this process only (no collective)."""
    return checkpoint.load(run_dir, step, state_skeleton(cfg, num_classes))
