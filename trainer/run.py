"""The run directory: `config.json`, `metrics.jsonl`, `checkpoints/step-N/`, `evaluations/`, `plots/`.

`config.json` holds the resolved TrainConfig, the paths and fingerprints of the shard sets, and library
versions. `metrics.jsonl` gets one JSON object per line, appended and flushed:
  {"step": 100, "kind": "train", "metrics": {"loss": .., "accuracy_query": .., ...}}
  {"step": 5000, "kind": "eval", "set": "fewshot_holdout", "seq_type": "fewshot_holdout", "source": "fit",
   "metrics": {"accuracy_closed": {"mean": .., "ci95": [lo, hi], "n": 2048}, ...}}
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from pathlib import Path
from typing import Any, Iterator

from seqgen.atomic import atomic_write_json, atomic_write_text
from seqgen.config import ConfigError
from seqgen.errors import UserError
from seqgen.files import Optional, read_json_object, read_jsonl_objects
from seqgen.lock import FolderLock
from trainer.config import TrainConfig

# What config.json and each metrics.jsonl record must hold (type-checked on every read).
CONFIG_SCHEMA = {"trainer": dict, "data": {"train": {"path": str, "fingerprint": str}, "eval": Optional([dict])},
                 "versions": Optional(dict)}
METRICS_SCHEMA = {"step": int, "kind": Optional(str), "set": Optional(str), "source": Optional(str),
                  "metrics": Optional(dict)}


class RunError(UserError):
    """A run directory that cannot be used as asked; one-line message."""


def versions() -> dict[str, str]:
    import equinox
    import h5py
    import jax
    import numpy
    import optax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "backend": jax.default_backend(),
    }


def run_lock(run_dir: str | os.PathLike, command: str, *, enabled: bool = True,
             folder: str | os.PathLike | None = None) -> contextlib.AbstractContextManager:
    """The writer lock of a run directory (`run_dir/.lock`; `folder` for a part of it, e.g. evaluations/):
    a second writer gets a one-line LockError naming the holder. A no-op when not `enabled` (hosts > 0)."""
    if not enabled:
        return contextlib.nullcontext()
    return FolderLock(folder if folder is not None else run_dir, command)


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    @property
    def evaluations_dir(self) -> Path:
        return self.path / "evaluations"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def create(self, cfg: TrainConfig, data: dict[str, Any]) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            record = {"trainer": cfg.to_dict(), "data": data, "versions": versions()}
            atomic_write_json(self.config_path, record)
        except OSError as e:
            raise RunError(f"cannot write run directory {self.path}: {e.strerror or e}") from None

    def read(self) -> dict[str, Any]:
        """config.json, type-checked; RunError (one line) when missing, not JSON or of the wrong shape."""
        try:
            return read_json_object(self.config_path, what="run config", error=RunError, schema=CONFIG_SCHEMA,
                                    fix="restore it or start a new --run-dir")
        except FileNotFoundError:
            raise RunError(f"{self.path} is not a run directory (no config.json); start one with `trainer fit`") from None

    def train_config(self) -> TrainConfig:
        try:
            return TrainConfig.from_dict(self.read()["trainer"])
        except ConfigError as e:
            raise RunError(f"run config {self.config_path} is invalid ({e}); restore it or start a new --run-dir") from None

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a record is on disk before the checkpoint that follows it

    def read_metrics(self) -> Iterator[dict[str, Any]]:
        """The records of metrics.jsonl; a line cut by a hard kill is skipped, a line that is JSON but not a
        record (edited file) is a one-line RunError."""
        if not self.metrics_path.is_file():
            return
        yield from read_jsonl_objects(self.metrics_path, what="metrics file", error=RunError, schema=METRICS_SCHEMA,
                                      fix="delete or repair that line", allow_nan=True)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint we restart from (they will be redone)."""
        if not self.metrics_path.is_file():
            return
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step or r.get("source") == "watch"]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
