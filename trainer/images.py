"""Integer batches -> model inputs, on the device (inside jit): one gather, noise, random rare images, resize.

The original (Chan et al. 2022, datasets/data_generators.py + datasets/utils.py) builds every image on
the host in float32: `tf.image.convert_image_dtype` (uint8 -> [0, 1]) then `tf.image.rgb_to_grayscale`
(weights 0.2989 + 0.5870 + 0.1140, so white is 0.9999, not 1), the x8 augmentation (`flip_left_right`
then `rot90(k)`, counter-clockwise), Gaussian pixel noise N(0, noise_scale) (`_create_noisy_image_seq`),
and, with `randomly_generate_rare` (never in `mixed` sets, as the original), a random binary {0, 1} image per rare class and sequence (the same
image for every instance of that class in the sequence; "rare" = in the split's rare pool). With the
`downsample` option, `prepare_seqs_for_transformer` then resizes each (noisy) image to 28x28 with
`tf.image.resize` defaults: bilinear, half-pixel centres, NO antialiasing.

Here, with `image_table` = seqgen's uint8 [1623, 20, 105, 105] table (white 255, ink 0):

- `prepare_table` puts it on the device once. At 105 px it stays uint8 (values mapped through a 256-entry
  lookup table that reproduces convert_image_dtype + rgb_to_grayscale in float32). At another size S it
  is converted to those float32 values and resized once, giving float32 [n, 20, S, S] (quantising the
  resized values back to uint8 would not be faithful).
- The resize is TF's bilinear kernel written as a matrix `R [S, 105]`: `resize(x) = R x R^T` (equal to
  `jax.image.resize(..., "linear", antialias=False)`, tested). It is linear, so resize(image + noise) =
  resize(image) + resize(noise) and it commutes with the flip / rot90 transforms (R is symmetric under
  reversal): we resize the table once, and resize only the noise and random rare images per batch, which
  are drawn at 105 px exactly as in the original. The transform then acts on the resized image.
- `make_examples` does ONE gather from the flat table: index = image * S*S + perm[t], where `perm[t]`
  is the precomputed pixel permutation of transform t (np.rot90(np.fliplr(.)) of an index image).

Randomness: sequence key `k = fold_in(key(0), noise_seed)`; noise uses `fold_in(k, 0)` (one normal draw
of shape [L, 105, 105]), random rare images use `fold_in(fold_in(k, 1), class id)` (the bits of 345 random
uint32 words = 105*105 fair {0, 1} pixels, as the original's `np.random.randint(2)`), so a class
repeated in a sequence gets the same image, and everything is a pure function of the stored seeds.
Noise is added to random rare images too, as in the original.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from seqgen.config import IMAGE_SIZE, N_AUGMENTATIONS, N_EXEMPLARS, BuildConfig, Exemplars, ExampleType
from trainer.data import DataError, ShardSet
from trainer.runtime.distributed import Topology, replicate

__all__ = ["GRAY_LUT", "device_table", "make_examples", "prepare_table", "rare_mask", "resize_matrix",
           "transform_permutations"]


def _gray_lut() -> np.ndarray:
    """uint8 v -> float32 as tf.image.convert_image_dtype(., float32) then rgb_to_grayscale of (v, v, v)."""
    v = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
    w = np.array([0.2989, 0.5870, 0.1140], np.float32)
    return ((v * w[0] + v * w[1]) + v * w[2]).astype(np.float32)


GRAY_LUT = _gray_lut()
GRAY_LUT.setflags(write=False)


@functools.lru_cache(maxsize=8)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 matrix of TF2's bilinear resize (half-pixel centres, no antialias), one axis."""
    scale = in_size / out_size
    r = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        x = (i + 0.5) * scale - 0.5
        lo = int(np.floor(x))
        frac = x - lo
        r[i, min(max(lo, 0), in_size - 1)] += 1.0 - frac
        r[i, min(max(lo + 1, 0), in_size - 1)] += frac
    r = r.astype(np.float32)
    r.setflags(write=False)
    return r


def _resize(x: jax.Array, size: int) -> jax.Array:
    """Resize the last two (square) axes to `size` with TF's bilinear kernel; identity when equal."""
    if x.shape[-1] == size:
        return x
    r = jnp.asarray(resize_matrix(x.shape[-1], size))
    hi = jax.lax.Precision.HIGHEST  # full float32 (no TF32 on GPUs)
    lead, n = x.shape[:-2], x.shape[-1]
    y = jnp.matmul(x.reshape(-1, n), r.T, precision=hi).reshape(*lead, n, size)  # columns resized
    y = jnp.matmul(jnp.swapaxes(y, -1, -2).reshape(-1, n), r.T, precision=hi)  # rows resized (transposed)
    return jnp.swapaxes(y.reshape(*lead, size, size), -1, -2)


@functools.lru_cache(maxsize=8)
def transform_permutations(size: int) -> np.ndarray:
    """[8, size*size] int32: output pixel p of transform t reads input pixel perm[t, p] (flip, then rot90 k)."""
    idx = np.arange(size * size, dtype=np.int32).reshape(size, size)
    perms = []
    for t in range(N_AUGMENTATIONS):
        flip, k = divmod(t, 4)
        img = np.fliplr(idx) if flip else idx
        perms.append(np.rot90(img, k).reshape(-1))
    out = np.ascontiguousarray(np.stack(perms))
    out.setflags(write=False)
    return out


def prepare_table(images_uint8: np.ndarray, image_size: int) -> jax.Array:
    """The image table on the device: uint8 [n, 20, 105, 105] as is, else float32 [n, 20, S, S] resized once."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"image table must be uint8 [n, 20, {IMAGE_SIZE}, {IMAGE_SIZE}], got "
                         f"{images.dtype} {images.shape}")
    if image_size == IMAGE_SIZE:
        return jnp.asarray(images)
    lut = jnp.asarray(GRAY_LUT)
    resize = jax.jit(lambda x: _resize(lut[x.astype(jnp.int32)], image_size))
    chunk = 64  # classes per device call: bounded float32 intermediates on any device
    parts = [resize(jnp.asarray(images[i:i + chunk])) for i in range(0, len(images), chunk)]
    return jnp.concatenate(parts)


def device_table(train: ShardSet, image_size: int, topo: Topology, omniglot_dir: str | os.PathLike | None,
                 cache_dir: str | os.PathLike | None) -> jax.Array:
    """The image table of a run on its devices (`prepare_table`, replicated), checked against the training
    set's image-table fingerprint; a one-element placeholder for symbolic data."""
    if train.config.dataset.example_type is ExampleType.SYMBOLIC:
        return replicate(topo, jnp.zeros((1,), jnp.uint8))
    from seqgen.omniglot import load_image_table

    table = load_image_table(omniglot_dir, cache_dir, download_if_missing=False)
    if train.image_table_fingerprint and table.fingerprint != train.image_table_fingerprint:
        raise DataError(
            f"the shards in {train.path} index an image table with fingerprint "
            f"{train.image_table_fingerprint[:12]} but --omniglot gives {table.fingerprint[:12]}; "
            "point --omniglot at the Omniglot the shards were built from, or rebuild the shards"
        )
    return replicate(topo, prepare_table(table.images, image_size))


@functools.lru_cache(maxsize=16)
def rare_mask(cfg: BuildConfig) -> np.ndarray:
    """bool [num_dataset_classes]: dataset class ids in the split's rare pool (seqgen.split, as the manifest)."""
    from seqgen.split import make_split

    mask = np.zeros(cfg.dataset.num_dataset_classes, bool)
    mask[make_split(cfg).rare] = True
    mask.setflags(write=False)
    return mask


def _image_index(example: jax.Array, exemplar: jax.Array, cfg: BuildConfig) -> tuple[jax.Array, jax.Array]:
    """(table image index = character * 20 + drawing, transform t) of each dataset class id (docs/shard-format.md)."""
    d = cfg.dataset
    if d.augment:
        t, base = example % N_AUGMENTATIONS, example // N_AUGMENTATIONS
    else:
        t, base = jnp.zeros_like(example), example
    if d.exemplars is Exemplars.SEPARATED:
        character, drawing = base // N_EXEMPLARS, base % N_EXEMPLARS
    else:
        character, drawing = base, exemplar
    return character * N_EXEMPLARS + drawing, t


def _random_binary_image(key: jax.Array) -> jax.Array:
    """float32 [105, 105] of independent fair {0, 1} pixels: the bits of ceil(105*105/32) random uint32 words."""
    n = IMAGE_SIZE * IMAGE_SIZE
    words = jax.random.bits(key, (-(-n // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)
    return bits.reshape(-1)[:n].reshape(IMAGE_SIZE, IMAGE_SIZE).astype(jnp.float32)


def make_examples(table: jax.Array, batch: dict[str, jax.Array], cfg: BuildConfig, *,
                  rare: np.ndarray | None = None, noise_at_size: bool = False) -> jax.Array:
    """Model inputs for an integer batch: float32 [B, L, S, S, 1] images, or int32 [B, L] symbolic ids.

    `table` comes from `prepare_table` (S = its last axis); `cfg` is the BuildConfig of the set the batch
    comes from (static); `rare` overrides the rare-pool mask (default: `rare_mask(cfg)`). `noise_at_size`
    draws the pixel noise at S px, after the resize (the training config's `noise_at = "training"`), instead
    of at 105 px before it (the original's path, which averages the noise down at S < 105).
    """
    example = jnp.asarray(batch["example"]).astype(jnp.int32)
    if cfg.dataset.example_type is ExampleType.SYMBOLIC:
        return example
    exemplar = jnp.asarray(batch["exemplar"]).astype(jnp.int32)
    size = table.shape[-1]
    image, t = _image_index(example, exemplar, cfg)
    pixels = table.reshape(-1, size * size)[image]  # one row gather: [B, L, S*S]
    if cfg.dataset.augment:  # pixel j of transform t is pixel perm[t, j] of the original
        pixels = jnp.take_along_axis(pixels, jnp.asarray(transform_permutations(size))[t], axis=-1)
    if pixels.dtype == jnp.uint8:
        pixels = jnp.asarray(GRAY_LUT)[pixels.astype(jnp.int32)]
    pixels = pixels.reshape(*example.shape, size, size)

    sq = cfg.sequence
    if sq.noise_scale > 0 or cfg.random_rare_images:
        # Everything random is drawn at 105 px and resized once: resize is linear, so
        # resize(where(rare, rand, img) + noise) = where(rare, 0, resize(img)) + resize(where(rare, rand, 0) + noise).
        seeds = jnp.asarray(batch["noise_seed"]).astype(jnp.uint32)
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(seeds)  # [B]
        extra = jnp.zeros((*example.shape, IMAGE_SIZE, IMAGE_SIZE), jnp.float32)
        if cfg.random_rare_images:
            mask = jnp.asarray(rare_mask(cfg) if rare is None else rare)[example][..., None, None]  # [B, L, 1, 1]

            def seq_rare(key, classes):
                rkey = jax.random.fold_in(key, 1)
                return jax.vmap(lambda c: _random_binary_image(jax.random.fold_in(rkey, c)))(classes)

            extra = jnp.where(mask, jax.vmap(seq_rare)(keys, example), extra)
            pixels = jnp.where(mask, jnp.float32(0), pixels)
        noise = None
        if sq.noise_scale > 0:
            side = size if noise_at_size else IMAGE_SIZE
            length, shape = example.shape[1], (side, side)
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (length, *shape)))(keys)
            noise = noise * jnp.float32(sq.noise_scale)
            if not noise_at_size:
                extra, noise = extra + noise, None
        pixels = pixels + _resize(extra, size)
        if noise is not None:
            pixels = pixels + noise
    return pixels[..., None].astype(jnp.float32)


def examples_for(train_cfg: Any) -> Callable[..., jax.Array]:
    """`make_examples` as the run `train_cfg` (a `trainer.config.TrainConfig`) makes its inputs: its
    `training.noise_at` says where pixel noise is drawn. Every pass over a run's model (training, evaluation,
    the Python API, `trainer analyze`) makes its inputs through this."""
    from trainer.config import NoiseAt

    return functools.partial(make_examples, noise_at_size=train_cfg.training.noise_at is NoiseAt.TRAINING)
