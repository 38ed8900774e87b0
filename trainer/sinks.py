"""Live tracking: each record appended to a run's metrics.jsonl, mirrored to TensorBoard and / or W&B.

metrics.jsonl stays the source of truth (`trainer.runlog`). A sink gets a copy of each record as it is appended
(`RunDir.append_metrics`, the one place that appends), so it sees exactly the log's records, when the log
gets them: one per logging window of training, one per evaluation of a set. Nothing is added to the train
step, and a sink never writes anything the log does not hold.

- `tensorboard`: event files written with tensorboardX's protobufs (no TensorFlow), directly in the run
  directory, one file per command (`events.out.tfevents.<time>.<host>.<pid>.<n>.<job>`): `tensorboard
  --logdir` over a folder of runs names each run by its path, so a sweep's runs read `<setting>/seed-<s>`.
  Events are written from the calling thread into a buffered file, flushed at most every FLUSH_SECS (as
  tensorboardX's own writer): its SummaryWriter hands events to a writer thread, and a failure of that
  thread (a full disk) leaves its queue full, so that the next record would block training for good.
  A fit writes TensorBoard's "session start" at the step it trains from (0 fresh, checkpoint + 1 resumed):
  TensorBoard then drops the points of an earlier attempt past it, as metrics.jsonl dropped their records.
- `wandb`: one W&B run per command (job type fit / watch / evaluate), named after the run (`Tracking.name`:
  a sweep's `<setting>/seed-<s>`, grouped by `<sweep>/<setting>`; else the run directory's name), its
  files under RUN/wandb; the step is a metric of its own (`step`), so that an evaluation of an older
  checkpoint may come after newer records. `WANDB_MODE=offline` keeps it off the network.

Tags (`scalars`): `train/<metric>` for training windows, `eval/<set>/<metric>` for the run's curve (fit's
and --watch's evaluations: the mean of each metric), `evaluate/<set>/<metric>` for one-off `trainer
evaluate` records (any --max-seqs; off the curve, as `trainer.runlog` counts them).

A sink that fails (disk full, network, any exception) prints one warning on stderr and is off for the rest
of the command: training goes on at full speed, metrics.jsonl is complete, and `trainer export-tb`
(`export_tensorboard`) writes the event files of any run from it afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from seqgen.errors import UserError
from trainer.run import RunDir, RunError
from trainer.runlog import CURVE_SOURCES

# sink name -> (module it needs, the extra of pyproject.toml that installs it)
EXTRAS = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}
SINK_NAMES = tuple(EXTRAS)
FLUSH_SECS = 30.0  # event files reach the disk at least this often while records come
EVENTS_GLOB = "events.out.tfevents.*"
WANDB_PROJECT = "emergent-icl"  # unless $WANDB_PROJECT says otherwise
_file_numbers = itertools.count()  # event files of one process never share a name


class SinkError(UserError):
    """A sink that cannot be used as asked (its library not installed, an export over existing files)."""


class Sink(Protocol):
    """Where a copy of each metrics.jsonl record goes."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Abandonable(Sink, Protocol):
    """A sink that can let go of what it holds after a failure without waiting on it (never raises)."""

    def abandon(self) -> None: ...


@dataclass(frozen=True)
class Tracking:
    """What a command mirrors its run's records to (`--log-to`, a sweep's `log_to`) and the run's name there."""

    sinks: tuple[str, ...] = ()
    name: str | None = None  # the run's name in W&B (default: its directory's name); a sweep's setting/seed-N
    group: str | None = None  # its W&B group (a sweep: "<sweep>/<setting>", so that seeds aggregate)

    def to_dict(self) -> dict[str, Any]:
        return {"sinks": list(self.sinks), "name": self.name, "group": self.group}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "Tracking | None":
        return None if data is None else cls(tuple(data["sinks"]), data.get("name"), data.get("group"))


def check_available(names: Sequence[str]) -> None:
    """Refuse (one line, before any work) a sink whose library is not installed, naming the extra."""
    for name in names:
        if name not in EXTRAS:
            raise SinkError(f"unknown sink {name!r}; one of: {', '.join(SINK_NAMES)}")
        module, extra = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise SinkError(f"--log-to {name} needs {module}, which is not installed; install it with "
                            f"`pip install -e \".[{extra}]\"`") from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """{tag: value} of one metrics.jsonl record (module docstring); {} for a record that has none."""
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    if record.get("kind") == "train":
        prefix = "train"
    elif record.get("kind") == "eval":
        source = record.get("source") or "fit"
        prefix = f"{'eval' if source in CURVE_SOURCES else 'evaluate'}/{record.get('set')}"
        metrics = {k: v.get("mean") if isinstance(v, dict) else v for k, v in metrics.items()}
    else:
        return {}
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ---- TensorBoard ------------------------------------------------------------------------------------------
def _frame(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, the data's masked CRC-32C."""
    from tensorboardX.record_writer import masked_crc32c

    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class TensorBoardSink:
    """An event file of scalars in `folder` (module docstring: why not tensorboardX's SummaryWriter)."""

    def __init__(self, folder: Path, job: str, *, session_start: int | None = None) -> None:
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        folder.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(_file_numbers)}.{job}")
        self.path = folder / name
        self._file = open(self.path, "xb")  # noqa: SIM115 - kept open for the command; closed by close()
        self._flushed = time.monotonic()
        self._event(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if session_start is not None:
            self._event(Event(wall_time=time.time(), step=session_start,
                              session_log=SessionLog(status=SessionLog.START)))

    def _event(self, event: Any) -> None:
        self._file.write(_frame(event.SerializeToString()))

    def write(self, record: dict[str, Any]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = scalars(record)
        if not values:
            return
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
        self._event(Event(wall_time=time.time(), step=int(record["step"]), summary=summary))
        if time.monotonic() - self._flushed >= FLUSH_SECS:
            self._file.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        self._file.close()

    def abandon(self) -> None:
        with contextlib.suppress(OSError):  # a full disk fails the flush of the close too; the file is closed
            self._file.close()


# ---- Weights & Biases -------------------------------------------------------------------------------------
class WandbSink:
    """One W&B run of this command (module docstring)."""

    def __init__(self, run_dir: Path, job: str, tracking: Tracking, config: dict[str, Any] | None) -> None:
        import wandb

        self._run = wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
                               name=tracking.name or run_dir.resolve().name, group=tracking.group, job_type=job,
                               dir=str(run_dir), config=config, reinit="create_new",
                               settings=wandb.Settings(console="off", quiet=True))
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def write(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self._run.log({"step": int(record["step"]), **values})

    def close(self) -> None:
        self._run.finish()

    def abandon(self) -> None:
        """Nothing: finishing a W&B run that failed may wait on the network; W&B finishes it at exit."""


# ---- guarding and opening ---------------------------------------------------------------------------------
def _warn(name: str, run_dir: Path, error: BaseException) -> None:
    what = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    hint = f" (`trainer export-tb {run_dir}` writes its event files from it)" if name == "tensorboard" else ""
    print(f"warning: --log-to {name} failed for {run_dir} ({what}); it is off for the rest of this command, "
          f"and metrics.jsonl keeps every record{hint}", file=sys.stderr, flush=True)


class _Guarded:
    """A sink whose first failure is one warning, after which it is off (it never stops the command)."""

    def __init__(self, name: str, sink: Abandonable, run_dir: Path) -> None:
        self.name, self._sink, self._run_dir = name, sink, run_dir

    @property
    def active(self) -> bool:
        return self._sink is not None

    def write(self, record: dict[str, Any]) -> None:
        if self._sink is not None:
            try:
                self._sink.write(record)
            except Exception as e:  # noqa: BLE001 - any failure of a mirror: warn once, turn it off
                self._fail(e)

    def close(self) -> None:
        if self._sink is not None:
            try:
                self._sink.close()
            except Exception as e:  # noqa: BLE001
                self._fail(e)
            self._sink = None

    def _fail(self, error: Exception) -> None:
        sink, self._sink = self._sink, None
        _warn(self.name, self._run_dir, error)
        try:
            sink.abandon()  # not close(): closing a failed sink may fail or wait again
        except Exception:  # noqa: BLE001 - already reported
            pass


class Mirror:
    """The sinks of one run in one command, each guarded; itself a Sink."""

    def __init__(self, sinks: list[_Guarded]) -> None:
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for s in self.sinks:
            s.write(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def _open_one(name: str, run: RunDir, job: str, tracking: Tracking, session_start: int | None) -> Abandonable:
    if name == "tensorboard":
        return TensorBoardSink(run.path, job, session_start=session_start)
    try:
        config = {"trainer": run.read()["trainer"], "run_dir": str(run.path.resolve())}
    except RunError:
        config = None
    return WandbSink(run.path, job, tracking, config)


def open_mirror(run: RunDir, tracking: Tracking, job: str, *, session_start: int | None = None) -> Mirror:
    """The run's sinks, opened; one that fails to open is one warning and left out."""
    opened = []
    for name in dict.fromkeys(tracking.sinks):  # each once, in the order given
        try:
            opened.append(_Guarded(name, _open_one(name, run, job, tracking, session_start), run.path))
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start never stops the command
            _warn(name, run.path, e)
    return Mirror(opened)


@contextlib.contextmanager
def mirrored(run: RunDir, tracking: Tracking | None, job: str, *, session_start: int | None = None,
             enabled: bool = True) -> Iterator[None]:
    """Within the block, every record appended to `run`'s metrics.jsonl is also written to the sinks of
    `tracking` (none: nothing happens); they are closed at its end. `enabled` False (hosts > 0): no-op."""
    if not enabled or tracking is None or not tracking.sinks:
        yield
        return
    mirror = open_mirror(run, tracking, job, session_start=session_start)
    run.sink = mirror
    try:
        yield
    finally:
        run.sink = None
        mirror.close()


# ---- trainer export-tb ------------------------------------------------------------------------------------
def export_tensorboard(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write one event file of every record of a run's metrics.jsonl, into `out` (default: the run directory,
    where a live sink writes; refused where event files are already); the file written. Unlike a live sink,
    a failure here is the command's error."""
    check_available(["tensorboard"])
    run = RunDir(run_dir)
    run.read()
    records = list(run.read_metrics())
    if not records:
        raise RunError(f"{run.metrics_path} has no records yet; train with `trainer fit` first")
    folder = Path(out) if out is not None else run.path
    existing = sorted(folder.glob(EVENTS_GLOB)) if folder.is_dir() else []
    if existing:
        raise SinkError(f"{folder} already holds TensorBoard event files ({existing[0].name}"
                        f"{f' and {len(existing) - 1} more' if len(existing) > 1 else ''}); pass --out DIR (another "
                        "folder), or remove them first to write them again")
    sink = TensorBoardSink(folder, "export")
    try:
        for record in records:
            sink.write(record)
    finally:
        sink.close()
    return sink.path
