"""The run directory: `config.json`, `metrics.jsonl`, `checkpoints/step-N/`, `evaluations/`, `plots/`.

`config.json` holds the resolved TrainConfig, the paths and fingerprints of the shard sets, and library
versions. `metrics.jsonl` gets one JSON object per line, appended and flushed:
  {"step": 100, "kind": "train", "metrics": {"loss": .., "accuracy_query": .., ...}}
  {"step": 5000, "kind": "eval", "set": "fewshot_holdout", "seq_type": "fewshot_holdout", "source": "fit",
   "metrics": {"accuracy_closed": {"mean": .., "ci95": [lo, hi], "n": 2048}, ...}}

The evaluation store. metrics.jsonl is the ONE record of every evaluation of the run: one `"kind": "eval"`
line (an `Evaluation`) per checkpoint step and set, whoever made it (`"source"`: "fit", "watch" for
`trainer evaluate --watch`, "evaluate" for `trainer evaluate`; the latter two also record `"max_seqs"`).
It is also what a sweep's results folder keeps. Every writer goes through `RunDir.record_evaluation`,
every reader through `RunDir.evaluations` / `RunDir.final_evaluations`.
`evaluations/step-N.json` is DERIVED from it, for people and tools that want one file per checkpoint: the
latest "evaluate" / "watch" evaluation of each set at step N, rewritten by `record_evaluation` after each
such evaluation; it is never read back as a source.
Precedence (`final_evaluations`): the run's own curve (fit / watch records, at the run's eval size) wins at a
step; an "evaluate" record (any --max-seqs) counts where the curve has none, the latest of each set.
Writers of metrics.jsonl (appends, and the rewrite of `fit --resume`) hold a short flock on `.metrics.lock`
in the run directory, so that an evaluation appended by another process during a rewrite is kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from seqgen.atomic import atomic_write_json, atomic_write_text
from seqgen.configio import ConfigError
from seqgen.errors import UserError, notice
from seqgen.files import Optional, check_path, check_schema, describe_path, read_json_object, read_jsonl_objects
from seqgen.jsonlog import append_line, settle_tail
from seqgen.lock import FolderLock
from trainer.config import TrainConfig
from trainer.data import DataError
from trainer.runtime.platform import platform_record

if TYPE_CHECKING:
    from trainer.sinks import Sink

# What config.json and each metrics.jsonl record must hold (type-checked on every read).
CONFIG_SCHEMA = {"trainer": dict, "data": {"train": {"path": str, "fingerprint": str}, "eval": Optional([dict])},
                 "versions": Optional(dict), "platform": Optional(dict)}
METRICS_SCHEMA = {"step": int, "kind": Optional(str), "set": Optional(str), "source": Optional(str),
                  "metrics": Optional(dict)}
EVAL_RECORD_SCHEMA = {"step": int, "kind": str, "set": str, "seq_type": str, "source": Optional(str),
                      "metrics": dict, "max_seqs": Optional(int)}
# evaluations/step-N.json (derived; and the only record of `trainer evaluate` in older run directories)
EVALUATION_SCHEMA = {"step": int, "sets": [{"set": str, "seq_type": str, "metrics": dict,
                                            "source": Optional(str), "max_seqs": Optional(int)}]}
CURVE_SOURCES = ("fit", "watch")  # evaluations at the run's own eval size, every scheduled step
METRICS_LOCK = ".metrics.lock"  # flocked by every writer of metrics.jsonl (RunDir._metrics_writer)


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


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of one checkpoint on one eval set: a `"kind": "eval"` line of metrics.jsonl."""

    step: int
    set: str  # the eval set's folder name
    seq_type: str
    source: str  # "fit", "watch" or "evaluate"
    metrics: dict[str, dict[str, Any]]  # {metric: {"mean", "ci95", "n"}}
    max_seqs: int | None = None  # of `trainer evaluate` (--max-seqs); fit's size is its config's eval_seqs

    @property
    def seqs(self) -> int:
        """How many sequences it covered: the largest `n` of its metrics (0 when none says)."""
        return max((int(m.get("n") or 0) for m in self.metrics.values() if isinstance(m, dict)), default=0)

    def to_record(self) -> dict[str, Any]:
        record = {"step": self.step, "kind": "eval", "source": self.source, "set": self.set,
                  "seq_type": self.seq_type, "metrics": self.metrics}
        if self.source != "fit":
            record["max_seqs"] = self.max_seqs
        return record

    @classmethod
    def from_record(cls, r: dict[str, Any], where: str) -> "Evaluation":
        check_schema(r, EVAL_RECORD_SCHEMA, where=where, error=RunError, fix="delete or repair that line")
        return cls(r["step"], r["set"], r["seq_type"], r.get("source") or "fit", r["metrics"], r.get("max_seqs"))


def read_evaluation(path: Path) -> dict[str, Any] | None:
    """evaluations/step-N.json, type-checked (None when absent); RunError (one line) when malformed."""
    try:
        return read_json_object(path, what="evaluation", error=RunError, schema=EVALUATION_SCHEMA,
                                fix="delete it and evaluate that step again", allow_nan=True)  # a diverged loss
    except FileNotFoundError:
        return None


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # live tracking (`trainer.sinks.mirrored`): gets a copy of each record appended, after the append
        self.sink: Sink | None = None

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

    @contextlib.contextmanager
    def _metrics_writer(self) -> Iterator[None]:
        """Serialises the writers of metrics.jsonl across processes: fit appends and, on --resume, rewrites
        it, while `trainer evaluate [--watch]` may append to it; without this, an evaluation appended between
        the rewrite's read and its replace would be lost. A short blocking flock on METRICS_LOCK."""
        self._check_metrics_file()
        lock = self.path / METRICS_LOCK
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
        except OSError as e:
            problem = describe_path(lock, "file") or f"cannot be created ({e.strerror or e})"
            raise RunError(f"the metrics lock {lock} {problem}; make {self.path} writable by you (and {lock} a "
                           "plain file, or remove it: it is made again)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one record (a line) to metrics.jsonl, whole, and fsync it (`seqgen.jsonlog`): a cut last line
        left by a crash is first moved aside (never glued onto); a failed append (a full disk) leaves the file
        as it was and is one line (LogWriteError)."""
        line = json.dumps(record, sort_keys=True)
        with self._metrics_writer():
            settle_tail(self.metrics_path)
            append_line(self.metrics_path, line)  # on disk before the checkpoint that follows it
        if self.sink is not None:  # a mirror of the log: only what it holds (never raises: trainer.sinks)
            self.sink.write(record)

    # ---- the evaluation store -----------------------------------------------------------------------------
    def record_evaluation(self, evaluation: Evaluation) -> None:
        """THE writer of evaluations: one line of metrics.jsonl; for "evaluate" / "watch" also the derived
        evaluations/step-N.json."""
        self.append_metrics(evaluation.to_record())
        if evaluation.source != "fit":
            self._write_step_view(evaluation.step)

    def evaluations(self, step: int | None = None) -> list[Evaluation]:
        """Every evaluation of the run (at `step` only, if given), in the order they were made."""
        where = f"metrics file {self.metrics_path}"
        return [Evaluation.from_record(r, where) for r in self.read_metrics()
                if r.get("kind") == "eval" and (step is None or r["step"] == step)]

    def final_evaluations(self, step: int, set_names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{set name: metrics} of the evaluations at `step` of the named sets: of a set, the one that covered
        the most sequences (a final evaluation on a whole set beats fit's, made on `eval_seqs`); among equals
        the latest curve record (fit / watch), else the latest "evaluate" record. Sets never evaluated at
        `step` are absent."""
        wanted, best = set(set_names), {}
        for e in self.evaluations(step):
            if e.set in wanted:
                rank = (e.seqs, e.source in CURVE_SOURCES)
                if e.set not in best or rank >= best[e.set][0]:
                    best[e.set] = (rank, e.metrics)
        return {name: metrics for name, (_, metrics) in best.items()}

    def _write_step_view(self, step: int) -> None:
        """evaluations/step-N.json from the store: the latest "evaluate" / "watch" evaluation of each set."""
        latest: dict[str, Evaluation] = {}
        for e in self.evaluations(step):
            if e.source != "fit":
                latest.pop(e.set, None)
                latest[e.set] = e  # re-inserted: the sets in the order of their latest evaluation
        sets = [{"set": e.set, "seq_type": e.seq_type, "metrics": e.metrics, "source": e.source,
                 "max_seqs": e.max_seqs} for e in latest.values()]
        newest = sets[-1] if sets else {}
        record = {"step": step, "time": time.time(), "source": newest.get("source"),
                  "max_seqs": newest.get("max_seqs"), "sets": sets}
        self.evaluations_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.evaluations_dir / f"step-{step}.json", record, allow_nan=True)  # a diverged loss

    def read_metrics(self) -> Iterator[dict[str, Any]]:
        """The records of metrics.jsonl. A last line cut by a crash is moved aside first where this run
        directory has a metrics lock to take (`seqgen.jsonlog.settle_tail`; a copy elsewhere, e.g. a sweep's
        results folder, is only read: the cut line is skipped); a corrupt line before it, or a line that is JSON
        but not a record (edited file), is a one-line RunError naming the line and the fix."""
        if not os.path.lexists(self.metrics_path):
            return
        self._check_metrics_file()
        lock = self.path / METRICS_LOCK
        if lock.is_file() and os.access(lock, os.R_OK) and os.access(self.path, os.W_OK):
            with self._metrics_writer():
                settle_tail(self.metrics_path)
                records = list(self._records())
        else:
            records = list(self._records())
        yield from records

    def _check_metrics_file(self) -> None:
        """metrics.jsonl, where there is one, must be a readable file (not a directory, a broken link, ...)."""
        if os.path.lexists(self.metrics_path):
            aside = f"{self.metrics_path}.aside"
            check_path(self.metrics_path, "file", what="metrics file", error=RunError,
                       fix=f"move it out of the way (`mv {self.metrics_path} {aside}`); the run's records then start "
                           "again from the next one (--resume redoes the evaluations it misses)")

    def _records(self) -> Iterator[dict[str, Any]]:
        """The records of metrics.jsonl as they are (no lock taken; a cut last line skipped)."""
        if not self.metrics_path.is_file():
            return
        yield from read_jsonl_objects(self.metrics_path, what="metrics file", error=RunError, schema=METRICS_SCHEMA,
                                      fix="delete or repair that line", allow_nan=True)

    def truncate_metrics_after(self, step: int) -> None:
        """On resume, drop fit's records logged after the checkpoint we restart from (they will be redone);
        the evaluations of `trainer evaluate` (and --watch) are kept. A cut last line is moved aside first; a
        corrupt line before it is refused (RunError naming it), never dropped with the rest."""
        if not os.path.lexists(self.metrics_path):
            return
        with self._metrics_writer():
            settle_tail(self.metrics_path)
            kept = [r for r in self._records()
                    if r.get("step", 0) <= step or r.get("source") in ("watch", "evaluate")]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def series(run: RunDir) -> tuple[dict[str, list[tuple[int, Any]]], dict[tuple[str, str], list[tuple[int, dict]]]]:
    """(train metrics {name: [(step, value)]}, curve evaluations {(set, seq_type): [(step, metrics)]}) of a run:
    the training log, and the fit / watch evaluations in step order (a re-evaluated step keeps its latest
    record). What `trainer plot` draws and `trainer.api`'s `Run.metrics` holds."""
    train: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    evals: dict[tuple[str, str], list[tuple[int, dict]]] = defaultdict(list)
    for r in run.read_metrics():
        if r.get("kind") == "train":
            for k, v in r["metrics"].items():
                train[k].append((r["step"], v))
    for e in run.evaluations():
        if e.source in CURVE_SOURCES:
            evals[(e.set, e.seq_type)].append((e.step, e.metrics))
    for key in evals:
        by_step = {s: m for s, m in evals[key]}  # a re-evaluated step keeps its latest record
        evals[key] = sorted(by_step.items())
    return train, evals
