"""Atomic file replacement, shared by every writer of both packages (shards, manifests, sidecars, caches,
run configs, evaluations, sweep records, reports, figures; checkpoints rename a whole folder the same way).

`commit(tmp, final)`: fsync the finished temporary file, `os.replace` it over `final` (atomic within one
filesystem), fsync the folder so the rename itself survives a crash. Readers therefore see either the
old file or the complete new one, never a half-written file with the final name. `atomic_write(path,
write)` wraps any writer (`write(tmp)` fills the temporary file) in that; `atomic_write_text`,
`atomic_write_json` and `atomic_copy` are the common cases. Temporary files are named
`<name>.<host>.<pid>.tmp` beside the target, so concurrent writers (ranged builds of one shard set on
several machines) never share one, and a failed write removes its own.

Appended logs (a run's metrics.jsonl) are not replaced but appended to, one record per line written
whole and fsynced, a failed append cut back off, a line cut by a crash moved aside (`seqgen.jsonlog`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (best effort: some platforms have no directory fds)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that refuse fsync on directories
        pass
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """fsync `tmp`, move it over `final` atomically, fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


def temporary_name(path: str | os.PathLike) -> Path:
    """`<path>.<host>.<pid>.tmp`: this process's own temporary file for `path`, in the same folder."""
    path = Path(path)
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` (`commit`). On any
    failure the temporary file is removed and `path` is left as it was."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, allow_nan: bool = False) -> None:
    """Write `obj` as JSON to `path` atomically: keys sorted, indent 1, a final newline. NaN / inf raise
    ValueError before anything is written (they are not JSON and every reader refuses them) unless
    `allow_nan`."""
    text = json.dumps(obj, indent=1, sort_keys=True, allow_nan=allow_nan) + "\n"
    atomic_write_text(path, text)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to `dst` atomically."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
