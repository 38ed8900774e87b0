"""Will a run fit in memory? A lower bound of what training needs, checked before anything is allocated.

A model too large for the machine used to end in a native XLA abort (RESOURCE_EXHAUSTED with a long
stack) or in the kernel's out-of-memory kill, after the run directory was set up. `check_fits(cfg, ...)`
refuses it first, in one line, when even a lower bound of the memory training needs exceeds what the
device has:

- the train state (weights, Adam's two moments, BatchNorm statistics), from its shapes alone
  (`jax.eval_shape`: nothing is allocated), plus the gradients (one more copy of the weights);
- the transformer's activations kept for the backward pass: per layer, the residual stream and the MLP's
  hidden layer (batch x tokens x width x (2 + widening factor)) and the attention weights (batch x heads x
  tokens^2), in float32.

Everything else (the image embedder's activations, XLA's temporaries, the image table) only adds to it, so
a refusal is never wrong; a run that passes may still not fit. What the device has: its memory as JAX
reports it (a GPU's `bytes_limit`), else the machine's physical memory (the CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from seqgen.errors import UserError
from trainer.config import TrainConfig
from trainer.models.config import SeqModel

__all__ = ["CLI_OPTIONS", "FILE_OPTIONS", "ModelTooLarge", "Estimate", "estimate", "device_memory", "check_fits"]

FLOAT = 4  # bytes: states and activations are float32 (bfloat16 halves only the matmul inputs)


class ModelTooLarge(UserError):
    """A run that cannot fit in the device's memory; one-line message."""


@dataclass(frozen=True)
class Estimate:
    params: int  # parameters (weights and biases)
    state_bytes: int  # the train state: weights, optimizer moments, statistics
    grad_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.state_bytes + self.grad_bytes + self.activation_bytes


def estimate(cfg: TrainConfig, num_labels: int, seq_len: int) -> Estimate:
    """A lower bound of the memory one training step of `cfg` on sequences of `seq_len` (image, label) pairs,
    the query included, needs (module docstring); allocates nothing."""
    import jax
    import numpy as np

    from trainer.models.model import count_params
    from trainer.state import init_state

    shapes = jax.eval_shape(lambda: init_state(cfg, num_labels))
    leaves = [x for x in jax.tree_util.tree_leaves(shapes) if hasattr(x, "shape") and hasattr(x, "dtype")]
    state_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    params = count_params(shapes.model)
    m, t = cfg.model, cfg.training
    activations = 0
    if m.seq_model is SeqModel.TRANSFORMER:
        tokens = seq_len if m.concatenate_labels else 2 * seq_len - 1  # the query's label is not read
        per_layer = (t.batch_size * tokens * m.token_dim * (2 + m.widening_factor)
                     + t.batch_size * m.num_heads * tokens * tokens)
        activations = m.num_layers * per_layer * FLOAT
    return Estimate(params=params, state_bytes=state_bytes, grad_bytes=params * FLOAT,
                    activation_bytes=activations)


def device_memory() -> int | None:
    """Bytes of memory of one device: a GPU's as JAX reports it, else the machine's physical memory."""
    from trainer.runtime.platform import devices_summary

    reported = devices_summary()["memory_bytes"]
    if reported:
        return int(reported)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


CLI_OPTIONS = ("--emb-dim", "--num-layers", "--batch-size")
FILE_OPTIONS = ("trainer.model.emb_dim", "trainer.model.num_layers", "trainer.training.batch_size")


def check_fits(cfg: TrainConfig, num_labels: int, seq_len: int, *, runs: int = 1, data_parallel: int = 1,
               available: int | None = None, options: tuple[str, str, str] = CLI_OPTIONS) -> Estimate:
    """ModelTooLarge (one line) when `runs` runs of `cfg` on one device (a vectorized group: each run's
    state, gradients and activations) need more than its memory even at the lower bound; else the estimate
    of one run. `data_parallel`: devices sharing each batch (each holds the whole state, a share of the
    activations). `options`: how the fix names the three sizes (command-line options or config keys)."""
    est = estimate(cfg, num_labels, seq_len)
    have = available if available is not None else device_memory()
    need = (est.state_bytes + est.grad_bytes + est.activation_bytes // max(1, data_parallel)) * runs
    if have is not None and need > have:
        m = cfg.model
        raise ModelTooLarge(
            f"the model cannot fit: {est.params:,} parameters ({m.num_layers} layers of width {m.emb_dim}) need "
            f"at least {_gb(need)} to train{f' for {runs} runs at once' if runs > 1 else ''} (weights, "
            f"gradients, Adam's moments, activations), the device has {_gb(have)}; use a smaller {options[0]}, "
            f"{options[1]} or {options[2]}")
    return est
