"""The original's example encoder: a small ResNet v1 with bottleneck blocks (`modules/resnet.py`).

`SimpleResNet` maps a batch of images `[N, H, W, C]` (channels last) to vectors `[N, E]`:

    7x7/2 conv (64 ch, no bias) -> BatchNorm -> ReLU -> 3x3/2 max-pool (SAME)
    -> 4 groups of bottleneck blocks (default 2 blocks each, widths (16, 32, 32, emb_dim),
       strides (1, 2, 2, 2), a projection shortcut on each group's first block)
    -> mean over space (or flatten, with `flatten_superpixels`)

Every convolution is bias-free with 'SAME' padding and Haiku's default initialiser; the last BatchNorm of
each block starts with scale 0. Works at any image size (105 px, or 28 px when downsampled).

The ResNet runs on the flat batch of all B*L images (the caller reshapes, as the original's
`hk.BatchApply`), not per image under `vmap`: BatchNorm couples the images anyway, and on the flat batch
its backward pass and the convolutions' patch matmuls can be written out (below), which halves the
first stage's cost on a CPU.

`BatchNorm` reproduces `hk.BatchNorm` exactly (it is NOT `eqx.nn.BatchNorm`, see below): channels-last;
in training it normalises with the statistics of ALL images of the batch (every axis but the channels),
with the biased variance E[x^2] - E[x]^2, and updates a zero-debiased exponential moving average (decay 0.9,
hidden state starting at zero; the average after n updates is hidden / (1 - decay^n)); at inference it
normalises with that average. `eqx.nn.BatchNorm(mode="batch")` debiases the same way but starts the
variance's hidden state at ONE (so its running variance is off by decay^n / (1 - decay^n) for the first
~50 steps) and is channels-first, so it would need transposes around every call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from trainer.models.kernels import custom_kernels
from trainer.models.layers import haiku_default_std, truncated_normal

class BatchNorm(eqx.Module):
    """`hk.BatchNorm(create_scale=True, create_offset=True, decay_rate, eps)` on channels-last inputs."""

    scale: Float[Array, " c"]
    offset: Float[Array, " c"]
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
        if custom_kernels():
            y, mean, var = batch_norm_train(x, self.scale, self.offset, self.eps)
        else:  # autodiff of the formula (the "xla" kernel path, trainer/models/kernels.py)
            mean, var, inv = _batch_stats(x, self.eps)
            y = (x - mean) * (self.scale * inv) + self.offset
        counter, hidden_mean, hidden_var = state.get(self.stats)
        d = self.decay
        new = (
            counter + 1,
            hidden_mean * d + jax.lax.stop_gradient(mean) * (1.0 - d),
            hidden_var * d + jax.lax.stop_gradient(var) * (1.0 - d),
        )
        return y, state.set(self.stats, new)


def _batch_stats(x: Array, eps: float) -> tuple[Array, Array, Array]:
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x), axis=axes) - jnp.square(mean)  # hk.BatchNorm's E[x^2] - E[x]^2
    return mean, var, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Float[Array, "n ... c"], scale: Array, offset: Array, eps: float) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm over every axis but the last: `((x - mean) * rsqrt(var + eps) * scale + offset,
    mean, var)`, with a hand-written backward pass.

    The backward is two reductions (sum g, sum g * x) and one elementwise pass `dx = a g + c1 x + c0` with
    per-channel constants (cotangents reaching `mean` and `var` directly are included); autodiff of the
    statistics emits several more passes over the activations. Tested against autodiff of the formula.
    """
    mean, var, inv = _batch_stats(x, eps)
    return (x - mean) * (scale * inv) + offset, mean, var


def _batch_norm_fwd(x, scale, offset, eps):
    mean, var, inv = _batch_stats(x, eps)
    return ((x - mean) * (scale * inv) + offset, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(eps, res, cts):
    x, mean, inv, scale = res
    g, g_mean, g_var = cts
    axes = tuple(range(x.ndim - 1))
    m = x.size // x.shape[-1]
    g_sum = jnp.sum(g, axis=axes)
    g_scale = (jnp.sum(g * x, axis=axes) - mean * g_sum) * inv  # sum of g * normalised x
    a = scale * inv
    # y = a (x - mean) + offset, mean = E[x], var = E[x^2] - mean^2, a = scale * inv, inv = (var + eps)^-1/2:
    # dx_i = a g_i + (g_mean - a g_sum) / m + (x_i - mean) (2 g_var - a inv g_scale) / m  =  a g_i + c1 x_i + c0
    c1 = (2.0 * g_var - a * inv * g_scale) / m
    c0 = (g_mean - a * g_sum) / m - c1 * mean
    return x * c1 + (g * a + c0), g_scale, g_sum


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class Conv2d(eqx.Module):
    """`hk.Conv2D(with_bias=False, padding="SAME")` on channels-last images `[N, H, W, C]`; weights HWIO."""

    weight: Float[Array, "kh kw cin cout"]
    stride: int = eqx.field(static=True)

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, key: PRNGKeyArray):
        self.weight = truncated_normal(key, (kernel, kernel, cin, cout), haiku_default_std(kernel * kernel * cin))
        self.stride = stride

    def __call__(self, x: Float[Array, "n h w cin"]) -> Float[Array, "n h2 w2 cout"]:
        s = self.stride
        if self.weight.shape[:2] == (1, 1):
            # A 1x1 'SAME' convolution with stride s reads pixels 0, s, 2s, ...: a strided slice and a matmul
            # (the same arithmetic as the convolution; faster on CPU).
            return x[:, ::s, ::s] @ self.weight[0, 0]
        return conv_same(x, self.weight, s) if custom_kernels() else _conv(x, self.weight, s)


_NHWC = ("NHWC", "HWIO", "NHWC")
_HIGHEST = jax.lax.Precision.HIGHEST


def _conv(x: Array, w: Array, stride: int) -> Array:
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x: Float[Array, "n h w cin"], w: Float[Array, "kh kw cin cout"], stride: int) -> Array:
    """`lax.conv_general_dilated(x, w, stride, "SAME")` (NHWC, HWIO) with an explicit backward pass.

    When differentiated, the forward value is one matmul of the flattened kernel with the transposed image
    patches `[kh*kw*cin, n*h2*w2]` (then transposed to NHWC), and the weight cotangent one matmul of the
    same patches, kept from the forward pass, with the output cotangent: both in the layout each matmul
    wants, so XLA adds no transposes of the large patch array. The input cotangent is the patch
    cotangents `g @ w^T` added back tap by tap. The matmuls sum in another order than the convolution, so
    training and inference outputs agree up to float round-off (tested).
    """
    return _conv(x, w, stride)


def _conv_same_fwd(x, w, stride):
    kh, kw, cin, cout = w.shape
    pt = _patches(x, kh, kw, stride)  # [kh*kw*cin, n, h2, w2]
    # y^T = w^T pt: a plain matmul on the transposed patches, which the weight gradient reuses.
    y_t = jnp.dot(w.reshape(-1, cout).T, pt.reshape(pt.shape[0], -1), precision=_HIGHEST)
    return y_t.T.reshape(*pt.shape[1:], cout), (x, w, pt)


def _conv_same_bwd(stride, res, g):
    x, w, pt = res
    kh, kw, cin, cout = w.shape
    g_x = _input_cotangent(g, w, x.shape, stride)
    g_w = jnp.dot(pt.reshape(pt.shape[0], -1), g.reshape(-1, cout), precision=_HIGHEST)
    return g_x, g_w.reshape(kh, kw, cin, cout)


def _same_geometry(h: int, w: int, kh: int, kw: int, stride: int) -> tuple[int, int, int, int]:
    """'SAME' convolution geometry: output height and width, and the total padding along each axis (the
    smaller half goes in front, as in XLA)."""
    ho, wo = -(-h // stride), -(-w // stride)
    return ho, wo, max((ho - 1) * stride + kh - h, 0), max((wo - 1) * stride + kw - w, 0)


def _input_cotangent(g: Array, w: Array, x_shape: tuple[int, ...], stride: int) -> Array:
    """The convolution's input cotangent: the patch cotangents `g @ w^T` added back onto the (padded) input
    grid, one strided shifted copy per kernel tap (the adjoint of cutting the patches)."""
    kh, kw, cin, cout = w.shape
    n, h, wd, _ = x_shape
    ho, wo, ph, pw = _same_geometry(h, wd, kh, kw, stride)
    hp, wp = h + ph, wd + pw
    g_p = jnp.dot(g.reshape(-1, cout), w.reshape(-1, cout).T, precision=_HIGHEST).reshape(n, ho, wo, kh, kw, cin)
    zero = jnp.zeros((), g.dtype)
    span_h, span_w = (ho - 1) * stride + 1, (wo - 1) * stride + 1
    total = None
    for a in range(kh):
        for b in range(kw):
            tap = jax.lax.pad(g_p[:, :, :, a, b, :], zero, ((0, 0, 0), (a, hp - a - span_h, stride - 1),
                                                           (b, wp - b - span_w, stride - 1), (0, 0, 0)))
            total = tap if total is None else total + tap
    return total[:, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + wd, :]


def _patches(x: Array, kh: int, kw: int, stride: int) -> Array:
    """Transposed image patches: [(a * kw + b) * cin + c, n, i, j] = x_padded[n, stride * i + a, stride * j + b, c],
    the input under each output pixel's window ('SAME' padding), with the rows in HWIO weight order.

    Cut as kw column slices of the padded input (stacked to [kw, cin, n, H, wo]), then kh row slices of
    those: two stacks of a few large slices, which XLA fuses into two passes, where kh * kw small slices
    and their stack took three (and kh * kw + 1 operations).
    """
    n, h, w, cin = x.shape
    ho, wo, ph, pw = _same_geometry(h, w, kh, kw, stride)
    xp = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    xp = jnp.moveaxis(xp, 3, 0)  # [cin, n, H, W]
    big_h = xp.shape[2]
    cols = jnp.stack([
        jax.lax.slice(xp, (0, 0, 0, b), (cin, n, big_h, b + stride * (wo - 1) + 1), (1, 1, 1, stride))
        for b in range(kw)
    ])
    rows = jnp.stack([
        jax.lax.slice(cols, (0, 0, 0, a, 0), (kw, cin, n, a + stride * (ho - 1) + 1, wo), (1, 1, 1, stride, 1))
        for a in range(kh)
    ])
    return rows.reshape(kh * kw * cin, n, ho, wo)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def _max3_s2_parts(x: Array, axis: int) -> tuple[Array, Array, Array, int]:
    """The three candidates of every window of 3 with stride 2 and 'SAME' padding along `axis`.

    Window i covers padded rows 2i, 2i+1, 2i+2: returns (rows 2i, rows 2i+1, rows 2i+2), each with `out`
    rows, and the number of -inf rows padded in front. Contiguous reshapes and slices only.
    """
    n = x.shape[axis]
    out = -(-n // 2)
    lo = max((out - 1) * 2 + 3 - n, 0) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (lo, 2 * (out + 1) - lo - n)  # -inf padding, to an even length 2 * (out + 1)
    xp = jnp.pad(x, pad, constant_values=-jnp.inf)
    pairs = xp.reshape(*x.shape[:axis], out + 1, 2, *x.shape[axis + 1 :])
    even = jax.lax.index_in_dim(pairs, 0, axis + 1, keepdims=False)  # rows 0, 2, 4, ...
    odd = jax.lax.index_in_dim(pairs, 1, axis + 1, keepdims=False)  # rows 1, 3, 5, ...
    a = jax.lax.slice_in_dim(even, 0, out, axis=axis)
    b = jax.lax.slice_in_dim(odd, 0, out, axis=axis)
    c = jax.lax.slice_in_dim(even, 1, out + 1, axis=axis)
    return a, b, c, lo


def _max3_s2(x: Array, axis: int) -> Array:
    """Max over windows of 3 with stride 2 and 'SAME' padding along `axis`: max(max(a, b), c)."""
    a, b, c, _ = _max3_s2_parts(x, axis)
    return jnp.maximum(jnp.maximum(a, b), c)


def _max3_s2_bwd(x: Array, g: Array, axis: int) -> Array:
    """Cotangent of `_max3_s2(x, axis)` for output cotangent `g`, bitwise what autodiff gives.

    JAX differentiates `max(u, v)` as g * [u == max] / (2 if v == max else 1) (ties split evenly); the
    weights are powers of two (exact) and each input row receives at most two terms, so the sums are the
    same as autodiff's. Written as products on the small output grid and one interleave, instead of the
    pads / selects / scatters autodiff emits for the reshapes and slices.
    """
    a, b, c, lo = _max3_s2_parts(x, axis)
    m1 = jnp.maximum(a, b)
    m = jnp.maximum(m1, c)

    def share(u, z, v):  # _balanced_eq(u, z, v) of jax.lax: 1, 1/2 on a tie, 0 when u is not the max
        return jnp.where(u == z, 1.0, 0.0) / jnp.where(v == z, 2.0, 1.0)

    g_m1 = g * share(m1, m, c)
    g_c = g * share(c, m, m1)
    g_a = g_m1 * share(a, m1, b)
    g_b = g_m1 * share(b, m1, a)
    pad_back = [(0, 0)] * x.ndim
    pad_front = [(0, 0)] * x.ndim
    pad_back[axis] = (0, 1)
    pad_front[axis] = (1, 0)
    g_even = jnp.pad(g_a, pad_back) + jnp.pad(g_c, pad_front)  # rows 2i get a_i and c_{i-1}
    g_odd = jnp.pad(g_b, pad_back)
    n = x.shape[axis]
    pairs = jnp.stack([g_even, g_odd], axis=axis + 1)
    g_x = pairs.reshape(*x.shape[:axis], 2 * pairs.shape[axis], *x.shape[axis + 1 :])
    return jax.lax.slice_in_dim(g_x, lo, lo + n, axis=axis)


def max_pool_3x3_s2(x: Float[Array, "... h w c"]) -> Float[Array, "... h2 w2 c"]:
    """`hk.max_pool(window (3, 3), strides (2, 2), padding "SAME")` over the axes h, w of one image or a
    batch (channels last): -inf padding never wins.

    Computed as two separable 1-D window maxima over reshaped pairs of rows (the same values as
    `lax.reduce_window`; its CPU gradient, select-and-scatter, is several times slower).
    """
    h_axis = x.ndim - 3
    return _max3_s2(_max3_s2(x, h_axis), h_axis + 1)


@jax.custom_vjp
def relu_max_pool_3x3_s2(x: Float[Array, "... h w c"]) -> Float[Array, "... h2 w2 c"]:
    """`max_pool_3x3_s2(relu(x))` with a hand-written backward pass (same cotangents as autodiff's).

    Autodiff of the reshape/slice max-pool costs several full passes over the (large) first-stage map;
    this backward recomputes the row maxima and routes the cotangent in two passes.
    """
    return max_pool_3x3_s2(jax.nn.relu(x))


def _relu_pool_fwd(x):
    r = jax.nn.relu(x)
    return max_pool_3x3_s2(r), r


def _relu_pool_bwd(r, g):
    h_axis = r.ndim - 3
    rows = _max3_s2(r, h_axis)
    g_r = _max3_s2_bwd(r, _max3_s2_bwd(rows, g, h_axis + 1), h_axis)
    return (jnp.where(r > 0, g_r, 0.0),)  # jax.nn.relu's derivative: 1 where x > 0, else 0


relu_max_pool_3x3_s2.defvjp(_relu_pool_fwd, _relu_pool_bwd)


def max_pool_xla(x: Float[Array, "n h w c"]) -> Float[Array, "n h2 w2 c"]:
    """`max_pool_3x3_s2` on the "xla" kernel path: `lax.reduce_window` (select-and-scatter gradient)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")


class BottleneckBlock(eqx.Module):
    """ResNet v1 bottleneck block: 1x1 -> 3x3 (strided) -> 1x1 (x4 width), BN after each, ReLU between."""

    convs: tuple[Conv2d, Conv2d, Conv2d]
    bns: tuple[BatchNorm, BatchNorm, BatchNorm]
    proj: Conv2d | None
    proj_bn: BatchNorm | None

    def __init__(self, cin: int, channels: int, stride: int, use_projection: bool, *, decay, eps, key):
        k0, k1, k2, kp = jr.split(key, 4)
        mid = channels // 4
        self.convs = (
            Conv2d(cin, mid, 1, 1, key=k0),
            Conv2d(mid, mid, 3, stride, key=k1),
            Conv2d(mid, channels, 1, 1, key=k2),
        )
        self.bns = (
            BatchNorm(mid, decay=decay, eps=eps),
            BatchNorm(mid, decay=decay, eps=eps),
            BatchNorm(channels, decay=decay, eps=eps, zero_scale=True),
        )
        if use_projection:
            self.proj = Conv2d(cin, channels, 1, stride, key=kp)
            self.proj_bn = BatchNorm(channels, decay=decay, eps=eps)
        else:
            self.proj = self.proj_bn = None

    def __call__(self, x: Array, state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
        shortcut = x
        if self.proj is not None:
            shortcut, state = self.proj_bn(self.proj(x), state)
        out = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            out, state = bn(conv(out), state)
            if i < 2:
                out = jax.nn.relu(out)
        return jax.nn.relu(out + shortcut), state


class SimpleResNet(eqx.Module):
    """The original's `SimpleResNet` (v1, bottleneck, projections on) for a batch of images `[N, H, W, C]`."""

    initial_conv: Conv2d
    initial_bn: BatchNorm
    blocks: tuple[BottleneckBlock, ...]
    flatten_superpixels: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        channels_per_group: Sequence[int],
        *,
        blocks_per_group: Sequence[int] = (2, 2, 2, 2),
        strides: Sequence[int] = (1, 2, 2, 2),
        flatten_superpixels: bool = False,
        decay: float = 0.9,
        eps: float = 1e-5,
        key: PRNGKeyArray,
    ):
        k_init, k_blocks = jr.split(key)
        self.initial_conv = Conv2d(in_channels, 64, 7, 2, key=k_init)
        self.initial_bn = BatchNorm(64, decay=decay, eps=eps)
        blocks = []
        keys = jr.split(k_blocks, sum(blocks_per_group))
        cin = 64
        for g, (n, channels, stride) in enumerate(zip(blocks_per_group, channels_per_group, strides)):
            for i in range(n):
                blocks.append(
                    BottleneckBlock(
                        cin, channels, stride if i == 0 else 1, i == 0, decay=decay, eps=eps, key=keys[len(blocks)]
                    )
                )
                cin = channels
        self.blocks = tuple(blocks)
        self.flatten_superpixels = flatten_superpixels

    def __call__(self, images: Float[Array, "n h w c"], state: eqx.nn.State) -> tuple[Array, eqx.nn.State]:
        out, state = self.initial_bn(self.initial_conv(images), state)
        out = relu_max_pool_3x3_s2(out) if custom_kernels() else max_pool_xla(jax.nn.relu(out))
        for block in self.blocks:
            out, state = block(out, state)
        if self.flatten_superpixels:
            return out.reshape(out.shape[0], -1), state
        return jnp.mean(out, axis=(1, 2)), state
