"""The two kernel paths (trainer/models/kernels.py): hand-written backward passes ("custom", the CPU
default) and XLA's own ops with autodiff ("xla", the default elsewhere) give the same model, the same
BatchNorm updates and the same gradients up to float32 round-off."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from trainer.models import ExampleEncoding, ModelConfig, forward, make_model
from trainer.models.kernels import ENV, KernelPathError, kernel_path, use_kernels


def _value_and_grads(path: str, cfg: ModelConfig, query_only: bool):
    model, state = make_model(cfg, 9, key=jr.PRNGKey(0), image_size=20)
    images = jr.uniform(jr.PRNGKey(1), (3, 5, 20, 20, 1))
    labels = jr.randint(jr.PRNGKey(2), (3, 5), 0, 9)

    def loss(model):
        logits, new_state = forward(model, state, images, labels, key=jr.PRNGKey(3), inference=False,
                                    query_only=query_only)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + 0.1 * jnp.mean(logits ** 2), new_state

    with use_kernels(path):  # a fresh jitted function, traced inside the block
        (value, new_state), grads = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(model)
    return value, new_state, eqx.filter(grads, eqx.is_inexact_array)


@pytest.mark.parametrize("query_only", [True, False])
def test_custom_and_xla_paths_give_the_same_gradients(query_only):
    """Whole model (ResNet with BatchNorm, max-pool and 7x7 / 3x3 convolutions, transformer with LayerNorm,
    GELU and causal attention): loss within rtol 1e-5, each gradient array within 1e-4 of its largest
    entry (float32 round-off of different summation orders), BatchNorm statistics within 1e-5."""
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
    """The switch acts: the xla path's program has XLA's reduce-window and no custom VJP, the custom one
    the reverse."""
    cfg = ModelConfig(example_encoding=ExampleEncoding.RESNET, emb_dim=16, num_layers=1, num_heads=2,
                      resnet_channels=(4, 8, 8), resnet_blocks=(1, 1, 1, 1))
    images = jr.uniform(jr.PRNGKey(1), (1, 3, 8, 8, 1))
    labels = jnp.zeros((1, 3), jnp.int32)

    def text(path):
        model, state = make_model(cfg, 9, key=jr.PRNGKey(0), image_size=8)

        def loss(m):
            return jnp.sum(forward(m, state, images, labels, key=None, inference=False)[0])

        with use_kernels(path):
            return str(eqx.filter_make_jaxpr(loss)(model)[0])

    custom, xla = text("custom"), text("xla")
    assert "reduce_window" in xla and "custom_vjp_call" not in xla
    assert "custom_vjp_call" in custom and "reduce_window" not in custom


def test_default_and_environment_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert kernel_path() == ("custom" if jax.default_backend() == "cpu" else "xla")
    monkeypatch.setenv(ENV, "xla")
    assert kernel_path() == "xla"
    with use_kernels("custom"):
        assert kernel_path() == "custom"
    assert kernel_path() == "xla"
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(KernelPathError, match="custom, xla or auto"):
        kernel_path()
