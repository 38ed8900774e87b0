"""Interrupts: exit 130 with one line at any moment, saving what there is to save.

Two regimes, both for SIGINT (Ctrl+C) and SIGTERM:

- **Early** (`install_early_exit`, first thing the `trainer` command does, before any import of weight):
  while nothing needs saving (imports, compilation, opening shard sets, restoring a checkpoint), an
  interrupt writes one line to stderr and ends the process at once with status 130 (`os._exit`: no
  KeyboardInterrupt, so no traceback, no click `Aborted!`, and no library `except` can swallow it). The
  files the trainer writes are complete-or-absent (temporary name, then rename), so exiting at any point
  leaves nothing half-written that looks complete.
- **Graceful** (`GracefulInterrupt`, around training and evaluation loops): the first interrupt sets a
  flag; the training loop checks it at step boundaries and saves a checkpoint, evaluation loops check it
  between batches; a second interrupt exits at once. Leaving the context restores the early handler.

The `trainer` command re-executes itself once (huge pages, `trainer.runtime.hugepages`): SIGINT / SIGTERM are
blocked across that `execve` (`block_interrupts`), so a signal that arrives then stays pending and is
delivered by `install_early_exit` in the new process image instead of being lost. What remains uncovered
is the interpreter's own start-up before `install_early_exit` runs (tens of milliseconds; Python's
defaults apply there: SIGINT raises KeyboardInterrupt, SIGTERM terminates). Periodic checkpoints remain
the real guarantee (a SIGKILL gives no warning).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType


SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130
_early_message = "while starting: nothing new was saved"


def _write_line(text: str) -> None:
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


def _early_handler(signum: int, frame: FrameType | None) -> None:
    _write_line(f"\ninterrupted ({signal.Signals(signum).name}) {_early_message}")
    os._exit(EXIT_INTERRUPTED)


def set_early_message(text: str) -> None:
    """What the early handler says after `interrupted (SIGINT) ` (e.g. for evaluation: no result written)."""
    global _early_message
    _early_message = text


def install_early_exit() -> None:
    """Install the early handler for SIGINT and SIGTERM, then unblock both, so that one that arrived
    during the huge-pages re-execution is delivered now. Main thread only.

    A SIGINT that the parent set to be ignored (a shell without job control does so for `cmd &`, and the
    child inherits it) is taken over too, as `GracefulInterrupt` does: otherwise an interrupt sent to the
    process during start-up would be dropped (the process trains on to the end), while the same interrupt
    a second later stops it cleanly."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _early_handler)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # delivers (and handles) pending ones


def use_keyboard_interrupt() -> None:
    """Back to Python's own regime (SIGINT raises KeyboardInterrupt, SIGTERM terminates), for a command
    that handles KeyboardInterrupt itself (`trainer sweep`: it stops its builds' worker pools cleanly)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is _early_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is _early_handler:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def block_interrupts() -> set[int] | None:
    """Block SIGINT and SIGTERM (before an `execve`: blocked signals stay pending across it); returns the
    previous mask for `restore_mask`, or None where signal masks do not exist. A signal caught before the
    block is handled right here (pthread_sigmask runs pending Python handlers)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


def restore_mask(previous: set[int] | None) -> None:
    """Unblock SIGINT / SIGTERM unless `previous` (from `block_interrupts`) had them blocked."""
    if previous is not None and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [s for s in SIGNALS if s not in previous])


class GracefulInterrupt:
    """Context manager installing SIGINT/SIGTERM handlers (main thread only; elsewhere a no-op).

    `action` completes the line the first interrupt prints (`SIGINT: <action> (interrupt again to exit
    now)`): what the interrupted loop does next."""

    def __init__(self, action: str = "saving a checkpoint at the next step boundary") -> None:
        self._event = threading.Event()
        self._previous: dict[int, object] = {}
        self._action = action

    @property
    def stop_requested(self) -> bool:
        return self._event.is_set()

    def request_stop(self) -> None:
        self._event.set()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set():
            sys.stderr.write("\nsecond interrupt: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        self._event.set()
        name = signal.Signals(signum).name
        sys.stderr.write(f"\n{name}: {self._action} (interrupt again to exit now)\n")
        sys.stderr.flush()

    def __enter__(self) -> "GracefulInterrupt":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
