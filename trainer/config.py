"""Typed, frozen configuration of a training run.

`TrainConfig` = model (`trainer.models.ModelConfig`) + optimizer + training loop options. It is built once
at the entry point (defaults < `[trainer.*]` tables of a TOML file < command-line options), saved verbatim
into the run directory and every checkpoint, and checkpoints are loaded by rebuilding the model from it.

Defaults are the paper's `images_all_exemplars` config: Adam, linear warm-up over 4000 steps to 3e-4 then
inverse-square-root decay, batch 32, 500k steps, loss on the query only, no gradient clipping (the
original config lists `clip_level=0.25` but its update never applies it; `clip_norm` offers it, off by
default).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from seqgen.cliopts import ConfigOption, ConfigOptions
from seqgen.configio import ConfigError, apply_overrides, check_finite, documented, from_plain, to_plain
from trainer.models.config import ModelConfig


class ScheduleKind(str, enum.Enum):
    EVERY = "every"
    LOG = "log"
    LIST = "list"


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam with linear warm-up then inverse-square-root decay, optional clipping and regularisers."""

    max_lr: float = documented(3e-4, "Peak learning rate, reached after warm-up.")
    warmup_steps: int = documented(4000, "Linear warm-up steps.")
    b1: float = documented(0.9, "Adam's b1.")
    b2: float = documented(0.999, "Adam's b2.")
    eps: float = documented(1e-8, "Adam's eps.")
    clip_norm: float | None = documented(None, "Global-norm gradient clipping (none: off, as the original's update).")
    # Regularisers (beyond the paper; trainer/state.py and docs/analysis.md)
    weight_decay: float = documented(
        0.0, "Decoupled weight decay, optax.adamw's (Loshchilov & Hutter 2019: scaled by the scheduled learning "
        "rate), on the arrays decay_mask selects.")
    l2: float = documented(0.0, "Classic L2 penalty: (l2/2)*||theta||^2 added to the loss (its gradient goes "
                           "through Adam), on the arrays decay_mask selects.")
    decay_mask: str = documented("weights", "What weight_decay and l2 act on: \"weights\" (biases, LayerNorm / "
                                 "BatchNorm scales and offsets excluded) or \"all\".")


class NoiseAt(str, enum.Enum):
    SOURCE = "source"
    TRAINING = "training"


@dataclass(frozen=True)
class TrainingConfig:
    """The training loop: length, batch, seed, loss, and when to log, evaluate and checkpoint."""

    steps: int = documented(500_000, "Training steps.")
    batch_size: int = documented(32, "Global batch size (sequences per step).")
    seed: int = documented(0, "Root seed of model init and dropout.")
    w_interim_predictions: float = documented(0.0, "Loss weight of the interim predictions (0: the query only).")
    image_size: int = documented(105, "Image side in pixels (28: the original's `downsample` option).")
    noise_at: NoiseAt = documented(
        NoiseAt.SOURCE, "Where the pixel noise of a set with noise_scale is drawn: \"source\" at 105 px, then "
        "resized with the image (the original's downsample path; at 28 px the noise keeps 0.65 of its "
        "standard deviation), or \"training\" at image_size (the model sees noise of std noise_scale).")
    # Each jitted call has a fixed cost (XLA's scratch memory is mapped and page-faulted afresh; docs/speed.md),
    # which 10 steps per call amortise.
    steps_per_dispatch: int = documented(10, "Steps per jitted call (lax.scan): the same arithmetic up to float "
                                         "round-off, less overhead.")
    log_every: int = documented(100, "Steps between training-loss log lines.")
    eval_every: int = documented(5000, "Steps between evaluations (with eval_schedule every).")
    eval_seqs: int = documented(2048, "Sequences per eval set at each evaluation (the whole set if smaller).")
    eval_batch_size: int = documented(256, "Sequences per batch of fit's evaluations.")
    checkpoint_every: int = documented(5000, "Steps between checkpoints (with checkpoint_schedule every).")
    keep_checkpoints: int = documented(3, "Most recent complete checkpoints kept (0: keep all).")
    # When to evaluate / checkpoint (trainer/schedule.py); always at the last step too.
    eval_schedule: ScheduleKind = documented(
        ScheduleKind.EVERY, "When to evaluate: every eval_every steps, log-spaced (eval_per_decade points per "
        "factor of 10 in steps), or at the listed eval_steps.")
    eval_steps: tuple[int, ...] = documented((), "Steps to evaluate at with eval_schedule list.")
    eval_per_decade: int = documented(10, "Evaluations per factor of 10 in steps with eval_schedule log.")
    checkpoint_schedule: ScheduleKind = documented(
        ScheduleKind.EVERY, "When to checkpoint: every checkpoint_every steps, log-spaced (checkpoint_per_decade "
        "points per factor of 10 in steps), or at the listed checkpoint_steps.")
    checkpoint_steps: tuple[int, ...] = documented((), "Steps to checkpoint at with checkpoint_schedule list.")
    checkpoint_per_decade: int = documented(10, "Checkpoints per factor of 10 in steps with checkpoint_schedule log.")


class Precision(str, enum.Enum):
    FLOAT32 = "float32"
    TF32 = "tf32"
    BFLOAT16 = "bfloat16"


class KernelPath(str, enum.Enum):
    AUTO = "auto"
    CUSTOM = "custom"
    XLA = "xla"


class LayerLoop(str, enum.Enum):
    AUTO = "auto"
    UNROLL = "unroll"
    SCAN = "scan"


class CpuIsa(str, enum.Enum):
    NATIVE = "native"
    AVX512 = "avx512"
    AVX2 = "avx2"
    AVX = "avx"
    SSE4_2 = "sse4_2"


@dataclass(frozen=True)
class ComputeConfig:
    """How the run is computed, never what: each choice changes float round-off only (docs/gpu.md).

    `trainer.runtime.platform.resolve_compute` turns "auto" into the concrete choice before a run starts, and
    the run's config.json records that, so a run's numbers can be traced to how they were computed and a
    resume that would compute differently is refused."""

    precision: Precision = documented(
        Precision.FLOAT32, "Matmul / convolution precision: float32 (full float32 everywhere: the CPU's numbers), "
        "tf32 (TensorFloat-32 matmuls on NVIDIA GPUs) or bfloat16 (float32 parameters and optimizer, bfloat16 "
        "compute).")
    kernels: KernelPath = documented(
        KernelPath.AUTO, "Kernel path: custom (hand-written kernels), xla (XLA's ops) or auto "
        "($EMERGENT_ICL_KERNELS, else custom on the CPU, xla elsewhere).")
    layer_loop: LayerLoop = documented(
        LayerLoop.AUTO, "Transformer layer loop: unroll, scan, or auto ($EMERGENT_ICL_LAYERS, else unroll).")
    deterministic: bool = documented(
        True, "Deterministic GPU kernels (XLA's --xla_gpu_deterministic_ops; no effect on the CPU); "
        "--no-deterministic trades bitwise reproducibility for speed.")
    cpu_isa: CpuIsa = documented(
        CpuIsa.NATIVE, "Cap XLA's CPU code at this instruction set (XLA's --xla_cpu_max_isa), so that CPUs of "
        "different vector widths compute alike (docs/gpu.md); native: the host's widest. Set before JAX starts.")


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run: model, optimizer, training loop, and how it is computed."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "The model (trainer.models)."})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"doc": "The optimizer."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"doc": "The training loop."})
    compute: ComputeConfig = field(default_factory=ComputeConfig,
                                   metadata={"doc": "How it is computed (precision, kernels, layer loop)."})

    def validate(self) -> "TrainConfig":
        t, o = self.training, self.optimizer
        check_finite(self)
        checks = [
            (t.steps >= 1, f"steps must be >= 1, got {t.steps}"),
            (t.batch_size >= 1, f"batch_size must be >= 1, got {t.batch_size}"),
            (t.image_size >= 8, f"image_size must be >= 8, got {t.image_size}"),
            (t.steps_per_dispatch >= 1, f"steps_per_dispatch must be >= 1, got {t.steps_per_dispatch}"),
            (t.log_every >= 1, f"log_every must be >= 1, got {t.log_every}"),
            (t.eval_every >= 1, f"eval_every must be >= 1, got {t.eval_every}"),
            (t.eval_seqs >= 1, f"eval_seqs must be >= 1, got {t.eval_seqs}"),
            (t.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {t.eval_batch_size}"),
            (t.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {t.checkpoint_every}"),
            (t.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0, got {t.keep_checkpoints}"),
            (0.0 <= t.w_interim_predictions < 1.0, "w_interim_predictions must be in [0, 1)"),
            (o.max_lr > 0, f"max_lr must be > 0, got {o.max_lr}"),
            (0.0 <= o.b1 < 1.0, f"b1 (Adam) must be in [0, 1), got {o.b1}"),
            (0.0 <= o.b2 < 1.0, f"b2 (Adam) must be in [0, 1), got {o.b2}"),
            (o.eps >= 0, f"eps (Adam) must be >= 0, got {o.eps}"),
            (o.warmup_steps >= 1, f"warmup_steps must be >= 1, got {o.warmup_steps}"),
            (o.clip_norm is None or o.clip_norm > 0, "clip_norm must be > 0 (or omitted for no clipping)"),
            (0 <= t.seed < 2**31, f"seed must be in [0, 2**31), got {t.seed}"),
            (o.weight_decay >= 0, f"weight_decay must be >= 0, got {o.weight_decay}"),
            (o.l2 >= 0, f"l2 must be >= 0, got {o.l2}"),
            (o.decay_mask in ("weights", "all"), f"decay_mask must be \"weights\" or \"all\", got {o.decay_mask!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

        problem = schedule_problem(t)
        if problem:
            raise ConfigError(problem)
        if self.model.concatenate_labels and t.w_interim_predictions:
            raise ConfigError("w_interim_predictions needs interleaved labels; drop concatenate_labels")
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_plain(cls, data, "trainer.")


# Options that change only how the loop reports and saves, not what a run computes: a resumed run keeps its
# stored values unless the command line names them (`trainer.resume`), and a sweep's run directory is still
# its run when they differ (`trainer.sweep.plan`). `training.steps` is not among them: a run with more
# steps is the same run continued, which each of those callers handles itself.
BOOKKEEPING = frozenset({
    "training.eval_seqs", "training.eval_every", "training.eval_batch_size", "training.log_every",
    "training.checkpoint_every", "training.keep_checkpoints", "training.steps_per_dispatch",
})

# The compute settings ([trainer.compute]; docs/gpu.md).
COMPUTE_FIELDS = ("compute.precision", "compute.kernels", "compute.layer_loop", "compute.deterministic",
                  "compute.cpu_isa")
# The TrainConfig fields that `trainer fit` sets from its command line, in --help order (trainer/cli.py
# declares them from this table; resume messages name options by it). Name, type, help text and shown
# default come from the fields (seqgen.cliopts).
FIT_OPTIONS = ConfigOptions(
    TrainConfig,
    "training.steps", "training.batch_size", "training.seed", "training.image_size",
    ConfigOption("optimizer.max_lr", "--lr"), "optimizer.warmup_steps", "optimizer.clip_norm",
    "optimizer.weight_decay", "optimizer.l2", ConfigOption("training.w_interim_predictions", "--w-interim"),
    "model.seq_model", "model.example_encoding", "model.num_layers", "model.num_heads", "model.emb_dim",
    "training.log_every", "training.eval_every", "training.eval_seqs", "training.checkpoint_every",
    "training.steps_per_dispatch", *COMPUTE_FIELDS,
)
# `trainer doctor`'s options: the compute settings a run would use.
COMPUTE_OPTIONS = ConfigOptions(TrainConfig, *COMPUTE_FIELDS)


def train_config_from_toml(data: dict[str, Any]) -> TrainConfig:
    """The trainer part of a config file: the `[trainer]` table (`[seqgen]` belongs to seqgen)."""
    return TrainConfig.from_dict(data.get("trainer", {}))


def with_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Apply dotted overrides such as {"training.steps": 10}; None values are skipped (option not given)."""
    return TrainConfig.from_dict(apply_overrides(cfg.to_dict(), overrides))


def schedule_problem(t: TrainingConfig) -> str | None:
    """A one-line problem with the schedule options of a TrainingConfig, or None."""
    for what in ("eval", "checkpoint"):
        kind, steps, per = (getattr(t, f"{what}_schedule"), getattr(t, f"{what}_steps"),
                            getattr(t, f"{what}_per_decade"))
        if per < 1:
            return f"{what}_per_decade must be >= 1, got {per}"
        if kind is ScheduleKind.LIST and not steps:
            return f"{what}_schedule = \"list\" needs {what}_steps = [...] (the steps to {what} at)"
        if any(isinstance(s, bool) or s < 1 for s in steps):
            return f"{what}_steps must be positive step numbers, got {list(steps)}"
        if steps and kind is not ScheduleKind.LIST:
            return f"{what}_steps is given but {what}_schedule is {kind.value!r}; set {what}_schedule = \"list\""
    return None
