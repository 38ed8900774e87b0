"""The trainer's one-line error policy: known errors print `error: ...` and exit 2, never a traceback."""

from __future__ import annotations

import errno
import functools
import sys
from typing import Any, Callable

import click


def known_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is a complete, one-line explanation with the fix."""
    from seqgen.build import BuildError
    from seqgen.config import ConfigError
    from seqgen.lock import LockError
    from seqgen.omniglot import OmniglotError
    from seqgen.shards import ShardError
    from trainer.checkpoint import CheckpointError
    from trainer.data import DataError
    from trainer.runtime.distributed import TopologyError
    from trainer.models import ModelInputError
    from trainer.models.kernels import KernelPathError
    from trainer.run import RunError

    return (ConfigError, OmniglotError, BuildError, ShardError, CheckpointError, DataError, TopologyError,
            ModelInputError, RunError, LockError, KernelPathError)


def one_line_errors(fn: Callable) -> Callable:
    """Decorate a click command: known errors and OSErrors become one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except known_errors() as e:
            fail(str(e))
        except OSError as e:
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            if e.errno == errno.ENOSPC:
                fail(f"disk full{where}; free space, then continue with --resume (complete checkpoints are kept)")
            fail(f"{e.strerror or e}{where}")
        except MemoryError:
            fail("out of memory; lower --batch-size / eval batch size, or use a machine with more memory")

    return wrapper


def fail(message: str) -> None:
    click.echo(f"error: {message.splitlines()[0] if message else 'failed'}", err=True)
    sys.exit(2)
