"""The original's example encoder: a small ResNet v1 with bottleneck blocks (`modules/resnet.py`).

`SimpleResNet` maps a batch of images `[N, H, W, C]` (channels last) to vectors `[N, E]`:

    7x7/2 conv (64 ch, no bias) -> BatchNorm -> ReLU -> 3x3/2 max-pool (SAME)
    -> 4 groups of bottleneck blocks (default 2 blocks each, widths (16, 32, 32, emb_dim),
       strides (1, 2, 2, 2), a projection shortcut on each group's first block)
    -> mean over space (or flatten, with `flatten_superpixels`)

Every convolution is bias-free with 'SAME' padding and Haiku's default initialiser; the last BatchNorm of
each block starts with scale 0; BatchNorm is Haiku's (decay 0.9, eps 1e-5; `layers.BatchNorm`). Works at
any image size (105 px, or 28 px when downsampled).

The ResNet runs on the flat batch of all B*L images (the caller reshapes, as the original's
`hk.BatchApply`), not per image under `vmap`: BatchNorm couples the images anyway, and on the flat batch
its backward pass and the convolutions' patch matmuls can be written out (`trainer.models.kernels`),
which halves the first stage's cost on a CPU. The original's `BlockGroup` is not a module of its own
here: `SimpleResNet.blocks` lists the blocks of all groups in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from trainer.models import kernels
from trainer.models.layers import BatchNorm, Conv2d


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
        for n, channels, stride in zip(blocks_per_group, channels_per_group, strides):
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
        out = kernels.relu_max_pool(out)
        for block in self.blocks:
            out, state = block(out, state)
        if self.flatten_superpixels:
            return out.reshape(out.shape[0], -1), state
        return jnp.mean(out, axis=(1, 2)), state
