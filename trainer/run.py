"""The run directory: `config.json`, `metrics.jsonl` (its log: `trainer.runlog`), `checkpoints/step-N/`,
`evaluations/`, `plots/`.

`config.json` holds the resolved TrainConfig, the paths and fingerprints of the shard sets, library
versions and the platform (`trainer.runtime.platform`). `RunDir` reads, checks, creates and restores it,
names what a folder is when it is not a run directory, and is the run's `RunLog`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from seqgen.atomic import atomic_write_json
from seqgen.configio import ConfigError
from seqgen.errors import notice
from seqgen.files import Optional, check_schema, describe_path, read_json_object
from seqgen.lock import FolderLock
from trainer.config import TrainConfig
from trainer.data import DataError
from trainer.runlog import RunError, RunLog
from trainer.runtime.platform import platform_record, versions

# What config.json must hold (type-checked on every read).
CONFIG_SCHEMA = {"trainer": dict, "data": {"train": {"path": str, "fingerprint": str}, "eval": Optional([dict])},
                 "versions": Optional(dict), "platform": Optional(dict)}


def run_lock(run_dir: str | os.PathLike, command: str, *, enabled: bool = True,
             folder: str | os.PathLike | None = None) -> contextlib.AbstractContextManager:
    """The writer lock of a run directory (`run_dir/.lock`; `folder` for a part of it, e.g. evaluations/):
    a second writer gets a one-line LockError naming the holder. A no-op when not `enabled` (hosts > 0)."""
    if not enabled:
        return contextlib.nullcontext()
    return FolderLock(folder if folder is not None else run_dir, command)


class RunDir(RunLog):
    """A run directory; its metrics.jsonl methods are `RunLog`'s."""

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def create(self, cfg: TrainConfig, data: dict[str, Any]) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            record = {"trainer": cfg.to_dict(), "data": data, "versions": versions(), "platform": platform_record()}
            atomic_write_json(self.config_path, record)
        except OSError as e:
            raise RunError(f"cannot write run directory {self.path}: {e.strerror or e}") from None

    def read(self) -> dict[str, Any]:
        """config.json, type-checked; RunError (one line) when missing (the folder described as it is:
        `describe`), not a readable file, not JSON or of the wrong shape."""
        if (problem := self.describe()) is not None:
            raise RunError(f"run directory {self.path} {problem}")
        try:
            return read_json_object(self.config_path, what="run config", error=RunError, schema=CONFIG_SCHEMA,
                                    fix=self._config_fix())
        except FileNotFoundError:  # removed since it was described
            raise RunError(f"run directory {self.path} has no config.json; {self._config_fix()}") from None

    def describe(self) -> str | None:
        """What this path is when it is not a usable run directory, with the fix, as the end of a one-line
        message; None when its config.json is a readable file (its content is checked by `read`)."""
        fit = f"`trainer fit --train DIR --run-dir {self.path}`"
        problem = describe_path(self.path, "dir")
        if problem is not None:
            if problem.startswith("does not exist"):
                return f"{problem}; check the path, or train a run there with {fit}"
            if "symbolic link" in problem:
                return f"{problem}; point the link at a run directory, or pass the run directory itself"
            return f"{problem}; pass the run directory (--run-dir) of a `trainer fit`"
        if os.path.lexists(self.config_path):
            problem = describe_path(self.config_path, "file")
            return None if problem is None else f"has a config.json that {problem}; {self._config_fix()}"
        steps = self._checkpoint_steps()
        if steps:
            return (f"has checkpoints (latest step {steps[-1]}) but no config.json; continue it with "
                    f"{fit[:-1]} --resume` (config.json is then restored from that checkpoint's metadata)")
        if (self.path / "manifest.json").exists():
            return f"is a shard set, not a run directory; pass the --run-dir of a `trainer fit` (or create one with {fit})"
        if self.metrics_path.exists():
            return f"has no config.json (its fit stopped before it saved anything); start it afresh with {fit}"
        return f"is not a run directory (no config.json); start one with {fit}"

    def _checkpoint_steps(self) -> list[int]:
        from trainer import checkpoint

        return checkpoint.list_steps(self.path) if (self.path / "checkpoints").is_dir() else []

    def _config_fix(self) -> str:
        steps = self._checkpoint_steps()
        if steps:
            return (f"move it aside (`mv {self.config_path} {self.config_path}.bad`) and continue the run with "
                    "`trainer fit ... --resume`, which restores it from the latest checkpoint")
        return "restore it from a copy, or start a new --run-dir"

    def restore_config(self) -> int | None:
        """Rewrite a missing config.json from the latest checkpoint's metadata (which holds the run's config and
        its data record); the step restored from, or None when there is no such checkpoint or config.json is
        there. A one-line notice says so."""
        from trainer import checkpoint

        if os.path.lexists(self.config_path):
            return None
        for step in reversed(self._checkpoint_steps()):
            meta = checkpoint.read_metadata(self.path, step)
            if isinstance(meta.get("trainer"), dict) and isinstance(meta.get("data"), dict):
                record = {"trainer": meta["trainer"], "data": meta["data"], "versions": versions(),
                          "restored_from_checkpoint": step}
                check_schema(record, CONFIG_SCHEMA, where=f"checkpoint metadata of step {step} in {self.path}",
                             error=RunError, fix="start a new --run-dir")
                atomic_write_json(self.config_path, record)
                notice(f"{self.config_path} was missing: restored it from the checkpoint of step {step}")
                return step
        return None

    def train_config(self) -> TrainConfig:
        try:
            return TrainConfig.from_dict(self.read()["trainer"])
        except ConfigError as e:
            raise RunError(f"run config {self.config_path} is invalid ({e}); restore it or start a new --run-dir") from None

    def train_path(self, override: str | os.PathLike | None = None) -> str:
        """The run's training set (`override` if given: it moved since fit), needed for its class split."""
        from seqgen.shards import describe_shard_set

        path = override or self.read()["data"]["train"]["path"]
        if (problem := describe_shard_set(path)) is not None:
            if override:
                raise DataError(f"--train {path} {problem}")
            raise DataError(f"the run's training set {path} (from {self.config_path}) {problem}; or, if it moved, "
                            "pass its new folder as --train DIR (its class split is needed)")
        return str(path)
