"""Tests of trainer.models: shapes, token order, causality, BatchNorm semantics, parameter count, keys.

Tiny configs (2 layers, 16-28 px images) keep this file fast; the full-size parameter count is computed
with `eqx.filter_eval_shape` (no arrays allocated).
"""

from __future__ import annotations

import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from seqgen.config import ConfigError
from trainer.models import (
    BatchNorm,
    ExampleEncoding,
    ModelConfig,
    ModelInputError,
    SeqModel,
    count_params,
    forward,
    make_model,
    positional_encodings,
    targets,
)
from trainer.models.layers import gelu, layer_norm, truncated_normal
from trainer.models.transformer import Transformer, causal_attention
from trainer.models.resnet import batch_norm_train, conv_same, max_pool_3x3_s2, relu_max_pool_3x3_s2

NUM_CLASSES = 11


def tiny(**kw) -> ModelConfig:
    base = dict(emb_dim=16, num_layers=2, num_heads=2, rnn_hidden_size=8)
    base.update(kw)
    return ModelConfig(**base)


def make_batch(cfg: ModelConfig, b: int = 3, length: int = 4, size: int = 16, seed: int = 0):
    k1, k2 = jr.split(jr.PRNGKey(seed))
    if cfg.example_encoding is ExampleEncoding.EMBEDDING:
        examples = jr.randint(k1, (b, length), 0, NUM_CLASSES)
    else:
        examples = jr.uniform(k1, (b, length, size, size, 1))
    labels = jr.randint(k2, (b, length), 0, NUM_CLASSES)
    return examples, labels


@eqx.filter_jit
def _forward_train(model, state, examples, labels, key):
    return forward(model, state, examples, labels, key=key, inference=False)


@eqx.filter_jit
def _forward_eval(model, state, examples, labels, key):
    return forward(model, state, examples, labels, key=key, inference=True)


def jit_forward(inference: bool):
    """Module-level jitted forwards, so tests with the same config and shapes share one compilation."""
    return _forward_eval if inference else _forward_train


# ---------------------------------------------------------------- parameter count (paper model)


def original_param_count(num_classes: int = 1623, emb: int = 64, layers: int = 12, widening: int = 4) -> int:
    """Trainable parameters of the original haiku model, summed from its modules' definitions.

    ResNet (modules/resnet.py, SimpleResNet v1, bottleneck, use_projection on every group's first block):
    every hk.Conv2D has with_bias=False (kh*kw*cin*cout weights), every hk.BatchNorm has scale + offset
    (2*c; moving averages are state). Embedder: label table [num_classes, emb]. Transformer
    (transformer_core.py): per block two hk.LayerNorm (scale + offset), q/k/v/out conv1 = hk.Linear with bias,
    MLP emb -> 4 emb -> emb with biases; final LayerNorm; head hk.Linear(num_classes) with bias.
    """
    conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    resnet = conv(7, 1, 64) + bn(64)  # initial_conv + initial_batchnorm
    cin = 64
    for channels in (16, 32, 32, emb):  # channels_per_group, blocks_per_group (2, 2, 2, 2)
        mid = channels // 4
        for i in range(2):
            if i == 0:  # shortcut_conv (1x1, stride) + shortcut_batchnorm
                resnet += conv(1, cin, channels) + bn(channels)
            resnet += conv(1, cin, mid) + bn(mid)  # conv_0 + batchnorm_0
            resnet += conv(3, mid, mid) + bn(mid)  # conv_1 + batchnorm_1
            resnet += conv(1, mid, channels) + bn(channels)  # conv_2 + batchnorm_2
            cin = channels
    label_embs = num_classes * emb
    linear = lambda i, o: i * o + o  # noqa: E731
    layer_norm = 2 * emb
    block = layer_norm + 4 * linear(emb, emb) + layer_norm + linear(emb, widening * emb) + linear(widening * emb, emb)
    head = layer_norm + linear(emb, num_classes)
    return resnet + label_embs + layers * block + head


def test_param_count_equals_original_at_paper_defaults():
    model, _ = eqx.filter_eval_shape(make_model, ModelConfig(), 1623, key=jr.PRNGKey(0))
    expected = original_param_count()
    assert expected == 831_479  # pinned: 22,176 ResNet + 103,872 labels + 599,808 blocks + 105,623 final LN/head
    assert count_params(model) == expected


def test_param_count_excludes_batchnorm_statistics():
    model, state = make_model(tiny(), NUM_CLASSES, key=jr.PRNGKey(0))
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert n_state > 0
    n_all = sum(x.size for x in jax.tree_util.tree_leaves(model) if eqx.is_array(x))
    assert count_params(model) == n_all  # no statistics hide in the model itself


# ---------------------------------------------------------------- shapes and targets


@pytest.mark.parametrize(
    "encoding,seq_model,concat",
    list(itertools.product(ExampleEncoding, SeqModel, [False, True])),
)
def test_output_shapes(encoding, seq_model, concat):
    cfg = tiny(example_encoding=encoding, seq_model=seq_model, concatenate_labels=concat)
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0), image_size=16)
    examples, labels = make_batch(cfg, b=3, length=5, size=16)
    logits, new_state = eqx.filter_eval_shape(
        lambda m, s, e, l: forward(m, s, e, l, key=None, inference=False), model, state, examples, labels
    )
    t = 5 if concat else 9
    assert logits.shape == (3, t, NUM_CLASSES) and logits.dtype == jnp.float32
    assert targets(labels, cfg).shape == (3, t)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


def test_targets_match_original():
    labels = jnp.array([[5, 6, 7], [1, 2, 3]])
    np.testing.assert_array_equal(targets(labels, tiny()), [[5, 0, 6, 0, 7], [1, 0, 2, 0, 3]])
    np.testing.assert_array_equal(targets(labels, tiny(concatenate_labels=True)), labels)


# ---------------------------------------------------------------- token order and positional encodings


def test_interleaving_order_and_no_query_label():
    cfg = tiny(example_encoding=ExampleEncoding.EMBEDDING, use_positional_encodings=False)
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = jnp.array([3, 1, 4, 1]), jnp.array([9, 2, 6, 5])
    tokens, _ = model.embedder(ex, lab, state, example_key=None, pos_key=None)
    e, y = model.embedder.example_table, model.embedder.label_table
    expected = jnp.stack([e[3], y[9], e[1], y[2], e[4], y[6], e[1]])  # x0, y0, x1, y1, x2, y2, x_query
    np.testing.assert_array_equal(tokens, expected)


def test_concatenated_tokens_hide_query_label():
    cfg = tiny(example_encoding=ExampleEncoding.EMBEDDING, use_positional_encodings=False, concatenate_labels=True)
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = jnp.array([3, 1, 4]), jnp.array([9, 2, 6])
    tokens, _ = model.embedder(ex, lab, state, example_key=None, pos_key=None)
    e, y = model.embedder.example_table, model.embedder.label_table
    assert y.shape == (NUM_CLASSES + 1, 16)
    expected = jnp.stack([jnp.concatenate(p) for p in [(e[3], y[9]), (e[1], y[2]), (e[4], y[NUM_CLASSES])]])
    np.testing.assert_array_equal(tokens, expected)


def test_positional_encodings_formula():
    pe = np.asarray(positional_encodings(7, 8, 30.0))
    t = np.arange(7)[:, None]
    inv = 1.0 / 30.0 ** (np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(pe, np.concatenate([np.sin(t * inv), np.cos(t * inv)], -1), rtol=1e-6, atol=1e-6)
    cfg = tiny(example_encoding=ExampleEncoding.EMBEDDING)
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = jnp.array([3, 1]), jnp.array([9, 2])
    tokens, _ = model.embedder(ex, lab, state, example_key=None, pos_key=None)
    e, y = model.embedder.example_table, model.embedder.label_table
    np.testing.assert_allclose(tokens - jnp.stack([e[3], y[9], e[1]]), positional_encodings(3, 16), atol=1e-6)


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize("seq_model", list(SeqModel))
def test_causal_later_tokens_do_not_change_earlier_logits(seq_model):
    cfg = tiny(example_encoding=ExampleEncoding.EMBEDDING, seq_model=seq_model)
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = make_batch(cfg, b=2, length=5)
    f = jit_forward(inference=False)
    base, _ = f(model, state, ex, lab, None)
    # Change example 3 (token 6) and the labels from 3 on (tokens 7+, and the query's, never an input).
    ex2, lab2 = ex.at[:, 3].set((ex[:, 3] + 1) % NUM_CLASSES), lab.at[:, 3:].set((lab[:, 3:] + 1) % NUM_CLASSES)
    out, _ = f(model, state, ex2, lab2, None)
    np.testing.assert_allclose(out[:, :6], base[:, :6], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, 6], base[:, 6], atol=1e-4)
    # Changing only the query's label changes nothing at all.
    out_q, _ = f(model, state, ex, lab.at[:, -1].set((lab[:, -1] + 1) % NUM_CLASSES), None)
    np.testing.assert_allclose(out_q, base, rtol=1e-6, atol=1e-6)


def test_causal_with_resnet_in_inference_mode():
    cfg = tiny()
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = make_batch(cfg, b=2, length=3, size=16)
    _, state = jit_forward(False)(model, state, ex, lab, None)  # populate running statistics
    f = jit_forward(True)
    base, _ = f(model, state, ex, lab, None)
    out, _ = f(model, state, ex.at[:, 1].set(1.0 - ex[:, 1]), lab, None)
    np.testing.assert_allclose(out[:, :2], base[:, :2], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out[:, 2], base[:, 2], atol=1e-4)


# ---------------------------------------------------------------- BatchNorm


def _bn_apply(bn, state, x, inference=False):
    """x [B, L, H, W, C] through a BatchNorm on the flat batch of B*L images, as the model runs it."""
    bn = eqx.nn.inference_mode(bn, inference)
    y, state = bn(x.reshape(-1, *x.shape[2:]), state)
    return y.reshape(x.shape), state


def test_batchnorm_uses_statistics_of_all_images_and_debiased_ema():
    bn, state = eqx.nn.make_with_state(BatchNorm)(3, decay=0.9, eps=1e-5)
    x1 = jr.normal(jr.PRNGKey(0), (4, 5, 6, 6, 3)) * jnp.array([1.0, 2.0, 3.0]) + jnp.array([0.5, -1.0, 2.0])
    y1, state1 = _bn_apply(bn, state, x1)
    flat = np.asarray(x1).reshape(-1, 3)  # all B*L images' pixels, as the original's reshape
    m1, v1 = flat.mean(0), flat.var(0)
    np.testing.assert_allclose(np.asarray(y1), (np.asarray(x1) - m1) / np.sqrt(v1 + 1e-5), rtol=1e-4, atol=1e-4)
    # Haiku's zero-debiased EMA: after one update the average IS the batch statistics.
    mean, var = bn.running_stats(state1)
    np.testing.assert_allclose(mean, m1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, v1, rtol=1e-4)
    x2 = x1 * 0.5 + 1.0
    _, state2 = _bn_apply(bn, state1, x2)
    flat2 = np.asarray(x2).reshape(-1, 3)
    d = 0.9
    exp_mean = (d * (1 - d) * m1 + (1 - d) * flat2.mean(0)) / (1 - d**2)
    exp_var = (d * (1 - d) * v1 + (1 - d) * flat2.var(0)) / (1 - d**2)
    mean2, var2 = bn.running_stats(state2)
    np.testing.assert_allclose(mean2, exp_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var2, exp_var, rtol=1e-4)
    assert int(state2.get(bn.stats)[0]) == 2
    # Inference: running statistics, state untouched.
    x3 = jr.normal(jr.PRNGKey(3), (2, 3, 6, 6, 3))
    y3, state3 = _bn_apply(bn, state2, x3, inference=True)
    np.testing.assert_allclose(y3, (x3 - mean2) / jnp.sqrt(var2 + 1e-5), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(state3), jax.tree_util.tree_leaves(state2)):
        np.testing.assert_array_equal(a, b)


def test_batchnorm_training_output_matches_equinox():
    x = jr.normal(jr.PRNGKey(1), (6, 5, 5, 4)) * 3.0 + 1.0
    bn, state = eqx.nn.make_with_state(BatchNorm)(4)
    ours, _ = bn(x, state)
    ebn, estate = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "batch", mode="batch", momentum=0.9)
    theirs, _ = jax.vmap(ebn, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(
        jnp.moveaxis(x, -1, 1), estate
    )
    np.testing.assert_allclose(ours, jnp.moveaxis(theirs, 1, -1), rtol=1e-4, atol=1e-4)


def test_batchnorm_gradient_matches_autodiff_of_the_formula():
    x = jr.normal(jr.PRNGKey(0), (6, 5, 5, 4)) * jnp.array([1.0, 2.0, 0.5, 3.0]) + jnp.array([0.5, -1.0, 2.0, 0.0])
    scale, offset = jr.normal(jr.PRNGKey(1), (4,)), jr.normal(jr.PRNGKey(2), (4,))

    def reference(x, scale, offset):  # hk.BatchNorm's training arithmetic, differentiated by JAX
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(mean)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + offset, mean, var

    ours_out = batch_norm_train(x, scale, offset, 1e-5)
    for a, b in zip(ours_out, reference(x, scale, offset)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # cotangents for all three outputs (the model stops gradients at mean and var, the function does not)
    cts = (jr.normal(jr.PRNGKey(3), x.shape), jr.normal(jr.PRNGKey(4), (4,)), jr.normal(jr.PRNGKey(5), (4,)))
    ours = jax.vjp(lambda *a: batch_norm_train(*a, 1e-5), x, scale, offset)[1](cts)
    _grads_close(ours, jax.vjp(reference, x, scale, offset)[1](cts), rtol=2e-5)
    only_y = (cts[0], jnp.zeros(4), jnp.zeros(4))
    ours = jax.vjp(lambda *a: batch_norm_train(*a, 1e-5), x, scale, offset)[1](only_y)
    _grads_close(ours, jax.vjp(reference, x, scale, offset)[1](only_y), rtol=2e-5)


def test_model_state_updates_in_training_only():
    cfg = tiny()
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = make_batch(cfg, b=2, length=3, size=16)
    _, trained = jit_forward(False)(model, state, ex, lab, None)
    _, evaluated = jit_forward(True)(model, trained, ex, lab, None)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(trained))]
    assert all(changed)  # every BatchNorm's counter and averages moved
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(evaluated)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- ResNet details


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (7, 7), (14, 14), (27, 27), (53, 53)])
def test_max_pool_matches_reduce_window(h, w):
    x = jr.normal(jr.PRNGKey(h * 100 + w), (h, w, 3))
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (3, 3, 1), (2, 2, 1), "SAME")
    np.testing.assert_array_equal(max_pool_3x3_s2(x), ref)


@pytest.mark.parametrize("shape,k,stride", [((3, 28, 28, 1), 7, 2), ((4, 7, 7, 4), 3, 1), ((2, 7, 7, 8), 3, 2),
                                             ((2, 4, 4, 8), 3, 2), ((1, 5, 6, 3), 3, 2), ((2, 9, 9, 2), 7, 2)])
def test_conv_gradients_match_autodiff(shape, k, stride):
    x = jr.normal(jr.PRNGKey(0), shape)
    w = jr.normal(jr.PRNGKey(1), (k, k, shape[-1], 5))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv_same(x, w, stride))), (0, 1))(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), (0, 1))(x, w)
    np.testing.assert_allclose(conv_same(x, w, stride), conv(x, w), rtol=0, atol=0)
    # Under differentiation the forward is a patches matmul: the same sums in another order.
    trained = jax.vjp(lambda x, w: conv_same(x, w, stride), x, w)[0]
    np.testing.assert_allclose(trained, conv(x, w), rtol=1e-5, atol=1e-5)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def _grads_close(ours, ref, rtol=1e-5):
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))


def test_layer_norm_matches_autodiff_of_the_formula():
    x = jr.normal(jr.PRNGKey(0), (4, 5, 16)) * 3 + 1
    scale, offset = jr.normal(jr.PRNGKey(1), (16,)), jr.normal(jr.PRNGKey(2), (16,))

    def reference(x, scale, offset):  # hk.LayerNorm's arithmetic, differentiated by JAX
        mean = jnp.mean(x, axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-5) * scale + offset

    np.testing.assert_allclose(layer_norm(x, scale, offset, 1e-5), reference(x, scale, offset), rtol=1e-6, atol=1e-6)
    g = jr.normal(jr.PRNGKey(3), x.shape)
    ours = jax.vjp(lambda *a: layer_norm(*a, 1e-5), x, scale, offset)[1](g)
    _grads_close(ours, jax.vjp(reference, x, scale, offset)[1](g))
    # under vmap (as the model calls it), parameter cotangents are summed over the batch
    batched = jax.vjp(lambda x, s, o: jax.vmap(lambda r: layer_norm(r, s, o, 1e-5))(x), x, scale, offset)[1](g)
    _grads_close(batched, jax.vjp(reference, x, scale, offset)[1](g))


def test_unrolled_and_scanned_layers_agree():
    """`unroll_layers` changes how the identical blocks run, not what they compute (dropout keys included)."""
    kw = dict(key=jr.PRNGKey(0), dropout_prob=0.2)
    unrolled, scanned = Transformer(16, 7, 3, 2, unroll=True, **kw), Transformer(16, 7, 3, 2, unroll=False, **kw)
    x = jr.normal(jr.PRNGKey(1), (5, 16))
    key = jr.PRNGKey(2)
    np.testing.assert_allclose(unrolled(x, key=key), scanned(x, key=key), rtol=1e-5, atol=1e-6)
    plain = eqx.nn.inference_mode(unrolled)(x, key=None)
    np.testing.assert_allclose(plain, eqx.nn.inference_mode(scanned)(x, key=None), rtol=1e-5, atol=1e-6)
    assert not np.allclose(unrolled(x, key=key), plain, atol=1e-3)  # dropout acts

    def grads(m):
        return eqx.filter_grad(lambda m, x: jnp.sum(jnp.sin(m(x, key=jr.PRNGKey(3)))))(m, x)

    _grads_close(eqx.filter(grads(unrolled), eqx.is_array), eqx.filter(grads(scanned), eqx.is_array))


def test_gelu_matches_jax_and_its_autodiff():
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001), jr.normal(jr.PRNGKey(0), (999,)) * 3])
    np.testing.assert_array_equal(gelu(x), jax.nn.gelu(x))  # the forward IS jax.nn.gelu (tanh approximation)
    g = jr.normal(jr.PRNGKey(1), x.shape)
    _grads_close(jax.vjp(gelu, x)[1](g), jax.vjp(jax.nn.gelu, x)[1](g))
    # the exact derivative, in float64 arithmetic (NumPy): checks the formula, not only agreement with autodiff
    xd = np.asarray(x, np.float64)
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (xd + 0.044715 * xd**3))
    d = 0.5 * (1 + t) + 0.5 * xd * (1 - t**2) * c * (1 + 3 * 0.044715 * xd**2)
    np.testing.assert_allclose(jax.grad(lambda z: gelu(z).sum())(x), d, rtol=1e-5, atol=1e-5)  # float32 tanh saturates


def test_attention_matches_autodiff_and_library():
    q, k, v = (jr.normal(jr.PRNGKey(i), (7, 3, 4)) for i in range(3))

    def reference(q, k, v):  # jax's own causal attention, differentiated by JAX
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    np.testing.assert_allclose(causal_attention(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-6)
    g = jr.normal(jr.PRNGKey(5), q.shape)
    _grads_close(jax.vjp(causal_attention, q, k, v)[1](g), jax.vjp(reference, q, k, v)[1](g))
    g = jr.normal(jr.PRNGKey(6), (2, *q.shape))  # batched, as in the model
    ours = jax.vjp(jax.vmap(causal_attention), *(jnp.stack([a, a * 0.5]) for a in (q, k, v)))[1](g)
    ref = jax.vjp(jax.vmap(reference), *(jnp.stack([a, a * 0.5]) for a in (q, k, v)))[1](g)
    _grads_close(ours, ref)


@pytest.mark.parametrize("tq", [1, 3])
def test_attention_of_the_last_queries_only(tq):
    """q holding only the last tq tokens' queries gives those rows of the full causal attention."""
    q, k, v = (jr.normal(jr.PRNGKey(i), (7, 3, 4)) for i in range(3))
    full = causal_attention(q, k, v)
    np.testing.assert_allclose(causal_attention(q[-tq:], k, v), full[-tq:], rtol=1e-5, atol=1e-6)
    g = jr.normal(jr.PRNGKey(5), (tq, 3, 4))
    ours = jax.vjp(lambda q, k, v: causal_attention(q[-tq:], k, v), q, k, v)[1](g)
    ref = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)[-tq:], q, k, v)[1](g)
    _grads_close(ours, ref)


@pytest.mark.parametrize("unroll", [True, False])
@pytest.mark.parametrize("layers", [1, 3])
def test_query_only_transformer_is_the_last_row(unroll, layers):
    """query_only runs the last block for the query token alone: same logits and gradients as the full
    output's last row."""
    tr = eqx.nn.inference_mode(Transformer(16, 7, layers, 2, unroll=unroll, key=jr.PRNGKey(0)))
    x = jr.normal(jr.PRNGKey(1), (5, 16))
    query = tr(x, key=None, query_only=True)
    assert query.shape == (1, 7)
    np.testing.assert_allclose(query, tr(x, key=None)[-1:], rtol=1e-5, atol=1e-6)

    def grads(query_only):
        def f(m, x):
            out = m(x, key=None, query_only=query_only)
            return jnp.sum(jnp.sin(out[-1]))
        return eqx.filter_grad(f)(tr, x)

    _grads_close(eqx.filter(grads(True), eqx.is_array), eqx.filter(grads(False), eqx.is_array))


@pytest.mark.parametrize("h,w", [(2, 3), (7, 7), (14, 14), (27, 27)])
def test_relu_max_pool_gradient_matches_autodiff(h, w):
    # Integer-valued inputs: ties inside windows and exact zeros exercise the tie-splitting rules.
    x = jnp.round(jr.normal(jr.PRNGKey(h + w), (h, w, 3)) * 2)
    g = jr.normal(jr.PRNGKey(7), max_pool_3x3_s2(x).shape)
    ours = jax.vjp(relu_max_pool_3x3_s2, x)[1](g)[0]
    ref = jax.vjp(lambda v: max_pool_3x3_s2(jax.nn.relu(v)), x)[1](g)[0]
    np.testing.assert_array_equal(relu_max_pool_3x3_s2(x), max_pool_3x3_s2(jax.nn.relu(x)))
    np.testing.assert_array_equal(ours, ref)


def test_resnet_structure_and_init():
    model, _ = make_model(tiny(num_layers=1), NUM_CLASSES, key=jr.PRNGKey(0))
    res = model.embedder.encoder
    assert res.initial_conv.weight.shape == (7, 7, 1, 64) and res.initial_conv.stride == 2
    assert len(res.blocks) == 8
    assert [b.proj is not None for b in res.blocks] == [True, False] * 4
    assert [b.convs[1].stride for b in res.blocks] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert all(float(jnp.abs(b.bns[2].scale).max()) == 0.0 for b in res.blocks)  # last BN of a block: scale 0
    w = res.initial_conv.weight
    assert float(jnp.abs(w).max()) <= 2.0 / 7.0 + 1e-6  # truncated at 2 std, std 1/sqrt(49)
    draws = truncated_normal(jr.PRNGKey(1), (20000,), 0.02)  # the label table's initialiser
    assert float(jnp.abs(draws).max()) <= 0.04 + 1e-7
    np.testing.assert_allclose(float(jnp.std(draws)), 0.02 * 0.8796, rtol=0.03)


@pytest.mark.parametrize("size", [28, 105])
def test_resnet_any_image_size(size):
    cfg = tiny(num_layers=1)
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = make_batch(cfg, b=1, length=2, size=size)
    logits, _ = jit_forward(False)(model, state, ex, lab, None)
    assert logits.shape == (1, 3, NUM_CLASSES) and bool(jnp.all(jnp.isfinite(logits)))


def test_flatten_superpixels_needs_a_4x4_map():
    cfg = tiny(emb_dim=64, num_heads=2, flatten_superpixels=True, num_layers=1)
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = make_batch(cfg, b=1, length=2, size=105)
    shape = eqx.filter_eval_shape(lambda *a: forward(*a, key=None, inference=False)[0], model, state, ex, lab)
    assert shape.shape == (1, 3, NUM_CLASSES)
    ex28, _ = make_batch(cfg, b=1, length=2, size=28)
    with pytest.raises(ModelInputError, match="flatten_superpixels"):
        eqx.filter_eval_shape(lambda *a: forward(*a, key=None, inference=False), model, state, ex28, lab)


# ---------------------------------------------------------------- keys, dropout, determinism


def test_determinism_and_dropout_keys():
    cfg = tiny(dropout_prob=0.3, positional_dropout_prob=0.2, example_dropout_prob=0.1)
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    again, _ = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    for a, b in zip(jax.tree_util.tree_leaves(model), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
    other, _ = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(1))
    assert not np.array_equal(model.embedder.label_table, other.embedder.label_table)
    ex, lab = make_batch(cfg, b=2, length=3, size=16)
    f = jit_forward(False)
    a, _ = f(model, state, ex, lab, jr.PRNGKey(5))
    b, _ = f(model, state, ex, lab, jr.PRNGKey(5))
    c, _ = f(model, state, ex, lab, jr.PRNGKey(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Example dropout stays on at inference (as the original): a key is needed there too.
    g = jit_forward(True)
    e1, _ = g(model, state, ex, lab, jr.PRNGKey(5))
    e2, _ = g(model, state, ex, lab, jr.PRNGKey(6))
    assert not np.allclose(e1, e2)
    with pytest.raises(ModelInputError, match="key"):
        forward(model, state, ex, lab, key=None, inference=True)


def test_layers_get_distinct_keys():
    model, _ = make_model(tiny(num_layers=3), NUM_CLASSES, key=jr.PRNGKey(0))
    w = model.seq_model.blocks.qkv_weight  # stacked [layers, d, 3d]
    assert w.shape[0] == 3
    assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])
    d = w.shape[1]
    assert not np.allclose(w[0, :, :d], w[0, :, d : 2 * d])  # q and k drawn independently


def test_inference_without_dropout_needs_no_key():
    cfg = tiny(dropout_prob=0.5, positional_dropout_prob=0.5)
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = make_batch(cfg, b=2, length=3, size=16)
    logits, _ = jit_forward(True)(model, state, ex, lab, None)
    assert bool(jnp.all(jnp.isfinite(logits)))
    with pytest.raises(ModelInputError, match="key"):
        forward(model, state, ex, lab, key=None, inference=False)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_one_line_errors():
    cfg = tiny()
    model, state = make_model(cfg, NUM_CLASSES, key=jr.PRNGKey(0))
    ex, lab = make_batch(cfg, b=2, length=3, size=16)
    with pytest.raises(ModelInputError, match=r"agree on \[B, L\]"):
        forward(model, state, ex[:, :2], lab, key=None, inference=True)
    with pytest.raises(ModelInputError, match="labels must be integers"):
        forward(model, state, ex, lab.astype(jnp.float32), key=None, inference=True)
    with pytest.raises(ModelInputError, match="images must be"):
        forward(model, state, ex[..., 0], lab, key=None, inference=True)
    sym = tiny(example_encoding=ExampleEncoding.EMBEDDING)
    smodel, sstate = make_model(sym, NUM_CLASSES, key=jr.PRNGKey(0))
    with pytest.raises(ModelInputError, match="integer examples"):
        forward(smodel, sstate, jnp.zeros((2, 3), jnp.float32), lab, key=None, inference=True)
    lin = tiny(example_encoding=ExampleEncoding.LINEAR)
    lmodel, lstate = make_model(lin, NUM_CLASSES, key=jr.PRNGKey(0), image_size=28)
    with pytest.raises(ModelInputError, match="image_size=16"):
        forward(lmodel, lstate, ex, lab, key=None, inference=True)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(emb_dim=15), "even"),
        (dict(num_heads=3), "num_heads"),
        (dict(dropout_prob=1.0), "dropout_prob"),
        (dict(num_layers=0), "num_layers"),
        (dict(seq_model="gru"), "seq_model"),
        (dict(example_encoding="conv"), "example_encoding"),
        (dict(emb_dim=40, flatten_superpixels=True), "flatten_superpixels"),
        (dict(resnet_blocks=(2, 2)), "resnet_blocks"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kw)


def test_config_roundtrip_and_string_enums():
    cfg = ModelConfig(seq_model="lstm", example_encoding="linear", resnet_blocks=[1, 1, 1, 1])
    assert cfg.seq_model is SeqModel.LSTM and cfg.resnet_blocks == (1, 1, 1, 1)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert math.isclose(ModelConfig().positional_max_time, 30.0)
