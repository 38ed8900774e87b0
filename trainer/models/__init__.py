"""The paper's model in Equinox: ResNet / linear / embedding example encoder, interleaved label tokens,
causal transformer (or LSTM / vanilla RNN), faithful to the original's `modules/` (Chan et al. 2022)."""

from trainer.models.config import ExampleEncoding, ModelConfig, SeqModel
from trainer.models.embedder import Embedder, ModelInputError, positional_encodings
from trainer.models.model import Model, count_params, forward, make_model, targets
from trainer.models.resnet import BatchNorm, SimpleResNet
from trainer.models.rnn import RNN
from trainer.models.transformer import Transformer, TransformerBlock

__all__ = [
    "BatchNorm",
    "Embedder",
    "ExampleEncoding",
    "Model",
    "ModelConfig",
    "ModelInputError",
    "RNN",
    "SeqModel",
    "SimpleResNet",
    "Transformer",
    "TransformerBlock",
    "count_params",
    "forward",
    "make_model",
    "positional_encodings",
    "targets",
]
