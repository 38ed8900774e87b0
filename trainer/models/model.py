"""The full model (embedder + sequence model) and its batched forward pass (the original's `_forward_fn`).

`Model.sequence_logits` handles ONE sequence of encoded examples. `forward` encodes the examples of the
whole batch at once (the ResNet runs on the flat batch of B*L images, so BatchNorm uses the statistics of
all of them, as the original's `hk.BatchApply`), then vmaps `Model.sequence_logits` over the sequences; it
switches training / inference with `eqx.nn.inference_mode`.

Outputs are the original's: logits for every token, `[B, 2L-1, num_classes]` with interleaved labels
(`x0, y0, ..., x_query`) or `[B, L, num_classes]` with `concatenate_labels`; `targets` gives the label
the original scores at each of those positions (its `batch['target']`).

Randomness: one key per call. It is split into a positional-dropout key shared by the whole batch (the
original's mask has no batch axis) and one key per sequence, itself split into the example-dropout and
the transformer-dropout keys (per layer, then per site). The streams differ from Haiku's (which draws
from one global sequence of keys), the distributions do not.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from trainer.models.config import ExampleEncoding, ModelConfig, SeqModel
from trainer.models.embedder import Embedder, ModelInputError
from trainer.models.rnn import RNN
from trainer.models.transformer import Transformer


class Model(eqx.Module):
    embedder: Embedder
    seq_model: Transformer | RNN
    cfg: ModelConfig = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, num_classes: int, *, image_size: int = 105, key: PRNGKeyArray):
        if num_classes < 1:
            raise ModelInputError(f"num_classes must be >= 1, got {num_classes}")
        k_emb, k_seq = jr.split(key)
        self.cfg = cfg
        self.num_classes = num_classes
        self.embedder = Embedder(cfg, num_classes, image_size=image_size, key=k_emb)
        if cfg.seq_model is SeqModel.TRANSFORMER:
            self.seq_model = Transformer(
                cfg.token_dim,
                num_classes,
                cfg.num_layers,
                cfg.num_heads,
                widening_factor=cfg.widening_factor,
                dropout_prob=cfg.dropout_prob,
                self_att_init_scale=cfg.self_att_init_scale,
                dense_init_scale=cfg.dense_init_scale,
                key=k_seq,
            )
        else:
            self.seq_model = RNN(
                cfg.seq_model,
                cfg.token_dim,
                num_classes,
                cfg.num_layers,
                cfg.rnn_hidden_size,
                dense_init_scale=cfg.dense_init_scale,
                key=k_seq,
            )

    def sequence_logits(
        self,
        h_example: Float[Array, "l e"],
        labels: Int[Array, " l"],
        *,
        key: PRNGKeyArray | None,
        pos_key: PRNGKeyArray | None,
        query_only: bool = False,
    ) -> Float[Array, "t c"]:
        """One sequence of encoded examples `[L, emb_dim]` and its labels `[L]` -> logits `[T, C]`."""
        example_key, seq_key = (None, None) if key is None else jr.split(key)
        tokens = self.embedder.tokens(h_example, labels, example_key=example_key, pos_key=pos_key)
        return self.seq_model(tokens, key=seq_key, query_only=query_only)


def make_model(
    cfg: ModelConfig, num_classes: int, *, key: PRNGKeyArray, image_size: int = 105
) -> tuple[Model, eqx.nn.State]:
    """Build the model and its BatchNorm state. `image_size` matters only to the linear encoder."""
    return eqx.nn.make_with_state(Model)(cfg, num_classes, image_size=image_size, key=key)


def _needs_key(cfg: ModelConfig, inference: bool) -> bool:
    if cfg.example_dropout_prob > 0:
        return True
    if inference:
        return False
    pos = cfg.use_positional_encodings and cfg.positional_dropout_prob > 0
    return pos or (cfg.seq_model is SeqModel.TRANSFORMER and cfg.dropout_prob > 0)


def _check_inputs(cfg: ModelConfig, examples: Array, labels: Array) -> None:
    if labels.ndim != 2 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ModelInputError(f"labels must be integers [B, L], got {labels.dtype}{list(labels.shape)}")
    if labels.shape[1] < 1:
        raise ModelInputError("sequences must hold at least one example (the query)")
    if examples.shape[:2] != labels.shape:
        raise ModelInputError(
            f"examples {list(examples.shape)} and labels {list(labels.shape)} must agree on [B, L]"
        )
    if cfg.example_encoding is not ExampleEncoding.EMBEDDING and examples.ndim != 5:
        raise ModelInputError(
            f"images must be [B, L, H, W, 1] float32 in [0, 1], got {list(examples.shape)}"
        )


def forward(
    model: Model,
    state: eqx.nn.State,
    examples: Array,
    labels: Int[Array, "b l"],
    *,
    key: PRNGKeyArray | None,
    inference: bool,
    query_only: bool = False,
) -> tuple[Float[Array, "b t c"], eqx.nn.State]:
    """Batched forward: examples `[B, L, H, W, 1]` float32 or `[B, L]` int32, labels `[B, L]` int32.

    Returns logits `[B, T, num_classes]` (T = 2L-1, or L with concatenate_labels) and the new BatchNorm
    state (unchanged at inference). `key` may be None when no dropout is active (example dropout is
    active at inference too). `query_only` runs the transformer's last block and the output layer
    for the query's token alone and returns `[B, 1, num_classes]`: the same query logits for ~1/T of their
    cost, which is all the original's loss and metrics use when interim predictions have no weight.
    """
    cfg = model.cfg
    _check_inputs(cfg, examples, labels)
    if key is None and _needs_key(cfg, inference):
        raise ModelInputError("this model uses dropout: pass key=... to forward")
    model = eqx.nn.inference_mode(model, value=inference)
    batch = labels.shape[0]
    if key is None:
        pos_key = seq_keys = None
        key_axis = None
    else:
        pos_key, k = jr.split(key)
        seq_keys = jr.split(k, batch)
        key_axis = 0

    length = labels.shape[1]
    h_example, state = model.embedder.encode_examples(examples.reshape(batch * length, *examples.shape[2:]), state)
    h_example = h_example.reshape(batch, length, -1)

    def one(h, lab, k, pk):
        return model.sequence_logits(h, lab, key=k, pos_key=pk, query_only=query_only)

    logits = jax.vmap(one, in_axes=(0, 0, key_axis, None))(h_example, labels, seq_keys, pos_key)
    return logits, state


def targets(labels: Int[Array, "... l"], cfg: ModelConfig) -> Int[Array, "... t"]:
    """The label scored at each output position (the original's `batch['target']`).

    Interleaved: `[y0, 0, y1, 0, ..., y_{L-1}]` (2L-1; the label tokens' own outputs are scored against a
    dummy 0, which the loss weights to zero by default); with `concatenate_labels`: the labels themselves.
    """
    if cfg.concatenate_labels:
        return labels
    pairs = jnp.stack([labels, jnp.zeros_like(labels)], axis=-1)
    return pairs.reshape(*labels.shape[:-1], 2 * labels.shape[-1])[..., :-1]


def count_params(model: eqx.Module) -> int:
    """Number of trainable parameters: the model's floating-point arrays (BatchNorm statistics live in the
    state, not the model). Works on shape-only models from `eqx.filter_eval_shape` too."""

    def is_param(x) -> bool:
        return isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)

    leaves = jax.tree_util.tree_leaves(model)
    return int(sum(math.prod(x.shape) for x in leaves if is_param(x)))


__all__ = ["Model", "ModelInputError", "make_model", "forward", "targets", "count_params"]
