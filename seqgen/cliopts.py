"""Command-line options derived from the typed, frozen config dataclasses (used by `seqgen` and `trainer`).

A `ConfigOptions` table lists which config fields a command exposes, by dotted path into its root config
(`"sequence.p_bursty"` of `seqgen.config.BuildConfig`, `"optimizer.max_lr"` of `trainer.config.TrainConfig`).
Everything else of each option comes from the field itself, so `--help` cannot drift from the code:

- the name: `--` + the field name with dashes (`--p-bursty`), unless the table renames it (`--lr`);
- the type: `int` / `float` as declared (`X | None` as `X`); an `Enum` is a `click.Choice` of its values
  (the option's value is the Enum member); a `bool` is a `--name/--no-name` flag; a `tuple[X, ...]` is a
  comma-separated list;
- the help text: the field's documentation (`seqgen.config.documented`); a field without one is refused
  when the table is built;
- the shown default: the dataclass default, as `[default: ...]`. It is only shown, never click's default:
  every config option defaults to "not given" (None), so that a `--config FILE` (or a resumed run's stored
  config) is overridden only by the options actually typed. `ConfigOptions.overrides` turns the parsed
  values into `{dotted path: value}` of the options given.

Options that set nothing in a config (folders, worker counts, flags of a command) are declared with
click directly; the few that several commands share are here (`omniglot_option`, `cache_dir_option`).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click

from seqgen.configio import field_doc

# The default folder of the cached Omniglot image table (seqgen build / finalize, trainer fit / evaluate / ...).
DEFAULT_CACHE_DIR = "data/cache"


@dataclass(frozen=True)
class ConfigOption:
    """One option of a `ConfigOptions` table: the field at `path`, spelled `flag` (default `--<field-name>`).

    `none_is` is the command-line value that stands for a field value None (e.g. 0 = off), for an
    optional field that the command line can switch off; it is also the default shown when the dataclass
    default is None."""

    path: str
    flag: str = ""
    none_is: Any = None


class ConfigClickOption(click.Option):
    """A click option that sets one config field: knows its root config, path and the default it shows."""

    def __init__(self, *args: Any, config_root: type, config_path: str, shown_default: str,
                 none_is: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config_root = config_root
        self.config_path = config_path
        self.shown_default = shown_default
        self.none_is = none_is

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:  # pragma: no cover - config options are never hidden
            return None
        spec, text = record
        extra = f"default: {self.shown_default}"
        if text.endswith("]") and "  [" in text:  # click's own [env var ...; range] bracket
            head, _, bracket = text.rpartition("  [")
            return spec, f"{head}  [{extra}; {bracket}"
        return spec, f"{text}  [{extra}]"


class CommaList(click.ParamType):
    """`1,2,3` as a tuple of `item` values (an empty string: the empty tuple)."""

    name = "list"

    def __init__(self, item: click.ParamType) -> None:
        self.item = item

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        if parts == [""]:
            return ()
        return tuple(self.item.convert(p, param, ctx) for p in parts)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return f"{self.item.name.upper()},..."


class ConfigOptions:
    """The options of one command that set fields of the config dataclass `root`, in help order.

    Use it as a decorator of the click command (it adds the options where it stands), then call
    `overrides(kwargs)` in the command to take their values out of the keyword arguments."""

    def __init__(self, root: type, *options: str | ConfigOption) -> None:
        self.root = root
        self.options = tuple(o if isinstance(o, ConfigOption) else ConfigOption(o) for o in options)
        self._by_path = {o.path: o for o in self.options}
        defaults = root()
        self._fields = {o.path: _resolve(root, o.path) for o in self.options}
        self._defaults = {o.path: _get(defaults, o.path) for o in self.options}
        flags = [self.flag(o.path) for o in self.options]
        if len(set(flags)) != len(flags) or len(self._by_path) != len(self.options):
            raise ValueError(f"{root.__name__}: duplicate options in {flags}")
        for o in self.options:
            if not field_doc(self._fields[o.path][0]):
                raise ValueError(f"{root.__name__}.{o.path} has no documentation; declare it with "
                                 "seqgen.config.documented(default, doc)")
        self._declarations = [self._declaration(o) for o in self.options]

    # ---- the table ----------------------------------------------------------------------------
    def flag(self, path: str) -> str:
        """The command-line spelling of the option that sets `path` (KeyError: not an option here)."""
        o = self._by_path[path]
        return o.flag or "--" + path.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def flags(self) -> dict[str, str]:
        """{dotted path: option name} of every option in the table."""
        return {o.path: self.flag(o.path) for o in self.options}

    def default(self, path: str) -> Any:
        """The dataclass default of the field at `path`."""
        return self._defaults[path]

    # ---- click ------------------------------------------------------------------------------------
    def __call__(self, f: Callable[..., Any]) -> Callable[..., Any]:
        for decls, attrs in reversed(self._declarations):  # click lists decorator-added options bottom-up
            f = click.option(*decls, cls=ConfigClickOption, **attrs)(f)
        return f

    def overrides(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Remove the table's options from `kwargs` (a command's keyword arguments) and return
        {dotted path: field value} of those given on the command line."""
        out: dict[str, Any] = {}
        for o, (decls, _) in zip(self.options, self._declarations):
            value = kwargs.pop(decls[-1])
            if value is None:
                continue
            out[o.path] = None if o.none_is is not None and value == o.none_is else value
        return out

    def _declaration(self, o: ConfigOption) -> tuple[list[str], dict[str, Any]]:
        """(click.option's parameter declarations, its other arguments) of one option."""
        f, tp = self._fields[o.path]
        flag = self.flag(o.path)
        name = "config__" + o.path.replace(".", "__")
        default = self._defaults[o.path]
        attrs: dict[str, Any] = dict(config_root=self.root, config_path=o.path, none_is=o.none_is, default=None,
                                     help=field_doc(f))
        if tp is bool:
            negative = "--no-" + flag.removeprefix("--")
            shown = (flag if default else negative).removeprefix("--")
            return [f"{flag}/{negative}", name], dict(attrs, shown_default=shown)
        return [flag, name], dict(attrs, type=_click_type(tp, o.path), shown_default=show_value(default, o.none_is))


def show_value(value: Any, none_is: Any = None) -> str:
    """How a config default is shown in `--help` (as it would be typed)."""
    if value is None:
        return "none" if none_is is None else str(none_is)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else '""'
    return str(value)


def config_options_of(command: click.Command) -> Iterator[ConfigClickOption]:
    """The config-derived options of a click command."""
    return (p for p in command.params if isinstance(p, ConfigClickOption))


def _click_type(tp: Any, path: str) -> click.ParamType:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _EnumChoice(tp)
    if tp is int:
        return click.INT
    if tp is float:
        return click.FLOAT
    if tp is str:
        return click.STRING
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return CommaList(_click_type(args[0], path))
    raise TypeError(f"{path}: no command-line type for a field of type {tp!r}")


class _EnumChoice(click.Choice):
    """A Choice of an Enum's values whose result is the Enum member."""

    def __init__(self, enum_cls: type[enum.Enum]) -> None:
        super().__init__([m.value for m in enum_cls])
        self.enum_cls = enum_cls

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.enum_cls):
            return value
        return self.enum_cls(super().convert(value, param, ctx))


def _resolve(root: type, path: str) -> tuple[dataclasses.Field, Any]:
    """(dataclasses.Field, its type with `| None` removed) of the leaf field at `path`."""
    cls: Any = root
    *parents, leaf = path.split(".")
    for p in parents:
        cls = typing.get_type_hints(cls)[p]
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{root.__name__}.{path}: {p} is not a nested config")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if leaf not in fields:
        raise ValueError(f"{root.__name__} has no field {path}")
    tp = typing.get_type_hints(cls)[leaf]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{root.__name__}.{path}: no command-line type for {tp!r}")
        tp = args[0]
    if dataclasses.is_dataclass(tp):
        raise ValueError(f"{root.__name__}.{path} is a nested config, not a field")
    return fields[leaf], tp


def _get(obj: Any, path: str) -> Any:
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


# ---- options that several commands share and that set no config field ----------------------------------
OMNIGLOT_HELP = "Omniglot folder (default: $OMNIGLOT_DIR, else data/omniglot)."


def omniglot_option(help: str = OMNIGLOT_HELP) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--omniglot DIR` (parameter `omniglot_dir`; None: `seqgen.omniglot.resolve_omniglot_dir` decides)."""
    return click.option("--omniglot", "omniglot_dir", type=click.Path(file_okay=False), default=None, help=help)


def cache_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--cache-dir DIR`: where the cached Omniglot image table lives."""
    return click.option("--cache-dir", default=DEFAULT_CACHE_DIR, show_default=True, type=click.Path(file_okay=False),
                        help="Where the cached Omniglot image table lives.")(f)
