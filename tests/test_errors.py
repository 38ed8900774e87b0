"""The one-line error policy (`seqgen.errors`): every error class of both packages derives from `UserError`,
every command of both command lines is wrapped by the one handler, and the handler turns each `UserError`
(and OSError / MemoryError / Ctrl+C) into `error: <one line>` with the documented exit code."""

from __future__ import annotations

import errno
import importlib
import pkgutil

import click
import pytest
from click.testing import CliRunner

import seqgen
import trainer
from seqgen.errors import Advice, UserError, error_line, one_line_errors

# the one-line error classes known today; a new one only has to derive from UserError
KNOWN = {"ConfigError", "OmniglotError", "BuildError", "ShardError", "LockError", "CheckpointError", "DataError",
         "TopologyError", "ModelInputError", "KernelPathError", "RunError", "GroupError", "SweepError",
         "MetricsError"}


def _import_everything() -> None:
    for pkg in (seqgen, trainer):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)


def _subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub} | _subclasses(sub)
    return out


def user_errors() -> list[type[UserError]]:
    _import_everything()
    return sorted((c for c in _subclasses(UserError) if c.__module__.startswith(("seqgen.", "trainer."))),
                  key=lambda c: (c.__module__, c.__name__))


def test_every_error_class_of_both_packages_is_a_user_error():
    _import_everything()
    names = {c.__name__ for c in user_errors()}
    assert KNOWN <= names, KNOWN - names
    # no `class XError(Exception)` left outside the policy in either package
    for pkg in (seqgen, trainer):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            mod = importlib.import_module(info.name)
            for value in vars(mod).values():
                if (isinstance(value, type) and issubclass(value, Exception) and value.__name__.endswith("Error")
                        and value.__module__ == mod.__name__):
                    assert issubclass(value, UserError), f"{mod.__name__}.{value.__name__} is not a UserError"


def _commands(group: click.Group) -> dict[str, click.Command]:
    return dict(group.commands)


def test_every_command_of_both_command_lines_is_wrapped():
    from seqgen.cli import main as seqgen_main
    from trainer.cli import main as trainer_main

    cmds = {f"seqgen {n}": c for n, c in _commands(seqgen_main).items()}
    cmds |= {f"trainer {n}": c for n, c in _commands(trainer_main).items()}
    assert {"seqgen build", "seqgen verify", "trainer fit", "trainer evaluate", "trainer sweep", "trainer claims",
            "trainer analyze", "trainer plot"} <= set(cmds)
    unwrapped = [n for n, c in cmds.items() if not isinstance(getattr(c.callback, "one_line_advice", None), Advice)]
    assert not unwrapped, unwrapped


@pytest.mark.parametrize("cls", user_errors(), ids=lambda c: c.__name__)
def test_each_user_error_is_one_line_and_exit_2_on_both_command_lines(cls, monkeypatch, tmp_path):
    import seqgen.shards
    import trainer.plots
    from seqgen.cli import main as seqgen_main
    from trainer.cli import main as trainer_main

    def boom(*args, **kwargs):
        raise cls("the thing is wrong\n  (detail); do this instead")

    monkeypatch.setattr(trainer.plots, "plot_run", boom)
    monkeypatch.setattr(seqgen.shards, "read_manifest", boom)
    for main, args in ((trainer_main, ["plot", str(tmp_path)]), (seqgen_main, ["info", str(tmp_path)])):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, (res.exit_code, res.output)
        assert res.stderr.splitlines() == ["error: the thing is wrong (detail); do this instead"], res.stderr
        assert "Traceback" not in res.output


ADVICE = Advice(disk_full="free space", out_of_memory="use less", interrupted="run it again")


def test_os_and_memory_errors_get_the_command_lines_advice():
    assert error_line(OSError(errno.ENOSPC, "No space left on device", "/x/y.h5"), ADVICE) == \
        "disk full writing /x/y.h5; free space"
    assert error_line(PermissionError(errno.EACCES, "Permission denied", "/x"), ADVICE) == "Permission denied: /x"
    assert error_line(MemoryError(), ADVICE) == "out of memory; use less"
    assert error_line(ValueError("a bug"), ADVICE) is None


@pytest.mark.parametrize("exc, code, line", [
    (KeyboardInterrupt(), 130, "error: interrupted; run it again"),
    (OSError(errno.ENOSPC, "No space left on device", "f"), 2, "error: disk full writing f; free space"),
])
def test_the_handler_exits_with_one_line(exc, code, line):
    @click.command()
    @one_line_errors(ADVICE)
    def cmd():
        raise exc

    res = CliRunner().invoke(cmd, [])
    assert (res.exit_code, res.stderr.splitlines()) == (code, [line])


def test_a_bug_keeps_its_traceback():
    @click.command()
    @one_line_errors(ADVICE)
    def cmd():
        raise ValueError("a bug")

    res = CliRunner().invoke(cmd, [])
    assert isinstance(res.exception, ValueError) and res.exit_code == 1
