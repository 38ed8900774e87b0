"""Atomic file replacement, shared by every writer of the project (shards, manifests, caches, checkpoints).

`commit(tmp, final)`: fsync the finished temporary file, `os.replace` it over `final` (atomic within one
filesystem), fsync the folder so the rename itself survives a crash. Readers therefore see either the
old file or the complete new one, never a half-written file with the final name.
"""

from __future__ import annotations

import os
from pathlib import Path


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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through `<path>.tmp` and `commit`: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: concurrent writers never share one
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to `dst` through `<dst>.tmp` and `commit`."""
    import shutil

    dst = Path(dst)
    tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        commit(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
