"""The paper's model in Equinox: ResNet / linear / embedding example encoder, interleaved label tokens,
causal transformer (or LSTM / vanilla RNN), faithful to the original's `modules/` (Chan et al. 2022).

    config.py       ModelConfig (typed, frozen: what the model is)
    model.py        Model, make_model, forward (the batched forward pass), targets, count_params
    embedder.py     the original's embedding.py: examples and labels -> tokens
    resnet.py       the original's resnet.py: SimpleResNet (bottleneck v1)
    transformer.py  the original's transformer.py / transformer_core.py: the causal transformer tower
    rnn.py          the original's rnn.py: LSTM / vanilla RNN baselines
    layers.py       Haiku's building blocks: initialisers, Dense, Conv2d, BatchNorm, LayerNorm, dropout
    kernels.py      the hand-written kernels beside their plain-JAX references, and the speed switches
"""

from trainer.models.config import ExampleEncoding, ModelConfig, SeqModel
from trainer.models.embedder import Embedder, ModelInputError, positional_encodings
from trainer.models.model import Model, count_params, forward, make_model, targets
from trainer.models.layers import BatchNorm
from trainer.models.resnet import SimpleResNet
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
