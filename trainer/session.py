"""What `fit` and `evaluate` share: opening shard sets, the device image table, restoring train states."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp

from seqgen.config import ExampleType
from seqgen.files import canonical_sha256
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import DataError, ShardSet, check_compatible, open_shard_set
from trainer.runtime.distributed import Topology, replicate
from trainer.images import prepare_table
from trainer.step import StepContext, TrainState, make_eval_step, state_skeleton, upgrade_state


@dataclass
class Session:
    cfg: TrainConfig
    train: ShardSet
    evals: list[ShardSet]
    topo: Topology
    table: Any  # replicated device array (uint8 images) or a placeholder for symbolic data
    ctx: StepContext
    _eval_steps: list[Any] | None = field(default=None, init=False, repr=False)

    def eval_steps(self) -> list[Any]:
        """One jitted eval step per eval set, made once (each compiles on its first call)."""
        if self._eval_steps is None:
            self._eval_steps = [make_eval_step(self.ctx, s.config) for s in self.evals]
        return self._eval_steps


def open_sets(train_path: str | os.PathLike, eval_paths: Sequence[str | os.PathLike]) -> tuple[ShardSet, list[ShardSet]]:
    train = open_shard_set(train_path)
    evals = [open_shard_set(p) for p in eval_paths]
    for e in evals:
        check_compatible(train, e)
    return train, evals


def device_table(train: ShardSet, image_size: int, topo: Topology, omniglot_dir: Any, cache_dir: Any) -> Any:
    """The image table on the device (uint8, resized once), checked against the set's fingerprint."""
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


def make_session(
    cfg: TrainConfig,
    train_path: str | os.PathLike,
    eval_paths: Sequence[str | os.PathLike],
    topo: Topology,
    *,
    omniglot_dir: Any = None,
    cache_dir: Any = "data/cache",
) -> Session:
    train, evals = open_sets(train_path, eval_paths)
    table = device_table(train, cfg.training.image_size, topo, omniglot_dir, cache_dir)
    return Session(cfg, train, evals, topo, table, StepContext.create(cfg, train.config))


def restore(run_dir: str | os.PathLike, step: int, cfg: TrainConfig, num_classes: int, topo: Topology) -> TrainState:
    return replicate(topo, load_state(run_dir, step, cfg, num_classes))


def load_state(run_dir: str | os.PathLike, step: int, cfg: TrainConfig, num_classes: int) -> TrainState:
    """Checkpoint `step` read into this process only (no collective), upgraded to the current layout."""
    version = checkpoint.read_metadata(run_dir, step)["format_version"]
    state = checkpoint.load(run_dir, step, state_skeleton(cfg, num_classes, version))
    return upgrade_state(state, version)


def manifest_fingerprint(s: ShardSet) -> str:
    """sha256 of the manifest (which lists every shard's sha256): identifies a shard set's content."""
    return canonical_sha256(s.manifest, spaced=True)  # the form stored in every run's config.json


def data_record(train: ShardSet, evals: list[ShardSet]) -> dict[str, Any]:
    """Paths and fingerprints of the shard sets, saved in config.json and checkpoints."""

    def one(s: ShardSet) -> dict[str, Any]:
        return {
            "path": str(Path(s.path).resolve()),
            "seq_type": s.config.seq_type.value,
            "fingerprint": manifest_fingerprint(s),
        }

    return {
        "train": one(train),
        "eval": [one(e) for e in evals],
        "num_labels": train.num_labels,
        "ways": train.config.sequence.ways,
        "n_holdout": train.config.split.n_holdout_classes,
    }
