"""Small building blocks shared by the model's modules: the original's initialisers, a dense layer, dropout.

Initialisers follow Haiku (which the original uses) exactly:

- `hk.Linear` / `hk.Conv2D` default weights: truncated normal (cut at +-2 std) with std `1/sqrt(fan_in)`;
- `transformer_core.conv1` (every dense layer of the transformer and the output head):
  `hk.initializers.VarianceScaling(scale)`, i.e. fan-in truncated normal with std
  `sqrt(scale / fan_in) / 0.8796...` (the correction for the truncation);
- biases zero.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from trainer.models.kernels import custom_kernels

# Standard deviation of a unit normal truncated to [-2, 2] (scipy.stats.truncnorm.std(-2, 2)).
_TRUNCNORM_STD = 0.87962566103423978


def haiku_default_std(fan_in: int) -> float:
    """Std of Haiku's default `Linear` / `Conv2D` weight initialiser."""
    return 1.0 / math.sqrt(fan_in)


def variance_scaling_std(fan_in: int, scale: float = 1.0) -> float:
    """Std of `hk.initializers.VarianceScaling(scale)` (fan_in, truncated normal)."""
    return math.sqrt(scale / max(1.0, fan_in)) / _TRUNCNORM_STD


@functools.partial(jax.jit, static_argnums=1)
def _unit_truncated_normal(key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
    # One compiled kernel per shape (eagerly, every primitive would compile separately: slow model init).
    return jr.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def truncated_normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Array:
    """Haiku's `TruncatedNormal(std)`: a unit normal cut at +-2, times std."""
    return _unit_truncated_normal(key, tuple(int(n) for n in shape)) * jnp.float32(std)


class Dense(eqx.Module):
    """`y = x @ w + b` over the last axis of any-rank `x` (weights stored [in, out], as Haiku)."""

    weight: Float[Array, "in out"]
    bias: Float[Array, " out"] | None

    def __init__(self, in_size: int, out_size: int, *, std: float, key: PRNGKeyArray, with_bias: bool = True):
        self.weight = truncated_normal(key, (in_size, out_size), std)
        self.bias = jnp.zeros((out_size,), jnp.float32) if with_bias else None

    def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


def dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
    """`hk.dropout`: keep with probability 1 - rate and rescale; identity when rate is 0."""
    if rate == 0.0:
        return x
    if key is None:
        raise ValueError("dropout with rate > 0 needs a PRNG key: pass key=... to forward")
    keep = 1.0 - rate
    return jnp.where(jr.bernoulli(key, keep, x.shape), x / keep, 0.0)


def layer_norm_params(dim: int) -> tuple[Array, Array]:
    return jnp.ones((dim,), jnp.float32), jnp.zeros((dim,), jnp.float32)


class LayerNorm(eqx.Module):
    """`hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)`, eps 1e-5, over the last axis."""

    scale: Float[Array, " dim"]
    offset: Float[Array, " dim"]
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, dim: int, eps: float = 1e-5):
        self.scale, self.offset = layer_norm_params(dim)
        self.eps = eps

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        if not custom_kernels():
            normed, _ = _layer_norm_parts(x, self.eps)  # autodiff of the formula (the "xla" kernel path)
            return normed * self.scale + self.offset
        return layer_norm(x, self.scale, self.offset, self.eps)


def _layer_norm_parts(x: Array, eps: float) -> tuple[Array, Array]:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    inv = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)  # jnp.var's arithmetic
    return centred * inv, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, offset: Array, eps: float) -> Array:
    """(x - mean) / sqrt(var + eps) * scale + offset over the last axis, with a hand-written backward pass.

    The backward is the textbook one (two reductions over the feature axis, one elementwise pass); autodiff
    of mean and variance emits several more small operations, which dominate on a CPU at these sizes.
    """
    normed, _ = _layer_norm_parts(x, eps)
    return normed * scale + offset


def _layer_norm_fwd(x, scale, offset, eps):
    normed, inv = _layer_norm_parts(x, eps)
    return normed * scale + offset, (normed, inv, scale)


def _layer_norm_bwd(eps, res, g):
    normed, inv, scale = res
    lead = tuple(range(g.ndim - 1))
    g_normed = g * scale
    g_x = inv * (g_normed - jnp.mean(g_normed, axis=-1, keepdims=True)
                 - normed * jnp.mean(g_normed * normed, axis=-1, keepdims=True))
    return g_x, jnp.sum(g * normed, axis=lead), jnp.sum(g, axis=lead)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_op(x: Array) -> Array:
    """`gelu` on the "custom" kernel path, `jax.nn.gelu` with autodiff on the "xla" path (kernels.py)."""
    return gelu(x) if custom_kernels() else jax.nn.gelu(x)


@jax.custom_vjp
def gelu(x: Array) -> Array:
    """`jax.nn.gelu(x)` (the tanh approximation, as the original) with a backward pass that keeps only `x`.

    The derivative is recomputed from `x` in one elementwise pass; autodiff keeps several intermediate
    [tokens, 4 * dim] arrays per layer for the backward pass (which `lax.scan` over the layers would also
    stack and slice).
    """
    return jax.nn.gelu(x)


def _gelu_fwd(x):
    return jax.nn.gelu(x), x


def _gelu_bwd(x, g):
    # d/dx 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3):  0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)
    x2 = x * x
    t = jnp.tanh(jnp.float32(_GELU_C) * (x + jnp.float32(0.044715) * x2 * x))
    d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * jnp.float32(_GELU_C) * (1.0 + jnp.float32(3 * 0.044715) * x2)
    return (g * d,)


gelu.defvjp(_gelu_fwd, _gelu_bwd)
