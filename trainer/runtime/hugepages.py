"""Back XLA's large CPU buffers with transparent huge pages: glibc's `glibc.malloc.hugetlb=1` tunable.

XLA's CPU runtime allocates its scratch memory (about 160 MB for the paper model) afresh on every jitted
call, and glibc serves such large blocks with a fresh `mmap`, so each call page-faults them in again 4 KiB at
a time. With the tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc marks those mappings
`MADV_HUGEPAGE`, so the kernel backs them with 2 MiB pages where it can: about 5x fewer page faults and a
faster step on the CPU (docs/speed.md). Numerics are untouched: only where the bytes live changes.

glibc reads tunables once, at process start, so `trainer` re-executes itself once with the tunable added to
`GLIBC_TUNABLES` (same interpreter, same arguments, same process id), before JAX is imported. Nothing happens
where it cannot help (not Linux, not glibc >= 2.35, transparent huge pages set to `never`), or where the
user already chose a value: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0 trainer ...` turns it off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_supports_tunable(libc: tuple[str, str] | None = None) -> bool:
    """True on glibc >= 2.35, the first release with `glibc.malloc.hugetlb`."""
    name, version = libc if libc is not None else platform.libc_ver()
    if name != "glibc":
        return False
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def thp_available(setting: str | None = None) -> bool:
    """True unless transparent huge pages are absent or set to `[never]` (the file reads e.g.
    `always [madvise] never`, the active choice in brackets)."""
    if setting is None:
        try:
            setting = THP_SETTING.read_text()
        except OSError:
            return False
    return "[" in setting and "[never]" not in setting


def environ_with_hugepages(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the tunable is already there (set by us or by
    the user, to any value). Other tunables in `GLIBC_TUNABLES` are kept."""
    current = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=", 1)[0] == TUNABLE for item in current.split(":") if item):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    return env


def reexec_with_hugepages() -> None:
    """Replace this process by the same command with `glibc.malloc.hugetlb=1`, where that helps (module
    docstring); returns without doing anything otherwise. Call it first thing in a command-line entry
    point, before JAX allocates anything."""
    if not sys.platform.startswith("linux") or not glibc_supports_tunable() or not thp_available():
        return
    from trainer.runtime.signals import block_interrupts, restore_mask

    env = environ_with_hugepages(os.environ)
    if env is None:  # e.g. the re-executed image: deliver an interrupt that arrived during execve
        restore_mask(set())
        return

    sys.stdout.flush()
    sys.stderr.flush()
    previous = block_interrupts()  # a Ctrl+C now stays pending across execve (trainer.runtime.signals)
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:  # e.g. an interpreter that cannot be re-executed: run on without the tunable
        restore_mask(previous)
        return
