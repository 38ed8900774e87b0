"""The jitted train and eval steps.

One jitted call does `steps_per_dispatch` steps (lax.scan over stacked batches); each step builds the
pixels from integer batches on the device (`trainer.images.make_examples`), runs the model, takes the
gradient of the original's loss and applies Adam (`trainer.state`: the train state and the optimizer).
Everything that does not change during a run (configs, label sets, the image table) is closed over or
passed as the un-donated first argument.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from seqgen.config import BuildConfig, SeqType
from trainer.config import TrainConfig
from trainer.images import examples_for
from trainer.metrics import LabelSets, per_sequence_metrics, strategy_metrics
from trainer.models import forward, targets
from trainer.runtime.platform import compute_dtype, computing
from trainer.state import TrainState, global_norm, l2_penalty, make_optimizer


# Donation is an optimisation: integer batch buffers can't be reused for float outputs, which XLA reports
# as a warning on every compile. It is not a problem.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


@dataclass(frozen=True)
class StepContext:
    """Everything static a step needs to know about the data."""

    train_cfg: TrainConfig
    data_cfg: BuildConfig  # of the training set: label sets, dataset mapping, noise
    label_sets: LabelSets

    @classmethod
    def create(cls, train_cfg: TrainConfig, data_cfg: BuildConfig) -> "StepContext":
        return cls(train_cfg, data_cfg, LabelSets.from_config(data_cfg))


def _cast_floats(tree, dtype):
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) and x.dtype != dtype else x, tree)


def _loss_and_metrics(model, bn_state, examples, labels, key, ctx: StepContext, seq_type: SeqType, inference: bool,
                      with_logits: bool = False):
    w_interim = ctx.train_cfg.training.w_interim_predictions
    dtype = compute_dtype(ctx.train_cfg.compute)
    if dtype != jnp.float32:  # mixed precision: float32 parameters and state, the forward pass in `dtype`
        model, examples = _cast_floats(model, dtype), _cast_floats(examples, dtype)
        # the statistics' dtypes, read now: `forward` consumes `bn_state` (an eqx.nn.State refuses reuse)
        kept = [x.dtype for x in jax.tree_util.tree_leaves(bn_state)]
    # Loss and every metric read only the query's logits when interim predictions have no weight: then the
    # output layer runs on the query alone (the others' loss weight is 0 and accuracy_interim is defined as
    # 0, as in the original).
    logits, bn_state = forward(model, bn_state, examples, labels, key=key, inference=inference,
                               query_only=not w_interim)
    if dtype != jnp.float32:  # loss, metrics and BatchNorm statistics in float32
        logits = logits.astype(jnp.float32)
        leaves, treedef = jax.tree_util.tree_flatten(bn_state)
        bn_state = jax.tree_util.tree_unflatten(treedef, [x.astype(d) for x, d in zip(leaves, kept, strict=True)])
    per = per_sequence_metrics(logits, targets(labels, ctx.train_cfg.model), ctx.label_sets, seq_type, w_interim)
    return ((per, logits) if with_logits else per), bn_state


def make_one_step(ctx: StepContext) -> Callable:
    """Return `one_step(table, state, batch) -> (state, metrics)`: one update, not jitted (`make_train_step`
    scans it over a dispatch; `trainer.group` also vmaps it over runs)."""
    opt_cfg = ctx.train_cfg.optimizer
    optimizer = make_optimizer(opt_cfg)
    seq_type = ctx.data_cfg.seq_type
    examples = examples_for(ctx.train_cfg)  # (table, batch, set_cfg) -> model inputs, made on the device

    def one_step(table, state: TrainState, batch):
        with computing(ctx.train_cfg.compute):  # kernel path, layer loop, precision: read while tracing
            return _one_step(table, state, batch)

    def _one_step(table, state: TrainState, batch):
        key, step_key = jr.split(state.key)
        inputs = examples(table, batch, ctx.data_cfg)

        def loss_fn(model):
            per, bn_state = _loss_and_metrics(
                model, state.bn_state, inputs, batch["label"], step_key, ctx, seq_type, False
            )
            loss = jnp.mean(per["loss"])
            if opt_cfg.l2:  # classic L2 on the loss (trainer.state); "loss" in the records stays the data loss
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


def run_steps(body: Callable, state, batches, n: jax.Array):
    """The first `n` (a traced int32) of the K stacked `batches`, each `state, metrics = body(state, batch)`:
    `(state, metrics [K, ...])`, rows >= n of metrics zero. The trip count is a value, not a shape, so one
    compiled program does every dispatch of a run, whatever its schedules cut them to (`trainer.loop`)."""
    k_max = jax.tree_util.tree_leaves(batches)[0].shape[0]
    first = jax.tree_util.tree_map(lambda x: x[0], batches)
    shapes = jax.eval_shape(body, state, first)[1]
    buffers = jax.tree_util.tree_map(lambda m: jnp.zeros((k_max, *m.shape), m.dtype), shapes)

    def loop_body(i, carry):
        s, out = carry
        s, metrics = body(s, jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, False), batches))
        return s, jax.tree_util.tree_map(lambda buf, m: jax.lax.dynamic_update_index_in_dim(buf, m, i, 0), out, metrics)

    return jax.lax.fori_loop(0, n, loop_body, (state, buffers))


def make_train_step(ctx: StepContext) -> Callable:
    """Return `step(table, state, batches, n) -> (state, metrics)`: the first `n` of the K batches stacked
    along a leading dispatch axis (`run_steps`; `n` an int32 array, so it does not recompile), metrics [K]."""
    one_step = make_one_step(ctx)

    @functools.partial(eqx.filter_jit, donate="all-except-first")
    def step(table, state: TrainState, batches, n):
        return run_steps(lambda s, b: one_step(table, s, b), state, batches, n)

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
        with computing(ctx.train_cfg.compute):
            return _evaluate(table, model, bn_state, batch, key)

    def _evaluate(table, model, bn_state, batch, key):
        inputs = examples_for(ctx.train_cfg)(table, batch, set_cfg)
        model = eqx.nn.inference_mode(model)
        per, _ = _loss_and_metrics(model, bn_state, inputs, batch["label"], key if uses_key else None, ctx,
                                   seq_type, True, with_logits=trained is not None)
        if trained is not None:
            per, logits = per
            per = {**per, **strategy_metrics(logits, batch["label"], batch["example"], trained)}
        return per

    return evaluate
