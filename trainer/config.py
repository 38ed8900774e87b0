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
from dataclasses import dataclass, field
from typing import Any

from seqgen.config import ConfigError, check_finite, from_plain, to_plain
from trainer.models.config import ModelConfig
from trainer.schedule import ScheduleKind


@dataclass(frozen=True)
class OptimizerConfig:
    max_lr: float = 3e-4
    warmup_steps: int = 4000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = None  # global-norm gradient clipping; None = off (as the original's update)
    # Regularisers (beyond the paper; trainer/state.py). weight_decay: decoupled, optax.adamw's
    # update (Loshchilov & Hutter 2019, the decay scaled by the scheduled learning rate); l2: classic L2,
    # (l2 / 2) * ||theta||^2 added to the loss (its gradient goes through Adam). Both act on the arrays
    # that decay_mask selects: "weights" (biases, LayerNorm / BatchNorm scales and offsets excluded) or "all".
    weight_decay: float = 0.0
    l2: float = 0.0
    decay_mask: str = "weights"


@dataclass(frozen=True)
class TrainingConfig:
    steps: int = 500_000
    batch_size: int = 32
    seed: int = 0
    w_interim_predictions: float = 0.0
    image_size: int = 105  # 28 = the original's `downsample` option
    # Steps per jitted call (lax.scan): the same arithmetic up to float round-off. Each call has a fixed
    # cost (XLA's scratch memory is mapped and page-faulted afresh; README, Speed), which 10 amortises.
    steps_per_dispatch: int = 10
    log_every: int = 100
    eval_every: int = 5000
    eval_seqs: int = 2048  # sequences per eval set at each evaluation (whole set if smaller)
    eval_batch_size: int = 256
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3  # most recent complete checkpoints kept (0 = keep all)
    # When to evaluate / checkpoint (trainer/schedule.py): "every" N steps (default), "log" (per_decade
    # points per factor of 10 in steps), or "list" (the listed steps); always at the last step too.
    eval_schedule: ScheduleKind = ScheduleKind.EVERY
    eval_steps: tuple[int, ...] = ()
    eval_per_decade: int = 10
    checkpoint_schedule: ScheduleKind = ScheduleKind.EVERY
    checkpoint_steps: tuple[int, ...] = ()
    checkpoint_per_decade: int = 10


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

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
        from trainer.schedule import check as check_schedules

        problem = check_schedules(t)
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


def train_config_from_toml(data: dict[str, Any]) -> TrainConfig:
    """The trainer part of a config file: the `[trainer]` table (`[seqgen]` belongs to seqgen)."""
    return TrainConfig.from_dict(data.get("trainer", {}))


def with_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Apply dotted overrides such as {"training.steps": 10}; None values are skipped (option not given)."""
    data = cfg.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = to_plain(value)
    return TrainConfig.from_dict(data)
