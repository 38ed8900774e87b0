"""Append-only JSON-lines logs (a run's `metrics.jsonl`), torn-safe: no record is ever lost or glued.

- `append_line(path, line)`: the record goes to the end of the file whole, in one `write` (repeated only if
  the kernel takes part of it), then fsync. If that fails (a full disk: `ENOSPC`, a file-size limit, an I/O
  error), the file is truncated back to its previous length, so it stays a valid log, and the failure is one
  line (`LogWriteError`) naming the file, how many bytes the record needed and the fix (for a full disk,
  the command's own: `seqgen.errors.UserError.disk_full`).
- `settle_tail(path)`: on opening a log for writing (an append, a resume), a last line without its newline
  (a crash cut a write) is moved aside to `<name>.torn-<UTC time>` beside it, named in a one-line notice on
  stderr, and the log is truncated to its last complete line. Never erased: the side file keeps the bytes.
  A cut tail that is still a whole JSON object (cut just before its newline) is kept and completed instead.
- Readers (`seqgen.files.read_jsonl_objects`) skip an unterminated last line (torn, or being written by
  another process) and refuse a line that is not JSON anywhere before it (one line with the line number and
  a command that removes it).

The caller serialises writers (a run's `.metrics.lock`, `trainer.run.RunDir`): `settle_tail` must only run
while no other process may be appending, or it would move aside a line that is being written.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from seqgen.atomic import fsync_dir
from seqgen.errors import UserError, notice

TORN_SUFFIX = ".torn-"


class LogWriteError(UserError):
    """An append that could not be written; the log was left as it was before it (one-line message)."""


class LogReadError(UserError):
    """A log that cannot be opened for writing (unreadable, not a regular file); one-line message."""


def remove_line_fix(path: str | os.PathLike, number: int) -> str:
    """A command that removes line `number` of `path`, keeping a copy of the file (the fix for a corrupt line)."""
    return f"remove that line with `sed -i.bak '{number}d' {path}` (keeps the file as it was in {path}.bak)"


def _side_name(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    side = path.with_name(f"{path.name}{TORN_SUFFIX}{stamp}")
    n = 1
    while side.exists():
        n += 1
        side = path.with_name(f"{path.name}{TORN_SUFFIX}{stamp}-{n}")
    return side


def settle_tail(path: str | os.PathLike) -> Path | None:
    """Make `path` end with a complete line (module docstring); the side file written, or None. A missing
    or empty file, or one that ends with a newline, is left alone."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LogReadError(f"log {path} cannot be opened for writing ({e.strerror or e}); make it a writable "
                           "file (check its permissions)") from None
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        os.lseek(fd, 0, os.SEEK_SET)
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                break
            data += chunk
        if data.endswith(b"\n"):
            return None
        keep = data.rfind(b"\n") + 1  # 0 when the whole file is one cut line
        tail = data[keep:]
        if _is_object(tail):  # a whole record, cut just before its newline: complete it
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, b"\n")
            os.fsync(fd)
            return None
        side = _side_name(path)
        with open(side, "xb") as f:  # first the copy, durably; then the cut
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
        os.ftruncate(fd, keep)
        os.fsync(fd)
        fsync_dir(path.parent)
    finally:
        os.close(fd)
    notice(f"{path} ended in a cut line ({len(tail)} bytes, left by a crash or a full disk): moved it to {side}; "
           "the log goes on from its last complete line")
    return side


def _is_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), dict)
    except ValueError:  # UnicodeDecodeError is a ValueError
        return False


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append `line` (one record, newline added if missing) to `path` whole, then fsync; on failure the
    file is truncated back to its previous length and `LogWriteError` says so (module docstring)."""
    path = Path(path)
    data = (line if line.endswith("\n") else line + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise _write_error(path, e, len(data), restored=True) from None
    try:
        before = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, before)
                os.fsync(fd)
                restored = True
            except OSError:
                restored = False  # the cut tail is moved aside when the log is next opened (settle_tail)
            raise _write_error(path, e, len(data), restored) from None
    finally:
        os.close(fd)


def _write_error(path: Path, e: OSError, size: int, restored: bool) -> LogWriteError:
    state = ("the log is left as it was (the part written was cut off again)" if restored else
             "its cut end will be moved aside the next time the log is opened")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        err = LogWriteError(f"disk full appending a record of {size} bytes to {path}: the record was not written "
                            f"and {state} (it needs {size} bytes more on that disk)")
        err.disk_full = True  # the command adds what to run then (seqgen.errors.Advice.disk_full)
        return err
    return LogWriteError(f"cannot append to {path} ({e.strerror or e}): the record was not written and {state}; "
                         "make the file writable (permissions, file-size limit), then run the command again")
