"""One validated way to read the project's JSON files (manifests, sidecars, build.json, checkpoint metadata,
run config.json, metrics.jsonl, evaluations): decoded as UTF-8, parsed strictly (no NaN / Infinity), and
type-checked against a small schema, so that every failure is ONE line naming the file and the fix.

    data = read_json_object(path, what="manifest", fix="rebuild it with `seqgen build`", error=ShardError)
    check_schema(data, {"format": str, "shards": [{"file": str, "rows": int}]}, where=..., error=..., fix=...)

A schema is a type (`int` refuses bools; `float` accepts ints and must be finite), a tuple of types, a
dict (an object with at least those keys; `Optional(spec)` for a key that may be missing or null), or a
one-element list (a list whose items all match the element's schema). `object` accepts anything.
Callers pass their own exception class, so each package keeps its error types (ShardError, RunError, ...).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Optional:
    """A key that may be absent or null; when present it matches `spec`."""

    spec: Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def loads_strict(text: str) -> Any:
    """json.loads that refuses NaN / Infinity (which json.dumps writes for non-finite floats)."""
    return json.loads(text, parse_constant=_reject_constant)


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """json.dumps that raises ValueError on NaN / inf instead of writing non-standard JSON."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def canonical_sha256(obj: Any, *, spaced: bool = False) -> str:
    """sha256 (hex) of `obj` as canonical JSON: keys sorted, ASCII, separators `,` and `:`: the one JSON
    hash of both packages (shard-set build ids, manifest fingerprints, sweep set folders).

    `spaced=True` hashes json.dumps's default separators `, ` and `: ` instead: the form in which run
    fingerprints (config.json `data.*.fingerprint`) and sweep shard-folder names (`bursty-b07ae1470b2e`)
    were first stored, kept so that those stored values stay valid. Callers truncate if they need to."""
    separators = (", ", ": ") if spaced else (",", ":")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=separators).encode()).hexdigest()


def read_text(path: Path, *, what: str, fix: str, error: type[Exception]) -> str:
    """The file's text (UTF-8); FileNotFoundError passes through, everything else is one-line `error`."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or e}); {fix}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} {path} is unreadable (not UTF-8 text: binary or corrupt); {fix}") from None


def read_json(path: Path, *, what: str, fix: str, error: type[Exception], allow_nan: bool = False) -> Any:
    text = read_text(path, what=what, fix=fix, error=error)
    try:
        return json.loads(text) if allow_nan else loads_strict(text)
    except ValueError as e:
        msg = " ".join(str(e).split())
        raise error(f"{what} {path} is unreadable (not valid JSON: {msg}); {fix}") from None


def read_json_object(path: Path, *, what: str, fix: str, error: type[Exception],
                     schema: dict[str, Any] | None = None, allow_nan: bool = False) -> dict[str, Any]:
    """A JSON object from `path`, checked against `schema` when given (`allow_nan`: as read_jsonl_objects)."""
    data = read_json(path, what=what, fix=fix, error=error, allow_nan=allow_nan)
    if not isinstance(data, dict):
        raise error(f"{what} {path} holds a JSON {_kind(data)}, expected an object; {fix}")
    if schema is not None:
        check_schema(data, schema, where=f"{what} {path}", error=error, fix=fix)
    return data


def read_jsonl_objects(path: Path, *, what: str, fix: str, error: type[Exception],
                       schema: dict[str, Any] | None = None, allow_nan: bool = False) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines file. A line that does not parse (cut by a hard kill) is skipped; a line
    that parses but is not a matching object is an error (the file was edited or is not ours).
    `allow_nan`: accept NaN / Infinity values (a diverged training loss is logged as NaN)."""
    text = read_text(path, what=what, fix=fix, error=error)
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line) if allow_nan else loads_strict(line)
        except ValueError:
            continue
        where = f"{what} {path} line {number}"
        if not isinstance(record, dict):
            raise error(f"{where} holds a JSON {_kind(record)}, expected an object; {fix}")
        if schema is not None:
            check_schema(record, schema, where=where, error=error, fix=fix)
        yield record


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number"}.get(type(value), type(value).__name__)


def _matches_type(value: Any, tp: Any) -> bool:
    types = tp if isinstance(tp, tuple) else (tp,)
    for t in types:
        if t is object:
            return True
        if t is type(None) and value is None:
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value)
        if t not in (int, float, type(None)) and isinstance(value, t):
            return True
    return False


def _type_name(tp: Any) -> str:
    if isinstance(tp, tuple):
        return " or ".join(_type_name(t) for t in tp)
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true/false", dict: "an object",
            list: "an array", type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def check_schema(value: Any, schema: Any, *, where: str, error: type[Exception], fix: str, path: str = "") -> None:
    """Raise `error` (one line) unless `value` matches `schema` (see the module docstring)."""
    label = f"'{path}'" if path else "the top level"
    if isinstance(schema, Optional):
        if value is not None:
            check_schema(value, schema.spec, where=where, error=error, fix=fix, path=path)
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise error(f"{where}: {label} is a JSON {_kind(value)}, expected an object; {fix}")
        for key, spec in schema.items():
            sub = f"{path}.{key}" if path else key
            if key not in value:
                if isinstance(spec, Optional):
                    continue
                raise error(f"{where}: '{sub}' is missing; {fix}")
            check_schema(value[key], spec, where=where, error=error, fix=fix, path=sub)
        return
    if isinstance(schema, list):
        if not isinstance(value, list):
            raise error(f"{where}: {label} is a JSON {_kind(value)}, expected an array; {fix}")
        for i, item in enumerate(value):
            check_schema(item, schema[0], where=where, error=error, fix=fix, path=f"{path}[{i}]")
        return
    if not _matches_type(value, schema):
        raise error(f"{where}: {label} is {_short(value)}, expected {_type_name(schema)}; {fix}")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
