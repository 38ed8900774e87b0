"""Typed, frozen configuration of the paper's model (Chan et al. 2022).

`ModelConfig` gathers what the original spread over three config dicts (`embedding`, `transformer`,
`rnn` in `experiment/configs/images_all_exemplars.py`) plus the constants its modules hard-code
(ResNet widths, positional-encoding time scale, MLP widening). Defaults are the paper's: ResNet example
encoder, 64-dimensional embeddings, 12-layer 8-head causal transformer, no dropout.

Two option names of the original are merged: `num_layers` serves the transformer and the RNNs (the
original had one `num_layers` in each sub-config, both 12), and `dropout_prob` is the transformer's
(the original's RNN tower accepted a `dropout_prob` and ignored it; so do we).

How the model is computed (hand-written kernels or XLA's ops, the transformer's layers unrolled or
scanned) is not configured here: those are speed switches (`trainer.models.kernels`), kept out of every
config and checkpoint.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from seqgen.configio import ConfigError, documented, from_plain, to_plain


class ExampleEncoding(str, enum.Enum):
    RESNET = "resnet"  # ResNet v1 (bottleneck) over each image
    LINEAR = "linear"  # flatten the image, one linear layer
    EMBEDDING = "embedding"  # symbolic data: integer examples through an embedding table


class SeqModel(str, enum.Enum):
    TRANSFORMER = "transformer"
    LSTM = "lstm"
    VANILLA_RNN = "vanilla_rnn"


@dataclass(frozen=True)
class ModelConfig:
    seq_model: SeqModel = documented(SeqModel.TRANSFORMER, "Sequence model over the tokens.")
    emb_dim: int = documented(64, "Embedding width of examples and labels (the tokens).")
    example_encoding: ExampleEncoding = documented(
        ExampleEncoding.RESNET, "Example encoder: ResNet over each image, one linear layer over the flattened "
        "image, or an embedding table (symbolic data).")
    flatten_superpixels: bool = documented(False, "Flatten the ResNet's last feature map instead of averaging it.")
    example_dropout_prob: float = documented(
        0.0, "Dropout on the example embeddings, at training and evaluation (noise on examples), as the original.")
    concatenate_labels: bool = documented(
        False, "One token per (example, label) pair instead of interleaved example and label tokens.")
    use_positional_encodings: bool = documented(True, "Add sinusoidal positional encodings to the tokens.")
    positional_dropout_prob: float = documented(
        0.0, "Dropout on the positional encodings: one mask shared by the batch, training only (as the original).")
    num_layers: int = documented(12, "Transformer blocks, or stacked RNN layers.")
    num_heads: int = documented(8, "Attention heads per transformer block.")
    dropout_prob: float = documented(0.0, "Transformer dropout after attention and after the MLP, training only.")
    rnn_hidden_size: int = documented(64, "Hidden state width of the LSTM / vanilla RNN.")
    # Constants of the original's modules, exposed with their values.
    resnet_blocks: tuple[int, ...] = documented((2, 2, 2, 2), "ResNet blocks in each of the 4 groups.")
    resnet_channels: tuple[int, ...] = documented(
        (16, 32, 32), "ResNet widths of the first 3 groups (the last group's is emb_dim; emb_dim // 16 flattened).")
    resnet_strides: tuple[int, ...] = documented((1, 2, 2, 2), "ResNet strides of the 4 groups.")
    bn_decay: float = documented(0.9, "BatchNorm moving-average decay.")
    bn_eps: float = documented(1e-5, "BatchNorm epsilon.")
    widening_factor: int = documented(4, "Transformer MLP width / token width.")
    positional_max_time: float = documented(30.0, "Time scale of the sinusoidal positional encodings.")
    self_att_init_scale: float = 1.0
    dense_init_scale: float = 1.0

    def __post_init__(self) -> None:
        # Accept plain strings for the enums (e.g. from click), store the Enum.
        object.__setattr__(self, "seq_model", _enum(SeqModel, self.seq_model, "seq_model"))
        object.__setattr__(
            self, "example_encoding", _enum(ExampleEncoding, self.example_encoding, "example_encoding")
        )
        for name in ("resnet_blocks", "resnet_channels", "resnet_strides"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self.validate()

    @property
    def token_dim(self) -> int:
        """Width of the tokens the sequence model reads (doubled when labels are concatenated)."""
        return 2 * self.emb_dim if self.concatenate_labels else self.emb_dim

    def validate(self) -> "ModelConfig":
        checks = [
            (self.emb_dim >= 1, f"emb_dim must be >= 1, got {self.emb_dim}"),
            (
                not self.use_positional_encodings or self.token_dim % 2 == 0,
                f"emb_dim must be even with positional encodings, got {self.emb_dim}",
            ),
            (self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}"),
            (self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}"),
            (
                self.seq_model is not SeqModel.TRANSFORMER or self.num_heads < 1 or self.token_dim % self.num_heads == 0,
                f"num_heads ({self.num_heads}) must divide the token width ({self.token_dim})",
            ),
            (self.rnn_hidden_size >= 1, f"rnn_hidden_size must be >= 1, got {self.rnn_hidden_size}"),
            (
                not (self.flatten_superpixels and self.emb_dim % 16),
                f"flatten_superpixels needs emb_dim divisible by 16, got {self.emb_dim}",
            ),
            (len(self.resnet_blocks) == 4, "resnet_blocks must list 4 group sizes"),
            (len(self.resnet_channels) == 3, "resnet_channels must list the widths of the first 3 groups"),
            (len(self.resnet_strides) == 4, "resnet_strides must list 4 strides"),
            (all(b >= 1 for b in self.resnet_blocks), "resnet_blocks must all be >= 1"),
            (all(c >= 4 and c % 4 == 0 for c in self.resnet_channels), "resnet_channels must be multiples of 4"),
            (all(s >= 1 for s in self.resnet_strides), "resnet_strides must all be >= 1"),
            (0.0 < self.bn_decay < 1.0, f"bn_decay must be in (0, 1), got {self.bn_decay}"),
            (self.bn_eps > 0, f"bn_eps must be > 0, got {self.bn_eps}"),
            (self.widening_factor >= 1, f"widening_factor must be >= 1, got {self.widening_factor}"),
            (self.positional_max_time > 0, "positional_max_time must be > 0"),
        ]
        if self.example_encoding is ExampleEncoding.RESNET:
            width = self.emb_dim // 16 if self.flatten_superpixels else self.emb_dim
            checks.append(
                (width >= 4 and width % 4 == 0, f"the ResNet's last group width ({width}) must be a multiple of 4: "
                 "use emb_dim divisible by 4 (by 64 with flatten_superpixels)")
            )
        for name in ("example_dropout_prob", "positional_dropout_prob", "dropout_prob"):
            p = getattr(self, name)
            checks.append((0.0 <= p < 1.0, f"{name} must be in [0, 1), got {p}"))
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_plain(cls, data, "model.")


def _enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ConfigError(f"{name} = {value!r} is not one of: {choices}") from None
