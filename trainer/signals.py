"""Graceful interruption: the first Ctrl+C / SIGTERM sets a flag, the second exits at once.

The training loop checks `stop_requested` at step boundaries and evaluation loops check it between
batches; on a request the loop saves a checkpoint synchronously and returns. Periodic checkpoints remain
the real guarantee (a SIGKILL gives no warning).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType


class GracefulInterrupt:
    """Context manager installing SIGINT/SIGTERM handlers (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, object] = {}

    @property
    def stop_requested(self) -> bool:
        return self._event.is_set()

    def request_stop(self) -> None:
        self._event.set()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set():
            sys.stderr.write("\nsecond interrupt: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(130)
        self._event.set()
        name = signal.Signals(signum).name
        sys.stderr.write(f"\n{name}: saving a checkpoint at the next step boundary (interrupt again to exit now)\n")
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
