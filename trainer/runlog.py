"""A run's log, `metrics.jsonl`: the training records and THE evaluation store (`RunLog`, which `RunDir` is).

One JSON object per line, appended whole and fsynced:
  {"step": 100, "kind": "train", "metrics": {"loss": .., "accuracy_query": .., ...}}
  {"step": 5000, "kind": "eval", "set": "fewshot_holdout", "seq_type": "fewshot_holdout", "source": "fit",
   "metrics": {"accuracy_closed": {"mean": .., "ci95": [lo, hi], "n": 2048}, ...}}

metrics.jsonl is the ONE record of every evaluation of the run: one `"kind": "eval"` line (an `Evaluation`)
per checkpoint step and set, whoever made it (`"source"`: "fit", "watch" for `trainer evaluate --watch`,
"evaluate" for `trainer evaluate`; the latter two also record `"max_seqs"`). It is also what a sweep's
results folder keeps. Every writer goes through `RunLog.record_evaluation`, every reader through
`RunLog.evaluations` / `RunLog.final_evaluations`.
`evaluations/step-N.json` is DERIVED from it, for people and tools that want one file per checkpoint: the
latest "evaluate" / "watch" evaluation of each set at step N, rewritten by `record_evaluation` after each
such evaluation; it is never read back as a source.
Precedence (`final_evaluations`): of a set at a step, the evaluation that covered the most sequences; among
equals the run's own curve (fit / watch), else the latest "evaluate" record.
Writers of metrics.jsonl (appends, and the rewrite of `fit --resume`) hold a short flock on `.metrics.lock`
in the run directory, so that an evaluation appended by another process during a rewrite is kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from seqgen.atomic import atomic_write_json, atomic_write_text
from seqgen.errors import UserError
from seqgen.files import Optional, check_path, check_schema, describe_path, read_json_object, read_jsonl_objects
from seqgen.jsonlog import append_line, settle_tail

if TYPE_CHECKING:
    from trainer.sinks import Sink

# What each metrics.jsonl record must hold (type-checked on every read).
METRICS_SCHEMA = {"step": int, "kind": Optional(str), "set": Optional(str), "source": Optional(str),
                  "metrics": Optional(dict)}
EVAL_RECORD_SCHEMA = {"step": int, "kind": str, "set": str, "seq_type": str, "source": Optional(str),
                      "metrics": dict, "max_seqs": Optional(int)}
# evaluations/step-N.json (derived; and the only record of `trainer evaluate` in older run directories)
EVALUATION_SCHEMA = {"step": int, "sets": [{"set": str, "seq_type": str, "metrics": dict,
                                            "source": Optional(str), "max_seqs": Optional(int)}]}
CURVE_SOURCES = ("fit", "watch")  # evaluations at the run's own eval size, every scheduled step
METRICS_LOCK = ".metrics.lock"  # flocked by every writer of metrics.jsonl (RunLog._metrics_writer)


class RunError(UserError):
    """A run directory that cannot be used as asked; one-line message."""


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


class RunLog:
    """metrics.jsonl of the run directory `path` (and its derived evaluations/)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        # live tracking (`trainer.sinks.mirrored`): gets a copy of each record appended, after the append
        self.sink: Sink | None = None

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def evaluations_dir(self) -> Path:
        return self.path / "evaluations"

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


def series(run: RunLog) -> tuple[dict[str, list[tuple[int, Any]]], dict[tuple[str, str], list[tuple[int, dict]]]]:
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
