"""The original's input embedder (`modules/embedding.py`): one sequence of (example, label) pairs -> tokens.

For one sequence of L examples and L labels (the query's label last):

1. each example is encoded to an `emb_dim` vector: a ResNet over the image (`resnet`), one linear layer
   over the flattened image (`linear`), or an embedding table indexed by the integer example
   (`embedding`, symbolic data; its vocabulary is `num_classes`, as the original's);
2. example dropout (at training AND evaluation: it is input noise, not regularisation);
3. labels are looked up in a table `[num_classes, emb_dim]` (truncated normal, std 0.02);
4. tokens are interleaved `x0, y0, x1, y1, ..., x_{L-1}` (2L-1 tokens: the query's label is never an
   input), or, with `concatenate_labels`, each token is `[x_i, y_i]` (width 2*emb_dim) and the query's
   label is replaced by an extra "no label" entry `num_classes` of the table (so it has num_classes + 1 rows);
5. sinusoidal positional encodings (time scale 30: `[sin(t / 30^(2i/D)), cos(t / 30^(2i/D))]`, the sines
   first), with dropout at training only. The original draws ONE positional-dropout mask for the whole
   batch (its encodings have no batch axis); callers reproduce that by passing the same `pos_key` to
   every sequence.

Step 1 works on any number of examples at once (`encode_examples`: the model's `forward` passes all B*L
examples of a batch, so BatchNorm sees all B*L images, as the original's `hk.BatchApply`); steps 2-5 work
on one sequence (`tokens`). Calling the embedder on one sequence does both (BatchNorm then sees its L images).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from seqgen.errors import UserError
from trainer.models.config import ExampleEncoding, ModelConfig
from trainer.models.layers import Dense, dropout, haiku_default_std, truncated_normal
from trainer.models.resnet import SimpleResNet


class ModelInputError(UserError, ValueError):
    """Inputs that do not fit the model (wrong rank, dtype or image size); the message names the fix."""


def positional_encodings(seq_len: int, dim: int, max_time: float = 30.0) -> Float[Array, "s d"]:
    """The original's `_create_positional_encodings`: sines then cosines, frequencies 1/max_time^(2i/d)."""
    pos = jnp.arange(seq_len, dtype=jnp.float32)
    freqs = jnp.arange(0, dim, 2, dtype=jnp.float32)
    inverse_freqs = 1.0 / (max_time ** (freqs / dim))
    angles = pos[:, None] * inverse_freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Embedder(eqx.Module):
    encoder: SimpleResNet | Dense | None
    example_table: Float[Array, "vocab e"] | None
    label_table: Float[Array, "n e"]
    inference: bool
    cfg: ModelConfig = eqx.field(static=True)
    image_size: int = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, num_classes: int, *, image_size: int = 105, key: PRNGKeyArray):
        k_enc, k_lab = jr.split(key)
        self.cfg = cfg
        self.image_size = image_size
        self.encoder = None
        self.example_table = None
        if cfg.example_encoding is ExampleEncoding.RESNET:
            last = cfg.emb_dim // 16 if cfg.flatten_superpixels else cfg.emb_dim
            self.encoder = SimpleResNet(
                1,
                (*cfg.resnet_channels, last),
                blocks_per_group=cfg.resnet_blocks,
                strides=cfg.resnet_strides,
                flatten_superpixels=cfg.flatten_superpixels,
                decay=cfg.bn_decay,
                eps=cfg.bn_eps,
                key=k_enc,
            )
        elif cfg.example_encoding is ExampleEncoding.LINEAR:
            fan_in = image_size * image_size
            self.encoder = Dense(fan_in, cfg.emb_dim, std=haiku_default_std(fan_in), key=k_enc)
        else:  # hk.Embed(num_classes, emb_dim): TruncatedNormal(stddev=1)
            self.example_table = truncated_normal(k_enc, (num_classes, cfg.emb_dim), 1.0)
        n_label_rows = num_classes + 1 if cfg.concatenate_labels else num_classes
        self.label_table = truncated_normal(k_lab, (n_label_rows, cfg.emb_dim), 0.02)
        self.inference = False

    def encode_examples(self, examples: Array, state: eqx.nn.State) -> tuple[Float[Array, "n e"], eqx.nn.State]:
        """Examples `[N, H, W, 1]` float or `[N]` int (any N: one sequence or a whole flattened batch) ->
        `[N, emb_dim]`."""
        enc = self.cfg.example_encoding
        if enc is ExampleEncoding.EMBEDDING:
            if examples.ndim != 1 or not jnp.issubdtype(examples.dtype, jnp.integer):
                raise ModelInputError(
                    f"the embedding encoder takes integer examples [B, L], got {examples.dtype} with "
                    f"per-example shape {examples.shape[1:]}: use symbolic data or another example_encoding"
                )
            return self.example_table[examples], state
        if examples.ndim != 4 or not jnp.issubdtype(examples.dtype, jnp.floating):
            raise ModelInputError(
                f"the {enc.value} encoder takes float images [B, L, H, W, 1], got {examples.dtype} with "
                f"per-example shape {examples.shape[1:]}: use image data or example_encoding='embedding'"
            )
        if enc is ExampleEncoding.LINEAR:
            if examples.shape[1:] != (self.image_size, self.image_size, 1):
                raise ModelInputError(
                    f"the linear encoder was built for {self.image_size}x{self.image_size}x1 images, got "
                    f"{examples.shape[1:]}: pass image_size={examples.shape[1]} to make_model"
                )
            return self.encoder(examples.reshape(examples.shape[0], -1)), state
        h, state = self.encoder(examples, state)
        if h.shape[-1] != self.cfg.emb_dim:
            raise ModelInputError(
                f"flatten_superpixels gives {h.shape[-1]} features per {examples.shape[1]}px image, not "
                f"emb_dim={self.cfg.emb_dim} (it needs a 4x4 final map, i.e. 105 px images): use 105 px "
                "images or drop flatten_superpixels"
            )
        return h, state

    def __call__(
        self,
        examples: Array,
        labels: Int[Array, " l"],
        state: eqx.nn.State,
        *,
        example_key: PRNGKeyArray | None,
        pos_key: PRNGKeyArray | None,
    ) -> tuple[Float[Array, "t d"], eqx.nn.State]:
        """One sequence: examples `[L, ...]`, labels `[L]` -> tokens `[T, D]`."""
        h_example, state = self.encode_examples(examples, state)
        return self.tokens(h_example, labels, example_key=example_key, pos_key=pos_key), state

    def tokens(
        self,
        h_example: Float[Array, "l e"],
        labels: Int[Array, " l"],
        *,
        example_key: PRNGKeyArray | None,
        pos_key: PRNGKeyArray | None,
    ) -> Float[Array, "t d"]:
        """Steps 2-5 for one sequence of encoded examples `[L, emb_dim]` and its labels `[L]`."""
        cfg = self.cfg
        h_example = dropout(h_example, cfg.example_dropout_prob, example_key)

        if cfg.concatenate_labels:
            labels = labels.at[-1].set(self.label_table.shape[0] - 1)  # "no label" for the query
            tokens = jnp.concatenate([h_example, self.label_table[labels]], axis=-1)  # [L, 2E]
        else:
            h_label = self.label_table[labels[:-1]]  # [L-1, E]: the query's label is never an input
            pairs = jnp.stack([h_example[:-1], h_label], axis=1).reshape(-1, cfg.emb_dim)
            tokens = jnp.concatenate([pairs, h_example[-1:]], axis=0)  # x0, y0, ..., x_{L-1}: [2L-1, E]

        if cfg.use_positional_encodings:
            pe = positional_encodings(tokens.shape[0], tokens.shape[1], cfg.positional_max_time)
            if not self.inference:
                pe = dropout(pe, cfg.positional_dropout_prob, pos_key)
            tokens = tokens + pe
        return tokens
