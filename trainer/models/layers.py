"""The Haiku building blocks the original's modules use, in Equinox: initialisers, `Dense` (`hk.Linear`),
`Conv2d` (`hk.Conv2D`), `BatchNorm` (`hk.BatchNorm`), `LayerNorm` (`hk.LayerNorm`) and `dropout`. Their
arithmetic lives in `trainer.models.kernels` (hand-written kernels beside plain-JAX references).

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
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from trainer.models import kernels

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


def not_decayed() -> Any:
    """Declare a parameter that weight decay and the L2 penalty leave alone (biases, normalisation scales
    and offsets, as is usual): `trainer.state.decay_mask` reads this mark on the field that holds an array,
    so a new layer states its own rule where it is defined."""
    return eqx.field(metadata={"decayed": False})


class Dense(eqx.Module):
    """`y = x @ w + b` over the last axis of any-rank `x` (weights stored [in, out], as Haiku)."""

    weight: Float[Array, "in out"]
    bias: Float[Array, " out"] | None = not_decayed()

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


class Conv2d(eqx.Module):
    """`hk.Conv2D(with_bias=False, padding="SAME")` on channels-last images `[N, H, W, C]`; weights HWIO."""

    weight: Float[Array, "kh kw cin cout"]
    stride: int = eqx.field(static=True)

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, key: PRNGKeyArray):
        self.weight = truncated_normal(key, (kernel, kernel, cin, cout), haiku_default_std(kernel * kernel * cin))
        self.stride = stride

    def __call__(self, x: Float[Array, "n h w cin"]) -> Float[Array, "n h2 w2 cout"]:
        return kernels.conv2d(x, self.weight, self.stride)


class BatchNorm(eqx.Module):
    """`hk.BatchNorm(create_scale=True, create_offset=True, decay_rate, eps)` on channels-last inputs.

    In training it normalises with the statistics of ALL inputs of the batch (every axis but the channels),
    with the biased variance E[x^2] - E[x]^2, and updates a zero-debiased exponential moving average
    (hidden state starting at zero; the average after n updates is hidden / (1 - decay^n)); at inference
    it normalises with that average. This is NOT `eqx.nn.BatchNorm(mode="batch")`, which debiases the same
    way but starts the variance's hidden state at ONE (so its running variance is off by decay^n /
    (1 - decay^n) for the first ~50 steps) and is channels-first (it would need transposes around every call).
    """

    scale: Float[Array, " c"] = not_decayed()
    offset: Float[Array, " c"] = not_decayed()
    stats: eqx.nn.StateIndex  # (counter int32[], hidden_mean f32[c], hidden_var f32[c])
    inference: bool
    decay: float = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        *,
        decay: float = 0.9,
        eps: float = 1e-5,
        zero_scale: bool = False,
        inference: bool = False,
    ):
        init = jnp.zeros if zero_scale else jnp.ones
        self.scale = init((channels,), jnp.float32)
        self.offset = jnp.zeros((channels,), jnp.float32)
        zeros = jnp.zeros((channels,), jnp.float32)
        self.stats = eqx.nn.StateIndex((jnp.array(0, jnp.int32), zeros, zeros))
        self.inference = inference
        self.decay = decay
        self.eps = eps

    def running_stats(self, state: eqx.nn.State) -> tuple[Array, Array]:
        """The debiased moving averages (mean, var) used at inference (0 and 1 before any update)."""
        counter, hidden_mean, hidden_var = state.get(self.stats)
        debias = 1.0 - jnp.power(jnp.float32(self.decay), counter.astype(jnp.float32))
        seen = counter > 0
        mean = jnp.where(seen, hidden_mean / jnp.where(seen, debias, 1.0), 0.0)
        var = jnp.where(seen, hidden_var / jnp.where(seen, debias, 1.0), 1.0)
        return mean, var

    def __call__(self, x: Float[Array, "n ... c"], state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
        """Normalise `x` (all axes but the last are the batch); in training, update the moving averages."""
        if self.inference:
            mean, var = self.running_stats(state)
            inv = self.scale * jax.lax.rsqrt(var + self.eps)
            return (x - mean) * inv + self.offset, state
        y, mean, var = kernels.batch_norm(x, self.scale, self.offset, self.eps)
        counter, hidden_mean, hidden_var = state.get(self.stats)
        d = self.decay
        new = (
            counter + 1,
            hidden_mean * d + jax.lax.stop_gradient(mean) * (1.0 - d),
            hidden_var * d + jax.lax.stop_gradient(var) * (1.0 - d),
        )
        return y, state.set(self.stats, new)


class LayerNorm(eqx.Module):
    """`hk.LayerNorm(axis=-1, create_scale=True, create_offset=True)`, eps 1e-5, over the last axis."""

    scale: Float[Array, " dim"] = not_decayed()
    offset: Float[Array, " dim"] = not_decayed()
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, dim: int, eps: float = 1e-5):
        self.scale = jnp.ones((dim,), jnp.float32)
        self.offset = jnp.zeros((dim,), jnp.float32)
        self.eps = eps

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        return kernels.layer_norm(x, self.scale, self.offset, self.eps)
