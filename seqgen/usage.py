"""Click usage errors as one line, for both command lines (`seqgen`, `trainer`).

Click prints a usage error (an unknown option, a missing argument, a bad value) as four lines ("Usage: ...",
"Try ... --help", a blank line, "Error: ..."). `OneLineGroup` prints it as the project's one line
`error: <what>; see `<command> --help`` with exit code 2, the same as every other known error.
"""

from __future__ import annotations

import sys
from typing import Any

import click

EXIT_USAGE = 2


class OneLineGroup(click.Group):
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
            sys.exit(EXIT_USAGE)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        # standalone_mode=False returns the exit code of click.exceptions.Exit (e.g. 0 after --help)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)
