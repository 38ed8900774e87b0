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

import errno
import hashlib
import json
import math
import os
import stat
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
    """The objects of a JSON-lines file (an append-only log, `seqgen.jsonlog`). A last line without its
    newline that does not parse (cut by a crash, or being appended by another process) is skipped; a line
    that does not parse before that is a one-line `error` naming the line and a command that removes it
    (never skipped: skipping lets a rewrite erase it); a line that parses but is not a matching object is an
    `error` with `fix` (the file was edited or is not ours).
    `allow_nan`: accept NaN / Infinity values (a diverged training loss is logged as NaN)."""
    from seqgen.jsonlog import remove_line_fix

    text = read_text(path, what=what, fix=fix, error=error)
    lines = text.split("\n")  # not splitlines(): only \n ends a record, and line numbers match sed's
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line) if allow_nan else loads_strict(line)
        except ValueError:
            if number == len(lines):  # no newline after it: a cut last line (moved aside when opened to write)
                continue
            raise error(f"{what} {path} line {number} is not valid JSON (corrupt or edited); "
                        f"{remove_line_fix(path, number)}, or repair it by hand") from None
        where = f"{what} {path} line {number}"
        if not isinstance(record, dict):
            raise error(f"{where} holds a JSON {_kind(record)}, expected an object; {fix}")
        if schema is not None:
            check_schema(record, schema, where=where, error=error, fix=fix)
        yield record


# ---- paths, described as they are ------------------------------------------------------------------------
def describe_path(path: str | os.PathLike, expect: str) -> str | None:
    """What is wrong with `path` as a `expect` ("file" or "dir") that we are about to read, in words that can
    follow the path in a message ("does not exist", "is a directory, not a file", "is a broken symbolic link
    to X", "is a symbolic link loop", "cannot be read (permission denied)", ...); None when it is a readable
    `expect`. Every place that opens a user-given path describes it with this (`check_path`)."""
    path = Path(path)
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return _describe_missing(path)
    except NotADirectoryError:
        return _describe_missing(path)
    except OSError as e:
        return f"cannot be examined ({e.strerror or e})"
    if stat.S_ISLNK(lst.st_mode):
        target = os.readlink(path)
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"is a symbolic link loop (it points to {target}, which leads back to itself)"
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return f"is a broken symbolic link (it points to {target}, which does not exist)"
            return f"is a symbolic link to {target}, which cannot be examined ({e.strerror or e})"
    st = os.stat(path)
    kind = _file_kind(st.st_mode)
    if expect == "dir" and kind != "dir":
        return f"is {_a(kind)}, not a directory"
    if expect == "file" and kind != "file":
        return f"is {_a(kind)}, not a file"
    need = os.R_OK | (os.X_OK if expect == "dir" else 0)
    if not os.access(path, need):
        return "cannot be read (permission denied)"
    return None


def check_path(path: str | os.PathLike, expect: str, *, what: str, fix: str, error: type[Exception]) -> None:
    """Raise `error` (`what PATH <description>; fix`) unless `path` is a readable `expect` (`describe_path`)."""
    problem = describe_path(path, expect)
    if problem is not None:
        raise error(f"{what} {path} {problem}; {fix}")


def _describe_missing(path: Path) -> str:
    """'does not exist', naming the nearest part of the path that is not a directory."""
    for parent in path.parents:
        if parent == Path(".") or parent == Path(parent.anchor):
            break
        if os.path.lexists(parent):
            if parent.is_dir():
                return "does not exist"
            return f"does not exist ({parent} {describe_path(parent, 'dir')})"
    return "does not exist"


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _a(kind: str) -> str:
    return {"dir": "a directory", "file": "a file"}.get(kind, f"a {kind}")


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
