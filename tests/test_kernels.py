"""trainer/models/kernels.py: each hand-written kernel against its plain-JAX reference (values and
gradients, small shapes), the whole model with the references swapped in, and the two speed switches
(kernel path, layer loop).

Tolerances: a kernel that sums in another order than its reference agrees within float32 round-off,
checked as rtol 1e-5 plus an absolute 1e-5 of the largest reference entry (`_close`); kernels that
compute the same sums are checked bitwise, and say so.
"""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from trainer.models import ExampleEncoding, ModelConfig, Transformer, forward, make_model
from trainer.models import kernels as K
from trainer.models.kernels import KernelPathError


def _close(ours, ref, rtol=1e-5):
    """Every leaf of `ours` within rtol (relative, and absolute of the largest |ref| entry) of `ref`."""
    leaves_o, leaves_r = jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)
    assert len(leaves_o) == len(leaves_r) > 0
    for a, b in zip(leaves_o, leaves_r):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))


# ---------------------------------------------------------------- convolution


@pytest.mark.parametrize("shape,k,stride", [((3, 28, 28, 1), 7, 2), ((4, 7, 7, 4), 3, 1), ((2, 7, 7, 8), 3, 2),
                                             ((2, 4, 4, 8), 3, 2), ((1, 5, 6, 3), 3, 2), ((2, 9, 9, 2), 7, 2)])
def test_conv2d_kernel_matches_reference(shape, k, stride):
    x = jr.normal(jr.PRNGKey(0), shape)
    w = jr.normal(jr.PRNGKey(1), (k, k, shape[-1], 5))
    ref = K.conv2d_reference(x, w, stride)
    np.testing.assert_array_equal(K.conv2d_kernel(x, w, stride), ref)  # not differentiated: the reference itself
    # Under differentiation the forward is a patches matmul: the same sums in another order.
    _close(jax.vjp(lambda x, w: K.conv2d_kernel(x, w, stride), x, w)[0], ref)
    ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(K.conv2d_kernel(x, w, stride))), (0, 1))(x, w)
    _close(ours, jax.grad(lambda x, w: jnp.sum(jnp.sin(K.conv2d_reference(x, w, stride))), (0, 1))(x, w))


@pytest.mark.parametrize("path", K.PATHS)
@pytest.mark.parametrize("size,stride", [(7, 1), (7, 2), (8, 2)])
def test_1x1_conv2d_is_the_convolution(path, size, stride):
    """Both paths run a 1x1 convolution as a strided slice and a matmul: the convolution's values and
    gradients within round-off."""
    x = jr.normal(jr.PRNGKey(0), (2, size, size, 6))
    w = jr.normal(jr.PRNGKey(1), (1, 1, 6, 4))
    with K.use_kernels(path):
        _close(K.conv2d(x, w, stride), K.conv2d_reference(x, w, stride))
        ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(K.conv2d(x, w, stride))), (0, 1))(x, w)
    _close(ours, jax.grad(lambda x, w: jnp.sum(jnp.sin(K.conv2d_reference(x, w, stride))), (0, 1))(x, w))


# ---------------------------------------------------------------- BatchNorm


def test_batch_norm_kernel_matches_reference():
    x = jr.normal(jr.PRNGKey(0), (6, 5, 5, 4)) * jnp.array([1.0, 2.0, 0.5, 3.0]) + jnp.array([0.5, -1.0, 2.0, 0.0])
    scale, offset = jr.normal(jr.PRNGKey(1), (4,)), jr.normal(jr.PRNGKey(2), (4,))
    for a, b in zip(K.batch_norm_kernel(x, scale, offset, 1e-5), K.batch_norm_reference(x, scale, offset, 1e-5)):
        np.testing.assert_array_equal(a, b)  # not differentiated: the reference itself
    flat = np.asarray(x, np.float64).reshape(-1, 4)  # the reference is hk.BatchNorm's: all positions, biased var
    _, mean, var = K.batch_norm_reference(x, scale, offset, 1e-5)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, flat.var(0), rtol=1e-4)
    # cotangents for all three outputs (the model stops gradients at mean and var, the function does not)
    cts = (jr.normal(jr.PRNGKey(3), x.shape), jr.normal(jr.PRNGKey(4), (4,)), jr.normal(jr.PRNGKey(5), (4,)))
    only_y = (cts[0], jnp.zeros(4), jnp.zeros(4))
    for ct in (cts, only_y):
        ours = jax.vjp(lambda *a: K.batch_norm_kernel(*a, 1e-5), x, scale, offset)[1](ct)
        _close(ours, jax.vjp(lambda *a: K.batch_norm_reference(*a, 1e-5), x, scale, offset)[1](ct), rtol=2e-5)


# ---------------------------------------------------------------- ReLU + max-pool


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (7, 7), (14, 14), (27, 27), (53, 53)])
def test_separable_max_pool_is_reduce_window(h, w):
    """Bitwise: a max is a max, whichever order the window is read in."""
    x = jr.normal(jr.PRNGKey(h * 100 + w), (h, w, 3))
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (3, 3, 1), (2, 2, 1), "SAME")
    np.testing.assert_array_equal(K.max_pool_3x3_s2(x), ref)


@pytest.mark.parametrize("h,w", [(2, 3), (7, 7), (14, 14), (27, 27)])
def test_relu_max_pool_kernel_matches_reference(h, w):
    x = jr.normal(jr.PRNGKey(h + w), (2, h, w, 3))
    ref = K.relu_max_pool_reference(x)
    np.testing.assert_array_equal(K.relu_max_pool_kernel(x), ref)
    g = jr.normal(jr.PRNGKey(7), ref.shape)
    # continuous inputs: no ties among positive maxima, so select-and-scatter routes as the kernel does
    _close(jax.vjp(K.relu_max_pool_kernel, x)[1](g), jax.vjp(K.relu_max_pool_reference, x)[1](g))
    # Integer-valued inputs: ties inside windows and exact zeros exercise the tie-splitting rules, which are
    # autodiff's of the separable max-pool (reduce_window's gradient gives a tie to one input): bitwise.
    xi = jnp.round(x * 2)
    ours = jax.vjp(K.relu_max_pool_kernel, xi)[1](g)[0]
    np.testing.assert_array_equal(ours, jax.vjp(lambda v: K.max_pool_3x3_s2(jax.nn.relu(v)), xi)[1](g)[0])


# ---------------------------------------------------------------- LayerNorm


def test_layer_norm_kernel_matches_reference():
    x = jr.normal(jr.PRNGKey(0), (4, 5, 16)) * 3 + 1
    scale, offset = jr.normal(jr.PRNGKey(1), (16,)), jr.normal(jr.PRNGKey(2), (16,))

    def haiku(x, scale, offset):  # hk.LayerNorm's arithmetic (jnp.var)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + 1e-5) * scale + offset

    ref = K.layer_norm_reference(x, scale, offset, 1e-5)
    np.testing.assert_allclose(ref, haiku(x, scale, offset), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(K.layer_norm_kernel(x, scale, offset, 1e-5), ref)
    g = jr.normal(jr.PRNGKey(3), x.shape)
    want = jax.vjp(lambda *a: K.layer_norm_reference(*a, 1e-5), x, scale, offset)[1](g)
    _close(jax.vjp(lambda *a: K.layer_norm_kernel(*a, 1e-5), x, scale, offset)[1](g), want)
    _close(want, jax.vjp(haiku, x, scale, offset)[1](g))
    # under vmap (as the model calls it), parameter cotangents are summed over the batch
    batched = jax.vjp(lambda x, s, o: jax.vmap(lambda r: K.layer_norm_kernel(r, s, o, 1e-5))(x), x, scale, offset)
    _close(batched[1](g), want)


# ---------------------------------------------------------------- causal attention


def test_causal_attention_kernel_matches_reference():
    q, k, v = (jr.normal(jr.PRNGKey(i), (7, 3, 4)) for i in range(3))

    def library(q, k, v):  # jax's own causal attention
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    _close(K.causal_attention_reference(q, k, v), library(q, k, v))
    np.testing.assert_allclose(K.causal_attention_kernel(q, k, v), library(q, k, v), rtol=1e-5, atol=1e-6)
    g = jr.normal(jr.PRNGKey(5), q.shape)
    _close(jax.vjp(K.causal_attention_kernel, q, k, v)[1](g), jax.vjp(K.causal_attention_reference, q, k, v)[1](g))
    g = jr.normal(jr.PRNGKey(6), (2, *q.shape))  # batched, as in the model
    args = [jnp.stack([a, a * 0.5]) for a in (q, k, v)]
    _close(jax.vjp(jax.vmap(K.causal_attention_kernel), *args)[1](g),
           jax.vjp(jax.vmap(K.causal_attention_reference), *args)[1](g))
    out, weights = K.attention_with_weights(q, k, v)  # the analysis path: the kernel's forward, with weights
    np.testing.assert_array_equal(out, K.causal_attention_kernel(q, k, v))
    np.testing.assert_allclose(jnp.sum(weights, -1), 1.0, rtol=1e-6)
    assert float(jnp.abs(jnp.triu(weights, 1)).max()) == 0.0  # causal: no weight on later tokens


@pytest.mark.parametrize("tq", [1, 3])
def test_causal_attention_of_the_last_queries_only(tq):
    """q holding only the last tq tokens' queries gives those rows of the full causal attention."""
    q, k, v = (jr.normal(jr.PRNGKey(i), (7, 3, 4)) for i in range(3))
    full = K.causal_attention_kernel(q, k, v)
    np.testing.assert_allclose(K.causal_attention_kernel(q[-tq:], k, v), full[-tq:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(K.causal_attention_reference(q[-tq:], k, v), full[-tq:], rtol=1e-5, atol=1e-6)
    g = jr.normal(jr.PRNGKey(5), (tq, 3, 4))
    ours = jax.vjp(lambda q, k, v: K.causal_attention_kernel(q[-tq:], k, v), q, k, v)[1](g)
    ref = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)[-tq:], q, k, v)[1](g)
    _close(ours, ref)


# ---------------------------------------------------------------- the whole model, references swapped in

KERNELS = {"conv2d_kernel", "batch_norm_kernel", "relu_max_pool_kernel", "layer_norm_kernel",
           "causal_attention_kernel"}


def _value_and_grads(path: str, cfg: ModelConfig, query_only: bool):
    model, state = make_model(cfg, 9, key=jr.PRNGKey(0), image_size=20)
    images = jr.uniform(jr.PRNGKey(1), (3, 5, 20, 20, 1))
    labels = jr.randint(jr.PRNGKey(2), (3, 5), 0, 9)

    def loss(model):
        logits, new_state = forward(model, state, images, labels, key=jr.PRNGKey(3), inference=False,
                                    query_only=query_only)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + 0.1 * jnp.mean(logits ** 2), new_state

    with K.use_kernels(path):  # a fresh jitted function, traced inside the block
        (value, new_state), grads = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(model)
    return value, new_state, eqx.filter(grads, eqx.is_inexact_array)


@pytest.mark.parametrize("query_only", [True, False])
def test_custom_and_xla_paths_give_the_same_gradients(query_only):
    """Whole model (ResNet with BatchNorm, max-pool and 7x7 / 3x3 convolutions, transformer with LayerNorm,
    GELU and causal attention), hand-written kernels vs references: loss within rtol 1e-5, each gradient
    array within 1e-4 of its largest entry (float32 round-off of different summation orders), BatchNorm
    statistics within 1e-5."""
    cfg = ModelConfig(example_encoding=ExampleEncoding.RESNET, emb_dim=16, num_layers=2, num_heads=2,
                      resnet_channels=(4, 8, 8), resnet_blocks=(1, 1, 1, 1), dropout_prob=0.1)
    v_c, s_c, g_c = _value_and_grads("custom", cfg, query_only)
    v_x, s_x, g_x = _value_and_grads("xla", cfg, query_only)
    np.testing.assert_allclose(v_c, v_x, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s_c), jax.tree_util.tree_leaves(s_x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    leaves_c, leaves_x = jax.tree_util.tree_leaves(g_c), jax.tree_util.tree_leaves(g_x)
    assert len(leaves_c) == len(leaves_x) > 20
    for a, b in zip(leaves_c, leaves_x):
        scale = float(np.max(np.abs(b)))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale + 1e-9)
    assert any(float(np.max(np.abs(b))) > 1e-3 for b in leaves_x)  # the gradients are not all ~0


def test_the_paths_trace_different_programs():
    """The switch acts: the custom path's program calls every hand-written kernel, the xla path's none
    (it has XLA's convolution instead)."""
    cfg = ModelConfig(example_encoding=ExampleEncoding.RESNET, emb_dim=16, num_layers=1, num_heads=2,
                      resnet_channels=(4, 8, 8), resnet_blocks=(1, 1, 1, 1))
    images = jr.uniform(jr.PRNGKey(1), (1, 3, 8, 8, 1))
    labels = jnp.zeros((1, 3), jnp.int32)

    def text(path):
        model, state = make_model(cfg, 9, key=jr.PRNGKey(0), image_size=8)

        def loss(m):
            return jnp.sum(forward(m, state, images, labels, key=None, inference=False)[0])

        with K.use_kernels(path):
            return str(eqx.filter_make_jaxpr(loss)(model)[0])

    custom, xla = text("custom"), text("xla")
    assert set(re.findall(r"custom_vjp_call\[\s*name=(\w+)", custom)) == KERNELS
    assert "custom_vjp_call" not in xla and "conv_general_dilated" in xla
    assert "reduce_window" not in custom  # (its printout holds the convolution: each kernel's undifferentiated body)


@pytest.mark.parametrize("path", ["custom", "xla"])
def test_no_path_differentiates_into_an_op_without_a_deterministic_gpu_kernel(path):
    """XLA's GPU backend has no deterministic select-and-scatter (the gradient of `lax.reduce_window`'s
    max-pool): with `--xla_gpu_deterministic_ops`, on by default, a program holding one does not compile
    on a GPU. Neither path's training gradient may hold one."""
    cfg = ModelConfig(example_encoding=ExampleEncoding.RESNET, emb_dim=16, num_layers=1, num_heads=2,
                      resnet_channels=(4, 8, 8), resnet_blocks=(1, 1, 1, 1))
    images = jr.uniform(jr.PRNGKey(1), (1, 3, 8, 8, 1))
    labels = jnp.zeros((1, 3), jnp.int32)
    model, state = make_model(cfg, 9, key=jr.PRNGKey(0), image_size=8)

    def loss(m):
        return jnp.sum(forward(m, state, images, labels, key=None, inference=False)[0])

    with K.use_kernels(path):
        hlo = eqx.filter_jit(eqx.filter_grad(loss)).lower(model).as_text()
    assert "select_and_scatter" not in hlo
    # the oracle the xla path no longer uses does hold one: the check can fail
    ref = jax.jit(jax.grad(lambda x: jnp.sum(K.relu_max_pool_reference(x)))).lower(images[0]).as_text()
    assert "select_and_scatter" in ref


# ---------------------------------------------------------------- the speed switches


def test_kernel_path_default_and_environment_override(monkeypatch):
    monkeypatch.delenv(K.ENV, raising=False)
    assert K.kernel_path() == ("custom" if jax.default_backend() == "cpu" else "xla")
    monkeypatch.setenv(K.ENV, "xla")
    assert K.kernel_path() == "xla"
    with K.use_kernels("custom"):
        assert K.kernel_path() == "custom" and K.custom_kernels()
    assert K.kernel_path() == "xla"
    monkeypatch.setenv(K.ENV, "fast")
    with pytest.raises(KernelPathError, match="custom, xla or auto"):
        K.kernel_path()


def test_layer_loop_default_and_environment_override(monkeypatch):
    monkeypatch.delenv(K.LAYERS_ENV, raising=False)
    assert K.layer_loop() == "unroll"
    monkeypatch.setenv(K.LAYERS_ENV, "scan")
    assert K.layer_loop() == "scan"
    with K.use_layer_loop("unroll"):
        assert K.layer_loop() == "unroll"
    assert K.layer_loop() == "scan"
    with pytest.raises(KernelPathError, match="unroll, scan or auto"):
        with K.use_layer_loop("loop"):
            pass
    monkeypatch.setenv(K.LAYERS_ENV, "scanned")
    with pytest.raises(KernelPathError, match="EMERGENT_ICL_LAYERS='scanned'"):
        K.layer_loop()


def test_unrolled_and_scanned_layers_agree():
    """The layer loop changes how the identical blocks run, not what they compute (dropout keys included)."""
    tr = Transformer(16, 7, 3, 2, key=jr.PRNGKey(0), dropout_prob=0.2)
    x = jr.normal(jr.PRNGKey(1), (5, 16))
    key = jr.PRNGKey(2)

    def run(loop):
        with K.use_layer_loop(loop):
            out = tr(x, key=key)
            plain = eqx.nn.inference_mode(tr)(x, key=None)
            grads = eqx.filter_grad(lambda m, x: jnp.sum(jnp.sin(m(x, key=jr.PRNGKey(3)))))(tr, x)
            program = str(jax.make_jaxpr(lambda x: tr(x, key=key))(x))
        return out, plain, eqx.filter(grads, eqx.is_array), program

    u_out, u_plain, u_grads, u_program = run("unroll")
    s_out, s_plain, s_grads, s_program = run("scan")
    np.testing.assert_allclose(u_out, s_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_plain, s_plain, rtol=1e-5, atol=1e-6)
    assert not np.allclose(u_out, u_plain, atol=1e-3)  # dropout acts
    _close(u_grads, s_grads)
    assert "scan[" in s_program and "scan[" not in u_program  # the switch acts
