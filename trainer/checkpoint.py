"""Atomic, pickle-free checkpoints: `run/checkpoints/step-N/{state.eqx, metadata.json}`.

A checkpoint is written into `step-N.tmp/`, `state.eqx` first (`eqx.tree_serialise_leaves`), then
`metadata.json` (format version, step, the resolved config, free-form extras), both fsynced, and the
folder is renamed to `step-N/` only then. Discovery ignores folders without `metadata.json`, so an
interrupted save is never mistaken for a checkpoint. Loading needs a skeleton pytree of the same
structure (the caller rebuilds it from the stored config) and checks shapes and dtypes leaf by leaf.
`metadata.json` records the sha256 of `state.eqx` (`state_sha256`), checked on every load: a flipped or
appended byte is refused. Checkpoints written before that field existed still load (unchecked).
A failed write (a full disk) removes its `step-N.tmp/` and raises one CheckpointError line.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from seqgen.atomic import fsync_dir, fsync_file
from seqgen.errors import UserError
from seqgen.files import Optional, check_path, check_schema, dumps_strict, read_json_object
from seqgen.shards import file_sha256

FORMAT = "emergent-icl/checkpoint"
FORMAT_VERSION = 2  # 2: flat optimizer state (one mu / nu vector); 1 (before 2026-12): one per parameter array
_STEP_DIR = re.compile(r"^step-(\d+)$")


# A checkpoint that does not fit the model its run's config.json describes: one of the two was replaced.
_MISMATCH_FIX = ("the run's config.json describes another model than this checkpoint holds: put back the run's own "
                 "config.json (each checkpoint's metadata.json holds the config it was written with, under 'trainer'), "
                 "or delete this checkpoint folder to use an earlier one")


class CheckpointError(UserError):
    """A missing, incompatible or truncated checkpoint; the message is one line."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def save(run_dir: str | os.PathLike, step: int, tree: Any, metadata: dict[str, Any], keep: int = 0) -> Path:
    """Write checkpoint `step` atomically and return its folder; keep the newest `keep` (0 = all)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        host_tree = jax.tree_util.tree_map(lambda x: np.asarray(x) if eqx.is_array(x) else x, tree)
        eqx.tree_serialise_leaves(tmp / "state.eqx", host_tree)
        fsync_file(tmp / "state.eqx")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step), **metadata,
                "state_sha256": file_sha256(tmp / "state.eqx")}
        (tmp / "metadata.json").write_text(dumps_strict(meta, indent=1, sort_keys=True))
        fsync_file(tmp / "metadata.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except Exception as e:  # equinox wraps a failed write (a full disk) in its TreePathError
        shutil.rmtree(tmp, ignore_errors=True)
        cause = _os_error(e)
        if cause is None:
            raise
        detail = cause.strerror or " ".join(str(cause).split())
        raise CheckpointError(
            f"cannot write checkpoint {final} ({detail}{'' if cause.errno == errno.ENOSPC else ': disk full?'}); "
            "free disk space, then continue with --resume (earlier complete checkpoints are kept)"
        ) from None
    if keep > 0:
        for old in list_steps(run_dir)[:-keep]:
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError that caused `e` (itself, or along its chain of causes), if any."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def list_steps(run_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints (folders with metadata.json), ascending."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / "metadata.json").is_file() and (child / "state.eqx").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(run_dir: str | os.PathLike) -> int | None:
    steps = list_steps(run_dir)
    return steps[-1] if steps else None


_METADATA_SCHEMA = {"format": str, "format_version": int, "step": int, "trainer": Optional(dict),
                    "state_sha256": str}


def read_metadata(run_dir: str | os.PathLike, step: int) -> dict[str, Any]:
    """metadata.json of checkpoint `step`, format- and type-checked; CheckpointError (one line) otherwise."""
    path = checkpoint_dir(run_dir) / f"step-{step}" / "metadata.json"
    fix = "delete that checkpoint folder or pick another --step"
    if os.path.lexists(path):  # there, but perhaps not a readable file: say what it is
        check_path(path, "file", what="checkpoint metadata", fix=f"delete {path.parent} or pick another --step",
                   error=CheckpointError)
    try:
        meta = read_json_object(path, what="checkpoint metadata", fix=fix, error=CheckpointError)
    except FileNotFoundError:
        available = ", ".join(map(str, list_steps(run_dir))) or "none"
        raise CheckpointError(f"no checkpoint at step {step} in {run_dir} (available steps: {available})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an emergent-icl checkpoint (format {meta.get('format')!r}); {fix}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is a checkpoint of format v{meta.get('format_version')!r}; this version reads v{FORMAT_VERSION} "
            "only: retrain the run, or resume it with the emergent-icl version that wrote it")
    check_schema(meta, _METADATA_SCHEMA, where=f"checkpoint metadata {path}", error=CheckpointError, fix=fix)
    if meta["step"] != step:
        raise CheckpointError(f"checkpoint metadata {path} says step {meta['step']}, its folder step {step}; {fix}")
    return meta


def load(run_dir: str | os.PathLike, step: int, skeleton: Any) -> Any:
    """Load checkpoint `step` into a pytree shaped like `skeleton` (rebuilt by the caller from its config)."""
    path = checkpoint_dir(run_dir) / f"step-{step}" / "state.eqx"
    meta = read_metadata(run_dir, step)
    check_path(path, "file", what="checkpoint state", error=CheckpointError,
               fix=f"delete {path.parent} to resume from an earlier checkpoint, or pick another --step")
    expected = os.path.getsize(path) if path.exists() else -1
    if path.is_file() and file_sha256(path) != meta["state_sha256"]:
        raise CheckpointError(
            f"checkpoint {path} fails its sha256 check against metadata.json (corrupt, truncated or modified); delete "
            f"{path.parent} to resume from an earlier checkpoint, or pick another --step"
        )
    try:
        tree = eqx.tree_deserialise_leaves(path, skeleton)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is missing its state file") from None
    except Exception as e:  # numpy raises ValueError/EOFError/OSError on truncation or shape mismatch
        raise CheckpointError(
            f"checkpoint {path} ({expected} bytes) does not match this model/optimizer "
            f"or is truncated: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; {_MISMATCH_FIX}"
        ) from None
    _check_leaves(tree, skeleton, path)
    return tree


def _check_leaves(tree: Any, skeleton: Any, path: Path) -> None:
    got = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
    want = jax.tree_util.tree_leaves(eqx.filter(skeleton, eqx.is_array))
    if len(got) != len(want):
        raise CheckpointError(f"checkpoint {path} has {len(got)} arrays, the model expects {len(want)}; {_MISMATCH_FIX}")
    for a, b in zip(got, want):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise CheckpointError(
                f"checkpoint {path} holds an array {a.shape} {a.dtype} where the model expects {b.shape} {b.dtype}; "
                f"{_MISMATCH_FIX}"
            )
