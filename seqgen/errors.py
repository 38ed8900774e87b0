"""The one-line error policy of both command lines (`seqgen`, `trainer`), in one place.

- `UserError` is the base of every expected failure of both packages (bad options or files, missing
  Omniglot, a corrupt shard, a folder in use, a run that cannot resume, ...). Its message is one complete
  line that names the problem and the fix. Deriving from it is all it takes: there is no list of classes.
- `one_line_errors(advice)` wraps a command: a `UserError`, an `OSError` (a full disk named as such) or a
  `MemoryError` becomes `error: <one line>` on stderr and exit code 2, never a traceback; with
  `advice.interrupted`, Ctrl+C becomes `error: interrupted; <advice>` and exit code 130. Anything else is
  a bug and keeps its traceback. `Advice` holds what each command line tells the user to do next after
  the failures that are not worded by an error class (a full disk, no memory, an interrupt).
- `OneLineGroup` prints click's usage errors (an unknown option, a missing argument, a bad value) as the
  same one line, `error: <what>; see `<command> --help``, exit code 2, instead of click's four lines.
"""

from __future__ import annotations

import errno
import functools
import sys
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, TypeVar

import click

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """An expected failure whose message is one line naming the problem and the fix (module docstring).

    `disk_full = True` on an instance: the problem was a full disk, and the fix is the command's own
    (`Advice.disk_full`, appended by `error_line`): what to run again differs between commands."""

    disk_full: bool = False


@dataclass(frozen=True)
class Advice:
    """What a command line says after `disk full writing FILE; `, after `out of memory; ` and (when not
    None) after `interrupted; ` (None: the command handles interrupts itself)."""

    disk_full: str
    out_of_memory: str
    interrupted: str | None = None


def error_line(exc: BaseException, advice: Advice) -> str | None:
    """The one-line message for an expected failure (whitespace folded); None for a bug."""
    if isinstance(exc, UserError):
        msg = f"{exc}; {advice.disk_full}" if exc.disk_full else str(exc)
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        msg = f"disk full{where}; {advice.disk_full}"
    elif isinstance(exc, OSError):
        msg = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    elif isinstance(exc, MemoryError):
        msg = f"out of memory; {advice.out_of_memory}"
    else:
        return None
    return " ".join(msg.split()) or type(exc).__name__


def notice(message: str) -> None:
    """Print `notice: <message>` (one line) on stderr: something was done on the user's behalf (e.g. a cut
    log line moved aside) that they should know about; not an error."""
    print(f"notice: {' '.join(message.split())}", file=sys.stderr, flush=True)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print `error: <message>` (one line) on stderr and exit with `code`."""
    click.echo(f"error: {' '.join(message.split()) or 'failed'}", err=True)
    sys.exit(code)


def one_line_errors(advice: Advice) -> Callable[[F], F]:
    """Decorator for a command (or any entry point): expected failures become one line and exit code 2."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                if advice.interrupted is None:
                    raise
                fail(f"interrupted; {advice.interrupted}", EXIT_INTERRUPTED)
            except Exception as e:  # noqa: BLE001 - error_line decides; a bug is re-raised with its traceback
                line = error_line(e, advice)
                if line is None:
                    raise
                fail(line)

        wrapper.one_line_advice = advice  # type: ignore[attr-defined]  # lets tests check every command
        return wrapper  # type: ignore[return-value]

    return decorate


class OneLineGroup(click.Group):
    """A click group whose usage errors are one line (module docstring)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else (prog_name or self.name or "")
            msg = " ".join(e.format_message().split()).rstrip(".")
            click.echo(f"error: {msg}; see `{where} --help`", err=True)
            sys.exit(EXIT_ERROR)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        # standalone_mode=False returns the exit code of click.exceptions.Exit (e.g. 0 after --help)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)
