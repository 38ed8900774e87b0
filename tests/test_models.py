"""Tests of trainer.models: shapes, token order, causality, BatchNorm semantics, parameter count, keys.

Tiny configs (2 layers, 16-28 px images) keep this file fast; the full-size parameter count is computed
with `eqx.filter_eval_shape` (no arrays allocated). The hand-written kernels are tested against their
references in tests/test_kernels.py.
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

from seqgen.configio import ConfigError
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
from trainer.config import TrainConfig
from trainer.models.kernels import use_layer_loop
from trainer.models.layers import truncated_normal
from trainer.models.transformer import Transformer
from trainer.run import RunDir

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


def _grads_close(ours, ref, rtol=1e-5):
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))


@pytest.mark.parametrize("loop", ["unroll", "scan"])
@pytest.mark.parametrize("layers", [1, 3])
def test_query_only_transformer_is_the_last_row(loop, layers):
    """query_only runs the last block for the query token alone: same logits and gradients as the full
    output's last row (with either layer loop, `kernels.use_layer_loop`)."""
    tr = eqx.nn.inference_mode(Transformer(16, 7, layers, 2, key=jr.PRNGKey(0)))
    x = jr.normal(jr.PRNGKey(1), (5, 16))

    def grads(query_only):
        def f(m, x):
            out = m(x, key=None, query_only=query_only)
            return jnp.sum(jnp.sin(out[-1]))
        return eqx.filter_grad(f)(tr, x)

    with use_layer_loop(loop):
        query = tr(x, key=None, query_only=True)
        assert query.shape == (1, 7)
        np.testing.assert_allclose(query, tr(x, key=None)[-1:], rtol=1e-5, atol=1e-6)
        _grads_close(eqx.filter(grads(True), eqx.is_array), eqx.filter(grads(False), eqx.is_array))


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


def test_every_committed_run_config_loads_without_a_compatibility_path():
    """The committed results were migrated once (the retired `unroll_layers` dropped): each config.json under
    results/ loads as it is, and the old option is now an unknown option like any other."""
    from pathlib import Path

    from trainer.config import train_config_from_toml

    configs = sorted(Path(__file__).resolve().parents[1].glob("results/**/runs/**/config.json"))
    assert len(configs) > 100
    for path in configs:
        assert isinstance(RunDir(path.parent).train_config(), TrainConfig), path
    with pytest.raises(ConfigError, match="unknown option 'model.unroll_layers'"):
        ModelConfig.from_dict({"unroll_layers": True})
    with pytest.raises(ConfigError, match="unknown option 'trainer.model.unroll_layers'"):
        train_config_from_toml({"trainer": {"model": {"unroll_layers": False}}})
