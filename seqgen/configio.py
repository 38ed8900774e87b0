"""Config plumbing shared by seqgen and trainer: the one place that turns files and options into typed
frozen config dataclasses and compares them.

- `documented` / `field_doc`: a config field with its one-line documentation (also its `--help`);
- `from_plain` / `to_plain`: nested dicts <-> dataclasses (enums by value, unknown keys refused);
  `check_finite`;
- `load_toml`: a TOML file, or one line naming the problem and the fix;
- `apply_overrides`: dotted overrides (`{"sequence.p_bursty": 0.5}`) on a nested dict;
- `flatten` / `changed_keys`: the dotted keys whose values differ between two configs (each caller words
  its own message: a build folder, a sweep's run directory, a resumed run).

What the options mean lives with each config (`seqgen.config`, `trainer.config`, `trainer.models.config`).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import tomllib
from dataclasses import field
from pathlib import Path
from typing import Any, Iterable

from seqgen.errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid option or combination of options; the message is one line naming the fix."""


def documented(default: Any, doc: str) -> Any:
    """A config dataclass field with its one-line documentation (`field_doc`); the command-line help of
    the option that sets the field is this text (`seqgen.cliopts`), so fields are documented only here."""
    return field(default=default, metadata={"doc": doc})


def field_doc(f: dataclasses.Field) -> str:
    """The documentation of a config field (`documented`); empty when it has none."""
    return str(f.metadata.get("doc", ""))


def check_finite(obj: Any, where: str = "") -> None:
    """ConfigError for a NaN / inf float anywhere in a (nested) config dataclass built in Python."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{where}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}{f.name} must be a finite number, got {value!r}")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys ({"a": {"b": 1}} -> {"a.b": 1}); tuples become lists."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


def from_plain(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, converting enums; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown option '{where}{key}'; valid options here: {valid}")
        kwargs[name] = _convert(hints[name], value, f"{where}{key}")
    return cls(**kwargs)


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def _convert(tp: Any, value: Any, where: str) -> Any:
    import types
    import typing

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_plain(tp, value, where + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(value if item is Any else _convert(item, v, where) for v in value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value.value if isinstance(value, enum.Enum) else value)
        except ValueError:
            choices = ", ".join(m.value for m in tp)
            raise ConfigError(f"{where} = {value!r} is not one of: {choices}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # NaN / inf pass every range check below and poison what follows
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; one-line ConfigError when missing or malformed."""
    from seqgen.files import describe_path

    p = Path(path)
    if (problem := describe_path(p, "file")) is not None:
        raise ConfigError(f"config file {p} {problem}; {_toml_fix(p, problem)}")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:  # removed since it was described
        raise ConfigError(f"config file {p} does not exist; pass an existing TOML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text (TOML files must be); re-save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}; fix that line") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror or e}); pass a readable TOML file") from None


def _toml_fix(p: Path, problem: str) -> str:
    """The fix for a --config path that is not a readable file (`load_toml`)."""
    if problem.startswith("is a directory"):
        inside = sorted(q.name for q in p.glob("*.toml"))
        if inside:
            return f"pass one of the TOML files in it ({', '.join(inside[:4])}{', ...' if len(inside) > 4 else ''})"
        return "pass a TOML file, not a folder"
    if "symbolic link" in problem:
        return "point the link at a TOML file, or pass the file itself"
    if problem.startswith("cannot be read"):
        return "make it readable (chmod u+r) or pass a readable copy"
    return "check the path, or pass an existing TOML file (e.g. one of configs/*.toml)"


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`data` (nested dicts, changed in place and returned) with dotted overrides applied, e.g.
    {"sequence.p_bursty": 0.5}; None values are skipped (an option not given); values already typed."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = to_plain(value)
    return data


def changed_keys(old: dict[str, Any], new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """The dotted keys (sorted) whose values differ between two nested config dicts, `ignore`d keys left out;
    a key present on one side only counts as changed."""
    a, b, skip = flatten(old), flatten(new), set(ignore)
    return [k for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)]
