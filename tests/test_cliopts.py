"""Command-line options derived from the typed configs (`seqgen.cliopts`): every option of both command lines
has help, a config option shows its dataclass default (and no other), and each option sets exactly its field."""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass

import click
import pytest
from click.testing import CliRunner

from seqgen.cli import BUILD_OPTIONS
from seqgen.cli import main as seqgen_main
from seqgen.cliopts import ConfigClickOption, ConfigOption, ConfigOptions, config_options_of
from seqgen.config import BuildConfig, replace_nested
from seqgen.configio import documented, flatten
from trainer.cli import main as trainer_main
from trainer.config import FIT_OPTIONS, TrainConfig, with_overrides


def _commands(group: click.Group, prefix: str) -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name, cmd in group.commands.items():
        out[f"{prefix} {name}"] = cmd
        if isinstance(cmd, click.Group):
            out.update(_commands(cmd, f"{prefix} {name}"))
    return out


COMMANDS = {**_commands(seqgen_main, "seqgen"), **_commands(trainer_main, "trainer")}


def test_the_walk_sees_every_command():
    assert set(COMMANDS) >= {"seqgen build", "seqgen finalize", "seqgen verify", "seqgen info", "seqgen download",
                             "trainer fit", "trainer evaluate", "trainer plot", "trainer sweep", "trainer claims",
                             "trainer analyze"}


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_has_help(path):
    cmd = COMMANDS[path]
    ctx = click.Context(cmd, info_name=path)
    options = [p for p in cmd.get_params(ctx) if isinstance(p, click.Option) and not p.hidden]
    assert options, path
    missing = [p.opts[0] for p in options if not (p.help or "").strip()]
    assert not missing, f"{path}: options without help: {missing}"


def _expected_default(option: ConfigClickOption) -> str:
    """The dataclass default of the option's field, read from a fresh root config, as --help should show it."""
    value = functools.reduce(getattr, option.config_path.split("."), option.config_root())
    if option.is_bool_flag:
        return (option.opts if value else option.secondary_opts)[0].removeprefix("--")
    if value is None:
        return "none" if option.none_is is None else str(option.none_is)
    return str(value.value if isinstance(value, enum.Enum) else value)


@pytest.mark.parametrize("path, table", [("seqgen build", BUILD_OPTIONS), ("trainer fit", FIT_OPTIONS)])
def test_config_options_show_the_dataclass_default_and_default_to_not_given(path, table):
    cmd = COMMANDS[path]
    ctx = click.Context(cmd, info_name=path)
    options = list(config_options_of(cmd))
    assert [o.config_path for o in options] == [o.path for o in table.options]
    assert [o.opts[0] for o in options] == list(table.flags.values())
    for o in options:
        assert o.default is None, o.opts  # not click's default: a --config file's value must not be overridden
        _, text = o.get_help_record(ctx)
        assert f"[default: {_expected_default(o)}]" in text, (o.opts, text)
        assert text.count("default") == 1, (o.opts, text)  # no second, hand-written default in the doc


def test_help_output_shows_docs_and_defaults():
    r = CliRunner().invoke(seqgen_main, ["build", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if l.strip().startswith("--p-bursty FLOAT"))
    assert "probability that a sequence is bursty" in line and line.endswith("[default: 0.9]")
    line = next(l for l in r.output.splitlines() if l.strip().startswith("--labeling-rare"))
    assert "[ordered|unfixed|original]" in line
    assert "--preserve-ordering-every-n INTEGER" in r.output and "[default: 0]" in r.output
    r = CliRunner().invoke(trainer_main, ["fit", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    lines = {l.split()[0]: l for l in r.output.splitlines() if l.strip().startswith("--")}
    assert lines["--steps"].endswith("Training steps.  [default: 500000]")
    assert lines["--lr"].endswith("[default: 0.0003]") and "Peak learning rate" in lines["--lr"]
    assert lines["--clip-norm"].endswith("[default: none]")
    assert lines["--seq-model"].strip() == "--seq-model [transformer|lstm|vanilla_rnn]"  # help on the next line
    assert "Sequence model over the tokens.  [default: transformer]" in r.output


def _other_value(option: ConfigClickOption, default):
    """(argv, field value) of a value of the option that differs from the field's default."""
    flag = option.opts[0]
    if option.is_bool_flag:
        return ([flag] if not default else [option.secondary_opts[0]]), not default
    if isinstance(default, enum.Enum):
        member = next(m for m in type(default) if m is not default)
        return [flag, member.value], member
    if isinstance(option.type, click.types.FloatParamType):
        value = 0.125 if default is None else default + 0.125
        return [flag, str(value)], value
    value = default * 2 if default else 7  # doubled: still valid where ModelConfig checks on construction
    return [flag, str(value)], value


@pytest.mark.parametrize("path, table, required, apply", [
    ("seqgen build", BUILD_OPTIONS, [], lambda overrides: replace_nested(BuildConfig(), overrides)),
    ("trainer fit", FIT_OPTIONS, ["--train", "t", "--run-dir", "r"],
     lambda overrides: with_overrides(TrainConfig(), overrides)),
])
def test_each_option_sets_exactly_its_field(path, table, required, apply):
    cmd = COMMANDS[path]
    base = flatten(apply({}).to_dict())
    for option in config_options_of(cmd):
        argv, value = _other_value(option, table.default(option.config_path))
        ctx = cmd.make_context(path, [*required, *argv])
        params = dict(ctx.params)
        overrides = table.overrides(params)
        assert overrides == {option.config_path: value}, argv
        assert not any(k.startswith("config__") for k in params)  # overrides took every config option out
        changed = flatten(apply(overrides).to_dict())
        assert {k for k in base if changed[k] != base[k]} == {option.config_path}, argv
    ctx = cmd.make_context(path, required)  # nothing given: nothing overridden
    assert table.overrides(dict(ctx.params)) == {}


def test_none_is_maps_the_off_value_to_none():
    cmd = COMMANDS["seqgen build"]
    for given, field in (("0", None), ("8", 8)):
        ctx = cmd.make_context("build", ["--preserve-ordering-every-n", given])
        assert BUILD_OPTIONS.overrides(dict(ctx.params)) == {"split.preserve_ordering_every_n": field}


# ---- the table on its own, with a toy config --------------------------------------------------------------
class Colour(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    sizes: tuple[int, ...] = documented((2, 3), "Sizes.")
    scale: float | None = documented(None, "Scale (none: off).")
    colour: Colour = documented(Colour.RED, "Colour.")
    quiet: bool = documented(True, "Say little.")
    secret: int = 0


@dataclass(frozen=True)
class Root:
    inner: Inner = dataclasses.field(default_factory=Inner)
    count: int = documented(1, "How many.")


def _parse(table: ConfigOptions, argv: list[str]) -> dict:
    @click.command()
    @table
    def cmd(**kwargs):
        pass

    return table.overrides(dict(cmd.make_context("cmd", argv).params))


def test_types_from_the_fields():
    table = ConfigOptions(Root, "inner.sizes", "inner.scale", "inner.colour", "inner.quiet",
                          ConfigOption("count", "--n"))
    assert table.flags == {"inner.sizes": "--sizes", "inner.scale": "--scale", "inner.colour": "--colour",
                           "inner.quiet": "--quiet", "count": "--n"}
    assert _parse(table, ["--sizes", "4,5,6", "--scale", "0.5", "--colour", "blue", "--no-quiet", "--n", "3"]) == {
        "inner.sizes": (4, 5, 6), "inner.scale": 0.5, "inner.colour": Colour.BLUE, "inner.quiet": False, "count": 3}
    assert _parse(table, ["--sizes", ""]) == {"inner.sizes": ()}
    assert _parse(table, []) == {}
    with pytest.raises(click.BadParameter):
        _parse(table, ["--sizes", "4,x"])
    with pytest.raises(click.BadParameter):
        _parse(table, ["--colour", "green"])

    @click.command()
    @table
    def cmd(**kwargs):
        pass

    ctx = click.Context(cmd)
    shown = {o.opts[0]: o.get_help_record(ctx)[1] for o in config_options_of(cmd)}
    assert shown == {"--sizes": "Sizes.  [default: 2,3]", "--scale": "Scale (none: off).  [default: none]",
                     "--colour": "Colour.  [default: red]", "--quiet": "Say little.  [default: quiet]",
                     "--n": "How many.  [default: 1]"}


def test_tables_refuse_what_they_cannot_derive():
    with pytest.raises(ValueError, match="no documentation"):
        ConfigOptions(Root, "inner.secret")
    with pytest.raises(ValueError, match="no field inner.nope"):
        ConfigOptions(Root, "inner.nope")
    with pytest.raises(ValueError, match="nested config"):
        ConfigOptions(Root, "inner")
    with pytest.raises(ValueError, match="duplicate"):
        ConfigOptions(Root, "count", ConfigOption("inner.colour", "--count"))
