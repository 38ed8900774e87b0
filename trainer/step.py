"""The train state, the optimizer with the original's schedule, and the jitted train / eval steps.

`TrainState` is the whole checkpoint: step, model, BatchNorm state, optimizer state and the training key
(a raw uint32 key, so it serialises). One jitted call does `steps_per_dispatch` steps (lax.scan over
stacked batches); each step builds the pixels from integer batches on the device
(`trainer.images.make_examples`), runs the model, takes the gradient of the original's loss and applies
Adam. Everything that does not change during a run (configs, label sets, the image table) is closed over
or passed as the un-donated first argument.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax.flatten_util import ravel_pytree

from seqgen.config import BuildConfig, SeqType
from trainer import checkpoint
from trainer.config import OptimizerConfig, TrainConfig
from trainer.images import make_examples
from trainer.metrics import LabelSets, per_sequence_metrics, strategy_metrics
from trainer.models import forward, make_model, targets
from trainer.regularize import global_norm, l2_penalty


# Donation is an optimisation: integer batch buffers can't be reused for float outputs, which XLA reports
# as a warning on every compile. It is not a problem.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


class TrainState(eqx.Module):
    step: jax.Array  # int32 scalar: number of updates applied
    model: Any
    bn_state: Any
    opt_state: Any
    key: jax.Array  # uint32[2] raw key, split once per step


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
    With `weight_decay` > 0: AdamW (`trainer.regularize.decoupled_optimizer`), a different state layout."""
    if cfg.weight_decay:
        from trainer.regularize import decoupled_optimizer

        return decoupled_optimizer(cfg, learning_rate(cfg))
    return optax.flatten(_per_array_optimizer(cfg))


def _per_array_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    adam = optax.adam(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.clip_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam)


def init_state(cfg: TrainConfig, num_classes: int) -> TrainState:
    """Fresh train state; named key streams from one root seed: model init and training (dropout)."""
    model_key, train_key = jr.split(jr.PRNGKey(cfg.training.seed))
    model, bn_state = make_model(cfg.model, num_classes, key=model_key, image_size=cfg.training.image_size)
    opt_state = make_optimizer(cfg.optimizer).init(eqx.filter(model, eqx.is_inexact_array))
    state = TrainState(jnp.asarray(0, jnp.int32), model, bn_state, opt_state, train_key)
    # The train step donates the state: every array leaf must own its buffer (initialisers may share one,
    # e.g. BatchNorm's zero statistics), or XLA refuses to donate the same buffer twice.
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, state)


def state_skeleton(cfg: TrainConfig, num_classes: int, format_version: int = checkpoint.FORMAT_VERSION) -> TrainState:
    """A train state of the right structure, shapes and dtypes, for loading a checkpoint of `format_version`
    into (format 1 kept one optimizer-state array per parameter array; `upgrade_state` converts it)."""
    state = init_state(cfg, num_classes)
    if format_version == 1:
        params = eqx.filter(state.model, eqx.is_inexact_array)
        state = eqx.tree_at(lambda s: s.opt_state, state, _per_array_optimizer(cfg.optimizer).init(params))
    return state


def upgrade_state(state: TrainState, format_version: int) -> TrainState:
    """Bring a state loaded from a checkpoint of `format_version` to the current layout: the per-array
    optimizer state of format 1 is concatenated in leaf order, exactly as `optax.flatten` lays it out."""
    if format_version != 1:
        return state
    treedef = jax.tree_util.tree_structure(eqx.filter(state.model, eqx.is_inexact_array))

    def is_param_tree(t) -> bool:
        return jax.tree_util.tree_structure(t) == treedef

    def flat(t):  # ravel_pytree concatenates the leaves in tree order, as optax.flatten does
        return ravel_pytree(t)[0] if is_param_tree(t) else t

    opt_state = jax.tree_util.tree_map(flat, state.opt_state, is_leaf=is_param_tree)
    return eqx.tree_at(lambda s: s.opt_state, state, opt_state)


@dataclass(frozen=True)
class StepContext:
    """Everything static a step needs to know about the data."""

    train_cfg: TrainConfig
    data_cfg: BuildConfig  # of the training set: label sets, dataset mapping, noise
    label_sets: LabelSets

    @classmethod
    def create(cls, train_cfg: TrainConfig, data_cfg: BuildConfig) -> "StepContext":
        return cls(train_cfg, data_cfg, LabelSets.from_config(data_cfg))

    def examples(self, table: jax.Array, batch: dict[str, jax.Array], set_cfg: BuildConfig) -> jax.Array:
        return make_examples(table, batch, set_cfg)


def _loss_and_metrics(model, bn_state, examples, labels, key, ctx: StepContext, seq_type: SeqType, inference: bool,
                      with_logits: bool = False):
    w_interim = ctx.train_cfg.training.w_interim_predictions
    # Loss and every metric read only the query's logits when interim predictions have no weight: then the
    # output layer runs on the query alone (the others' loss weight is 0 and accuracy_interim is defined as
    # 0, as in the original).
    logits, bn_state = forward(model, bn_state, examples, labels, key=key, inference=inference,
                               query_only=not w_interim)
    per = per_sequence_metrics(logits, targets(labels, ctx.train_cfg.model), ctx.label_sets, seq_type, w_interim)
    return ((per, logits) if with_logits else per), bn_state


def make_one_step(ctx: StepContext) -> Callable:
    """Return `one_step(table, state, batch) -> (state, metrics)`: one update, not jitted (`make_train_step`
    scans it over a dispatch; `trainer.group` also vmaps it over runs)."""
    opt_cfg = ctx.train_cfg.optimizer
    optimizer = make_optimizer(opt_cfg)
    seq_type = ctx.data_cfg.seq_type

    def one_step(table, state: TrainState, batch):
        key, step_key = jr.split(state.key)
        examples = ctx.examples(table, batch, ctx.data_cfg)

        def loss_fn(model):
            per, bn_state = _loss_and_metrics(
                model, state.bn_state, examples, batch["label"], step_key, ctx, seq_type, False
            )
            loss = jnp.mean(per["loss"])
            if opt_cfg.l2:  # classic L2 on the loss (trainer.regularize); "loss" in the records stays the data loss
                loss = loss + l2_penalty(eqx.filter(model, eqx.is_inexact_array), opt_cfg.l2, opt_cfg.decay_mask)
            return loss, (bn_state, per)

        (_, (bn_state, per)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(state.model)
        params = eqx.filter(state.model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
        metrics = {k: jnp.mean(v) for k, v in per.items()}
        # global norms: of the gradient of the total loss (before any clipping), of the updated parameters
        metrics["grad_norm"] = global_norm(grads)
        metrics["param_norm"] = global_norm(eqx.filter(model, eqx.is_inexact_array))
        return TrainState(state.step + 1, model, bn_state, opt_state, key), metrics

    return one_step


def make_train_step(ctx: StepContext) -> Callable:
    """Return `step(table, state, batches) -> (state, metrics)`; batches have a leading dispatch axis K."""
    one_step = make_one_step(ctx)

    @functools.partial(eqx.filter_jit, donate="all-except-first")
    def step(table, state: TrainState, batches):
        def body(s, b):
            return one_step(table, s, b)

        return jax.lax.scan(body, state, batches)

    return step


EVAL_KEY_TAG = 0x4556414C  # "EVAL": the evaluation key stream, apart from model init and training


def eval_key(seed: int, step: int) -> jax.Array:
    """Base key of the evaluation of the checkpoint at `step`: batch b of every eval set uses
    `fold_in(eval_key(seed, step), b)`. Example dropout acts at evaluation too (the original applies it
    at train and test: it is noise on the examples), so an evaluation needs a key; as a pure function of
    the run seed, the step and the batch index, any evaluation can be redone exactly (same batch size)."""
    return jr.fold_in(jr.fold_in(jr.PRNGKey(seed), EVAL_KEY_TAG), step)


def make_eval_step(ctx: StepContext, set_cfg: BuildConfig) -> Callable:
    """Return `evaluate(table, model, bn_state, batch, key=None) -> per-sequence metrics dict` in inference
    mode. `key` (see `eval_key`) is used only when the model has example dropout; None otherwise."""
    seq_type = set_cfg.seq_type
    trained = None
    if seq_type.is_strategy:  # flip / copy_available: which answers come from the context, which from weights
        from seqgen.sampling import trained_label_table
        from seqgen.split import make_split

        split = make_split(set_cfg)
        trained = jnp.asarray(trained_label_table(set_cfg, split.rare, split.common), jnp.int32)
    uses_key = ctx.train_cfg.model.example_dropout_prob > 0

    @eqx.filter_jit
    def evaluate(table, model, bn_state, batch, key=None):
        examples = ctx.examples(table, batch, set_cfg)
        model = eqx.nn.inference_mode(model)
        per, _ = _loss_and_metrics(model, bn_state, examples, batch["label"], key if uses_key else None, ctx,
                                   seq_type, True, with_logits=trained is not None)
        if trained is not None:
            per, logits = per
            per = {**per, **strategy_metrics(logits, batch["label"], batch["example"], trained)}
        return per

    return evaluate
