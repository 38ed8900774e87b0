"""The model's hand-written kernels, each beside its plain-JAX reference, and the speed switches.

The modules (resnet.py, transformer.py, layers.py) call the ops below as `kernels.<op>`; each op runs
either its hand-written kernel or its reference:

    op                  hand-written kernel ("custom")            reference ("xla": XLA's op + autodiff)
    conv2d              conv2d_kernel: patch matmuls, custom VJP  conv2d_reference: lax.conv_general_dilated
    batch_norm          batch_norm_kernel: custom VJP             batch_norm_reference: the formula
    relu_max_pool       relu_max_pool_kernel: separable, VJP      relu_max_pool_xla: separable, autodiff
                                                                  (the test reference: lax.reduce_window)
    layer_norm          layer_norm_kernel: custom VJP             layer_norm_reference: the formula
    causal_attention    causal_attention_kernel: einsums, VJP     causal_attention_reference:
                                                                  jax.nn.dot_product_attention

A kernel computes the same function as its reference and, up to float32 round-off, the same gradients
(tests/test_kernels.py, op by op and for the whole model); the kernels were chosen by CPU measurements,
where they are faster (each says why). A 1x1 convolution is a strided slice and a matmul on both paths.

Two speed switches choose how the model is computed, never what: they change round-off only, are not
part of the model config or of any checkpoint, and both are read when a function is traced (set them
before the first jitted step: a function already compiled keeps what it was traced with). A run fixes
both in its compute settings (`[trainer.compute]`, recorded in config.json; trainer/runtime/platform.py
`computing` applies them while its programs are traced; docs/gpu.md).

- Kernel path, `kernel_path()`: "custom" (the hand-written kernels) or "xla" (XLA's own ops with JAX's
  autodiff: the references, except the max-pool's, whose gradient has no deterministic GPU kernel).
  Default "custom" on the CPU, "xla" elsewhere (`jax.default_backend()`: on a GPU, XLA's own convolution
  and fused attention may be faster); `EMERGENT_ICL_KERNELS=custom|xla|auto` overrides it, and
  `use_kernels(...)` does within a block.
- Layer loop, `layer_loop()`: the transformer's identical blocks run "unroll"ed (the default: on a 2-core
  CPU about 5 ms/step faster at 12 layers, because a scan stacks and slices every layer's saved
  activations) or as one `lax.scan` body ("scan": compiles one block instead of twelve).
  `EMERGENT_ICL_LAYERS=unroll|scan|auto` overrides it, and `use_layer_loop(...)` does within a block.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Iterator

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from seqgen.errors import UserError

# ================================================================ the speed switches


class KernelPathError(UserError, ValueError):
    """An unknown kernel path or layer loop name; one-line message."""


class _Switch:
    """A choice read at trace time: the innermost `use` block, else $env, else `auto()`."""

    def __init__(self, env: str, choices: tuple[str, ...], what: str, auto: Callable[[], str]):
        self.env, self.choices, self.what, self.auto = env, choices, what, auto
        self.override: str | None = None

    def check(self, name: str) -> str:
        if name not in (*self.choices, "auto"):
            raise KernelPathError(f"{self.env}={name!r} is not a {self.what}; use {', '.join(self.choices)} or auto")
        return name

    def get(self) -> str:
        name = self.override or self.check(os.environ.get(self.env, "auto").strip().lower() or "auto")
        return self.auto() if name == "auto" else name

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        previous, self.override = self.override, self.check(name)
        try:
            yield
        finally:
            self.override = previous


PATHS = ("custom", "xla")
ENV = "EMERGENT_ICL_KERNELS"
LOOPS = ("unroll", "scan")
LAYERS_ENV = "EMERGENT_ICL_LAYERS"
_kernels = _Switch(ENV, PATHS, "kernel path", lambda: "custom" if jax.default_backend() == "cpu" else "xla")
_layers = _Switch(LAYERS_ENV, LOOPS, "layer loop", lambda: "unroll")


def kernel_path() -> str:
    """"custom" or "xla": the override of `use_kernels`, else $EMERGENT_ICL_KERNELS, else by platform."""
    return _kernels.get()


def custom_kernels() -> bool:
    return kernel_path() == "custom"


def use_kernels(name: str) -> contextlib.AbstractContextManager[None]:
    """Trace the model with kernel path `name` ("custom", "xla" or "auto") inside the block."""
    return _kernels.use(name)


def layer_loop() -> str:
    """"unroll" or "scan": the override of `use_layer_loop`, else $EMERGENT_ICL_LAYERS, else "unroll"."""
    return _layers.get()


def use_layer_loop(name: str) -> contextlib.AbstractContextManager[None]:
    """Trace the transformer with layer loop `name` ("unroll", "scan" or "auto") inside the block."""
    return _layers.use(name)


# ================================================================ the ops the modules call


def conv2d(x: Float[Array, "n h w cin"], w: Float[Array, "kh kw cin cout"], stride: int) -> Array:
    """`hk.Conv2D(with_bias=False, padding="SAME")`'s arithmetic: NHWC images, HWIO weights."""
    if w.shape[:2] == (1, 1):
        # A 1x1 'SAME' convolution with stride s reads pixels 0, s, 2s, ...: a strided slice and a matmul
        # (the same arithmetic as the convolution; faster on CPU). Both kernel paths.
        return x[:, ::stride, ::stride] @ w[0, 0]
    return (conv2d_kernel if custom_kernels() else conv2d_reference)(x, w, stride)


def batch_norm(x: Float[Array, "n ... c"], scale: Array, offset: Array, eps: float) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm over every axis but the last: `(y, mean, var)`, `y = (x - mean) *
    rsqrt(var + eps) * scale + offset` with the batch's mean and biased variance E[x^2] - E[x]^2."""
    return (batch_norm_kernel if custom_kernels() else batch_norm_reference)(x, scale, offset, eps)


def relu_max_pool(x: Float[Array, "n h w c"]) -> Float[Array, "n h2 w2 c"]:
    """`hk.max_pool(relu(x), window (3, 3), strides (2, 2), padding "SAME")` over h, w (channels last)."""
    return (relu_max_pool_kernel if custom_kernels() else relu_max_pool_xla)(x)


def layer_norm(x: Float[Array, "... d"], scale: Array, offset: Array, eps: float) -> Array:
    """`hk.LayerNorm(axis=-1)`'s arithmetic: `(x - mean) * rsqrt(var + eps) * scale + offset` over the last axis."""
    return (layer_norm_kernel if custom_kernels() else layer_norm_reference)(x, scale, offset, eps)


def gelu(x: Array) -> Array:
    """`jax.nn.gelu` (the tanh approximation, as the original) on both kernel paths: a hand-written backward
    pass saved 2.7 % of the 12-layer 28-px step on the CPU, under the 5 % a kernel must save to be kept
    (`bench/model_bench.py --kernels`, docs/speed.md)."""
    return jax.nn.gelu(x)


def causal_attention(q: Float[Array, "tq h k"], k: Float[Array, "t h k"], v: Float[Array, "t h k"]) -> Array:
    """Softmax(q k^T / sqrt(head_dim)) v with a causal mask, per head. `q` may hold only the last `tq` of
    the `t` tokens' queries (the transformer's last block, when only the query token's output is needed)."""
    return (causal_attention_kernel if custom_kernels() else causal_attention_reference)(q, k, v)


# ================================================================ convolution

# The matmuls below take the precision of the block they are traced in (`trainer.runtime.platform.computing`:
# the run's `compute.precision`), as XLA's convolution does.
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv2d_reference(x: Array, w: Array, stride: int) -> Array:
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_kernel(x: Float[Array, "n h w cin"], w: Float[Array, "kh kw cin cout"], stride: int) -> Array:
    """`conv2d_reference` with an explicit backward pass.

    When differentiated, the forward value is one matmul of the flattened kernel with the transposed image
    patches `[kh*kw*cin, n*h2*w2]` (then transposed to NHWC), and the weight cotangent one matmul of the
    same patches, kept from the forward pass, with the output cotangent: both in the layout each matmul
    wants, so XLA adds no transposes of the large patch array. The input cotangent is the patch
    cotangents `g @ w^T` added back tap by tap. The matmuls sum in another order than the convolution, so
    training and inference outputs agree up to float round-off (tested).
    """
    return conv2d_reference(x, w, stride)


def _conv_fwd(x, w, stride):
    kh, kw, cin, cout = w.shape
    pt = _patches(x, kh, kw, stride)  # [kh*kw*cin, n, h2, w2]
    # y^T = w^T pt: a plain matmul on the transposed patches, which the weight gradient reuses.
    y_t = jnp.dot(w.reshape(-1, cout).T, pt.reshape(pt.shape[0], -1))
    return y_t.T.reshape(*pt.shape[1:], cout), (x, w, pt)


def _conv_bwd(stride, res, g):
    x, w, pt = res
    kh, kw, cin, cout = w.shape
    g_x = _input_cotangent(g, w, x.shape, stride)
    g_w = jnp.dot(pt.reshape(pt.shape[0], -1), g.reshape(-1, cout))
    return g_x, g_w.reshape(kh, kw, cin, cout)


conv2d_kernel.defvjp(_conv_fwd, _conv_bwd)


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
    g_p = jnp.dot(g.reshape(-1, cout), w.reshape(-1, cout).T).reshape(n, ho, wo, kh, kw, cin)
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


# ================================================================ BatchNorm (training mode)


def _batch_stats(x: Array, eps: float) -> tuple[Array, Array, Array]:
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x), axis=axes) - jnp.square(mean)  # hk.BatchNorm's E[x^2] - E[x]^2
    return mean, var, jax.lax.rsqrt(var + eps)


def batch_norm_reference(x: Array, scale: Array, offset: Array, eps: float) -> tuple[Array, Array, Array]:
    mean, var, inv = _batch_stats(x, eps)
    return (x - mean) * (scale * inv) + offset, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_kernel(x: Float[Array, "n ... c"], scale: Array, offset: Array, eps: float) -> tuple[Array, Array, Array]:
    """`batch_norm_reference` with a hand-written backward pass.

    The backward is two reductions (sum g, sum g * x) and one elementwise pass `dx = a g + c1 x + c0` with
    per-channel constants (cotangents reaching `mean` and `var` directly are included); autodiff of the
    statistics emits several more passes over the activations.
    """
    return batch_norm_reference(x, scale, offset, eps)


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


batch_norm_kernel.defvjp(_batch_norm_fwd, _batch_norm_bwd)


# ================================================================ ReLU + 3x3/2 max-pool


def relu_max_pool_reference(x: Float[Array, "n h w c"]) -> Float[Array, "n h2 w2 c"]:
    """`lax.reduce_window` (its gradient is select-and-scatter) after the ReLU; -inf padding never wins."""
    return jax.lax.reduce_window(jax.nn.relu(x), -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")


def relu_max_pool_xla(x: Float[Array, "... h w c"]) -> Float[Array, "... h2 w2 c"]:
    """The xla path's max-pool: `max_pool_3x3_s2(relu(x))` differentiated by JAX (slices, maxima and
    selects). Not `relu_max_pool_reference`: the gradient of `lax.reduce_window` is select-and-scatter,
    which XLA's GPU backend has no deterministic implementation of (with `--xla_gpu_deterministic_ops`,
    the default of a run, XLA refuses to compile it)."""
    return max_pool_3x3_s2(jax.nn.relu(x))


def max_pool_3x3_s2(x: Float[Array, "... h w c"]) -> Float[Array, "... h2 w2 c"]:
    """The 3x3/2 'SAME' max-pool over the axes h, w of one image or a batch (channels last), as two
    separable 1-D window maxima over reshaped pairs of rows: the same values as `lax.reduce_window`,
    whose CPU gradient (select-and-scatter) is several times slower."""
    h_axis = x.ndim - 3
    return _max3_s2(_max3_s2(x, h_axis), h_axis + 1)


@jax.custom_vjp
def relu_max_pool_kernel(x: Float[Array, "... h w c"]) -> Float[Array, "... h2 w2 c"]:
    """`max_pool_3x3_s2(relu(x))` with a hand-written backward pass (bitwise the cotangents of its autodiff).

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


relu_max_pool_kernel.defvjp(_relu_pool_fwd, _relu_pool_bwd)


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


# ================================================================ LayerNorm


def _layer_norm_parts(x: Array, eps: float) -> tuple[Array, Array]:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    inv = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)  # jnp.var's arithmetic
    return centred * inv, inv


def layer_norm_reference(x: Array, scale: Array, offset: Array, eps: float) -> Array:
    normed, _ = _layer_norm_parts(x, eps)
    return normed * scale + offset


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_kernel(x: Array, scale: Array, offset: Array, eps: float) -> Array:
    """`layer_norm_reference` with a hand-written backward pass.

    The backward is the textbook one (two reductions over the feature axis, one elementwise pass); autodiff
    of mean and variance emits several more small operations, which dominate on a CPU at these sizes.
    """
    return layer_norm_reference(x, scale, offset, eps)


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


layer_norm_kernel.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# ================================================================ causal attention


def causal_attention_reference(q: Float[Array, "tq h k"], k: Float[Array, "t h k"], v: Float[Array, "t h k"]) -> Array:
    """The library's `jax.nn.dot_product_attention` with autodiff (XLA's fused attention where the platform
    has one)."""
    t_q, t_k = q.shape[0], k.shape[0]
    causal = jnp.tril(jnp.ones((t_q, t_k), bool), k=t_k - t_q)  # the queries are the last t_q tokens
    return jax.nn.dot_product_attention(q, k, v, mask=causal[None])


def attention_with_weights(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
    """Causal attention as two einsums over [heads, tq, t] scores: `(output [tq, h, k], weights [h, tq, t])`.
    The forward of `causal_attention_kernel`, and the analysis path (which needs the weights)."""
    t_q, _, head_dim = q.shape
    t_k = k.shape[0]
    scores = jnp.einsum("thk,shk->hts", q, k) * jnp.float32(1.0 / head_dim**0.5)
    causal = jnp.tril(jnp.ones((t_q, t_k), bool), k=t_k - t_q)  # the queries are the last t_q tokens
    weights = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("hts,shk->thk", weights, v), weights


@jax.custom_vjp
def causal_attention_kernel(q: Float[Array, "tq h k"], k: Float[Array, "t h k"], v: Float[Array, "t h k"]) -> Array:
    """`causal_attention_reference` up to float32 round-off, with a hand-written backward pass.

    Written as two einsums over [heads, t, t] scores (`attention_with_weights`): on CPU these lower to two
    batched matmuls each way, where the library function adds layout transposes and a costlier backward
    pass (~30% slower here). The backward pass is written out (the softmax Jacobian applied directly: four
    einsums and one reduction), which saves autodiff's extra passes over the [heads, t, t] arrays.
    """
    return attention_with_weights(q, k, v)[0]


def _attention_fwd(q, k, v):
    out, weights = attention_with_weights(q, k, v)
    return out, (q, k, v, weights)


def _attention_bwd(res, g):
    q, k, v, weights = res
    scale = jnp.float32(1.0 / q.shape[-1] ** 0.5)
    g_v = jnp.einsum("hts,thk->shk", weights, g)
    g_weights = jnp.einsum("thk,shk->hts", g, v)
    # softmax: g_scores = w * (g_w - sum_s g_w * w); masked entries have w = 0 and get nothing
    g_scores = weights * (g_weights - jnp.sum(g_weights * weights, axis=-1, keepdims=True)) * scale
    return jnp.einsum("hts,shk->thk", g_scores, k), jnp.einsum("hts,thk->shk", g_scores, q), g_v


causal_attention_kernel.defvjp(_attention_fwd, _attention_bwd)
