"""Which backward passes the model uses: the hand-written ones ("custom") or XLA's own ops with autodiff
("xla"). A speed switch, not a model property: both compute the same function and, up to float round-off,
the same gradients (tests/test_kernel_paths.py), and it is not part of any config or checkpoint.

The custom VJPs (convolution as patch matmuls, BatchNorm, LayerNorm, GELU, causal attention, ReLU +
max-pool) were chosen by CPU measurements; on a GPU, XLA's own convolution, reduce-window and fused
attention may be faster. Default: "custom" on the CPU, "xla" elsewhere (`jax.default_backend()`);
`EMERGENT_ICL_KERNELS=custom|xla|auto` overrides it, and `use_kernels(...)` does within a block.

The choice is read when a function is traced: set it before the first jitted step (a function already
compiled keeps the path it was traced with).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import jax

from seqgen.errors import UserError

PATHS = ("custom", "xla")
ENV = "EMERGENT_ICL_KERNELS"
_override: str | None = None


class KernelPathError(UserError, ValueError):
    """An unknown kernel path name; one-line message."""


def _check(name: str) -> str:
    if name not in (*PATHS, "auto"):
        raise KernelPathError(f"{ENV}={name!r} is not a kernel path; use custom, xla or auto")
    return name


def kernel_path() -> str:
    """"custom" or "xla": the override of `use_kernels`, else $EMERGENT_ICL_KERNELS, else by platform."""
    name = _override or _check(os.environ.get(ENV, "auto").strip().lower() or "auto")
    if name == "auto":
        return "custom" if jax.default_backend() == "cpu" else "xla"
    return name


def custom_kernels() -> bool:
    return kernel_path() == "custom"


@contextlib.contextmanager
def use_kernels(name: str) -> Iterator[None]:
    """Trace the model with kernel path `name` ("custom", "xla" or "auto") inside the block."""
    global _override
    previous, _override = _override, _check(name)
    try:
        yield
    finally:
        _override = previous
