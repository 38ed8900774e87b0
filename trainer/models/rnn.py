"""The original's recurrent baselines (`modules/rnn.py`, the paper's Fig. 7): a stack of LSTM or vanilla
RNN layers (`hk.DeepRNN`, no skip connections, zero initial state) and a linear head. No final LayerNorm
and no dropout (the original's RNN tower accepts `dropout_prob` and ignores it).

Cells are Haiku's:

- `hk.LSTM(h)`: one linear layer with bias on `[x_t, h_{t-1}]` -> gates in the order (i, g, f, o);
  `f = sigmoid(f + 1)` (forget bias), `c_t = f c_{t-1} + sigmoid(i) tanh(g)`, `h_t = sigmoid(o) tanh(c_t)`;
- `hk.VanillaRNN(h)`: `h_t = relu(W_i x_t + b_i + W_h h_{t-1} + b_h)` (two biases).

Weights use Haiku's default initialiser (truncated normal, std 1/sqrt(fan_in); for the LSTM the fan-in is
`in + h`); the head is `VarianceScaling(dense_init_scale)`. The stack is run layer by layer over the whole
sequence (each layer a `lax.scan` over time), which computes exactly what the original's step-by-step
unroll of the deep core computes, with the input projections batched over time.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from trainer.models.config import SeqModel
from trainer.models.layers import Dense, haiku_default_std, not_decayed, truncated_normal, variance_scaling_std


class LSTMLayer(eqx.Module):
    weight: Float[Array, "in_plus_h 4h"]  # rows: input features then hidden features
    bias: Float[Array, " 4h"] = not_decayed()
    in_size: int = eqx.field(static=True)

    def __init__(self, in_size: int, hidden: int, *, key: PRNGKeyArray):
        fan_in = in_size + hidden
        self.weight = truncated_normal(key, (fan_in, 4 * hidden), haiku_default_std(fan_in))
        self.bias = jnp.zeros((4 * hidden,), jnp.float32)
        self.in_size = in_size

    def __call__(self, xs: Float[Array, "t in"]) -> Float[Array, "t h"]:
        w_x, w_h = self.weight[: self.in_size], self.weight[self.in_size :]
        hidden = w_h.shape[0]
        gx = xs @ w_x + self.bias

        def step(carry, g_in):
            h, c = carry
            i, g, f, o = jnp.split(g_in + h @ w_h, 4)
            c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((hidden,), xs.dtype)
        _, hs = jax.lax.scan(step, (zeros, zeros), gx)
        return hs


class VanillaRNNLayer(eqx.Module):
    input_to_hidden: Dense
    hidden_to_hidden: Dense

    def __init__(self, in_size: int, hidden: int, *, key: PRNGKeyArray):
        k_i, k_h = jr.split(key)
        self.input_to_hidden = Dense(in_size, hidden, std=haiku_default_std(in_size), key=k_i)
        self.hidden_to_hidden = Dense(hidden, hidden, std=haiku_default_std(hidden), key=k_h)

    def __call__(self, xs: Float[Array, "t in"]) -> Float[Array, "t h"]:
        gx = self.input_to_hidden(xs)
        hidden = gx.shape[-1]

        def step(h, g_in):
            h = jax.nn.relu(g_in + self.hidden_to_hidden(h))
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros((hidden,), xs.dtype), gx)
        return hs


class RNN(eqx.Module):
    layers: tuple[LSTMLayer | VanillaRNNLayer, ...]
    head: Dense

    def __init__(
        self,
        kind: SeqModel,
        dim: int,
        num_classes: int,
        num_layers: int,
        hidden_size: int,
        *,
        dense_init_scale: float = 1.0,
        key: PRNGKeyArray,
    ):
        if kind is SeqModel.TRANSFORMER:
            raise ValueError("RNN needs seq_model lstm or vanilla_rnn")
        cell = LSTMLayer if kind is SeqModel.LSTM else VanillaRNNLayer
        keys = jr.split(key, num_layers + 1)
        sizes = [dim] + [hidden_size] * num_layers
        self.layers = tuple(cell(sizes[i], hidden_size, key=keys[i]) for i in range(num_layers))
        self.head = Dense(hidden_size, num_classes, std=variance_scaling_std(hidden_size, dense_init_scale), key=keys[-1])

    def __call__(self, x: Float[Array, "t d"], *, key: PRNGKeyArray | None = None,
                 query_only: bool = False) -> Float[Array, "t c"]:
        del key  # no dropout in the original's RNN tower
        for layer in self.layers:
            x = layer(x)
        return self.head(x[-1:] if query_only else x)
