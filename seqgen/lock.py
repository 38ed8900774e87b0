"""One writer per folder: an advisory `fcntl.flock` on a lock file inside it, taken without waiting.

    with FolderLock(folder, "seqgen build"):
        ...  # write into folder

The lock is taken before anything is written and held until the command ends (the kernel drops it when
the process dies, even on SIGKILL, so there are no stale locks to clean up). The holder writes its pid,
command and start time into the lock file, and a second command is refused with one line naming them.
`shared=True` takes a shared lock instead: any number of shared holders (e.g. `seqgen build --shards A:B`
on several machines into one folder) exclude every exclusive holder (a full build, `seqgen finalize`),
and the other way round. Removing the lock file naively would let two processes lock two different files
of the same name: it is removed by its last holder while still locked, and a process
that locked a removed file retries on the new one. A process killed with SIGKILL leaves the file, unlocked
and harmless; the next holder removes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from seqgen.errors import UserError

LOCK_FILE = ".lock"


class LockError(UserError):
    """The folder is being written by another process; the message is one line naming it."""


def _describe(info: dict[str, Any]) -> str:
    parts = []
    if isinstance(info.get("pid"), int):
        parts.append(f"pid {info['pid']}")
    if isinstance(info.get("host"), str):
        parts.append(f"on {info['host']}")
    if isinstance(info.get("command"), str):
        parts.append(f"`{info['command']}`")
    if isinstance(info.get("started"), str):
        parts.append(f"started {info['started']}")
    return ", ".join(parts) or "unknown holder"


def _try_flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def locked_by(folder: str | os.PathLike, name: str = LOCK_FILE) -> str | None:
    """The holder of `folder`'s lock (one line) when another process holds it, else None; takes nothing."""
    lock = FolderLock(folder, "", name=name)
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_flock(fd, fcntl.LOCK_EX):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return lock.holder()
    finally:
        os.close(fd)


class FolderLock:
    def __init__(self, folder: str | os.PathLike, command: str, *, shared: bool = False,
                 name: str = LOCK_FILE) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.command = command
        self.shared = shared
        self._fd: int | None = None
        self._created = False

    def holder(self) -> str:
        """Who wrote the lock file last (one line)."""
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return "unknown holder"
        return _describe(info) if isinstance(info, dict) else "unknown holder"

    def acquire(self) -> "FolderLock":
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                alone = _try_flock(fd, fcntl.LOCK_EX)  # a shared holder alone writes the holder info, then shares
                if self.shared:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                elif not alone:
                    raise BlockingIOError
            except BlockingIOError:
                os.close(fd)
                raise LockError(
                    f"{self.folder} is in use by another process ({self.holder()}); wait for it to finish or stop "
                    "it, or use another folder"
                ) from None
            except OSError:
                os.close(fd)
                raise
            try:  # the holder we waited on may have removed the file: then lock the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - a file removed and re-created 100 times while we looked
            raise LockError(f"{self.folder}: cannot take the lock {self.path}; retry")
        self._fd = fd
        if self.shared and not alone:
            return self  # the file names the first of the shared holders
        info = {"pid": os.getpid(), "host": os.uname().nodename, "command": self.command,
                "argv": shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "",
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        try:  # best effort: a full disk must not stop the command from reporting its own error
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass
        return self

    def release(self) -> None:
        """Remove the lock file (when no other holder shares it) and unlock."""
        if self._fd is None:
            return
        try:
            if self.shared:  # the last shared holder removes the file; the others leave it
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self.shared = False
                except BlockingIOError:
                    pass
            if not self.shared:
                self.path.unlink(missing_ok=True)
                if self._created:  # a command refused before writing anything leaves no empty folder
                    try:
                        self.folder.rmdir()
                    except OSError:
                        pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
