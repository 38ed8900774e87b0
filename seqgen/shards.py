"""The on-disk shard format (docs/shard-format.md): HDF5 shards, sidecars, the manifest.

A shard set is one directory. While it is being built it holds `build.json` (the identity of the build:
everything the manifest will say except the shard list), one `shard-NNNNN.h5` per `shard_size`
sequences, and beside each shard a small sidecar `shard-NNNNN.json` recording its rows and the sha256 of
its bytes (the shard ledger: a shard counts as done only when its sidecar matches the build and its
file's hash). `manifest.json` is written last; a directory without it is an unfinished build.

Every file is written atomically (`name.tmp` in the same folder, close, fsync, `os.replace`), and no
file contains a timestamp, so a shard is a pure function of (config, shard index): byte-identical
whether built alone, by any number of workers, or on another machine.

`seqgen.verify` re-checks a finished set against this format and the invariants of its sequence type.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from seqgen.atomic import commit
from seqgen.config import IMAGE_SIZE, BuildConfig
from seqgen.configio import ConfigError
from seqgen.errors import UserError
from seqgen.files import Optional, check_path, check_schema, describe_path, read_json_object

FORMAT = "emergent-icl/seqgen-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_FILE = "build.json"
INDEX_KEYS = ("example", "exemplar", "label", "is_rare")
_HASH_BLOCK = 1 << 22


class ShardError(UserError):
    """A missing, corrupt, truncated or foreign shard set; the message is one line naming the fix."""


# ---- names and dtypes -----------------------------------------------------------------------
def shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.h5"


def sidecar_file(shard: int) -> str:
    return f"shard-{shard:05d}.json"


def narrow_int_dtype(max_value: int) -> np.dtype:
    """int16 when every value in [0, max_value] fits, else int32 (the stored dtype describes itself)."""
    return np.dtype(np.int16) if max_value <= np.iinfo(np.int16).max else np.dtype(np.int32)


def storage_dtypes(cfg: BuildConfig) -> dict[str, np.dtype]:
    """Dtypes of the stored datasets, fixed by the config's value ranges (so every shard agrees)."""
    return {
        "example": narrow_int_dtype(cfg.dataset.num_dataset_classes - 1),
        "exemplar": np.dtype(np.uint8),
        "label": narrow_int_dtype(cfg.num_labels - 1),
        "is_rare": np.dtype(np.uint8),
        "noise_seed": np.dtype(np.uint32),
        "pixels": np.dtype(np.uint8),
    }


# The dtypes the format allows for each dataset (docs/shard-format.md); `storage_dtypes` picks one of them.
FORMAT_DTYPES: dict[str, tuple[np.dtype, ...]] = {
    "example": (np.dtype(np.int16), np.dtype(np.int32)),
    "exemplar": (np.dtype(np.uint8),),
    "label": (np.dtype(np.int16), np.dtype(np.int32)),
    "is_rare": (np.dtype(np.uint8),),
    "noise_seed": (np.dtype(np.uint32),),
    "pixels": (np.dtype(np.uint8),),
}


def dtype_problem(name: str, dtype: np.dtype) -> str | None:
    """Why dataset `name` may not have `dtype` (None when the format allows it)."""
    allowed = FORMAT_DTYPES.get(name)
    if allowed is None or dtype in allowed:
        return None
    return f"{name} is stored as {dtype}, the format allows {' / '.join(map(str, allowed))}"


def range_problems(cfg: BuildConfig, data: dict[str, np.ndarray]) -> list[str]:
    """Values outside what the config allows (class ids, labels, exemplars, is_rare), one line each."""
    problems: list[str] = []
    n_cls, n_lab, n_exm = cfg.dataset.num_dataset_classes, cfg.num_labels, cfg.dataset.exemplars_per_class
    for key, hi, what in (("example", n_cls, f"example class ids outside [0, {n_cls})"),
                          ("label", n_lab, f"labels outside [0, num_labels={n_lab})"),
                          ("exemplar", n_exm, f"exemplar >= exemplars_per_class={n_exm}"),
                          ("is_rare", 2, "is_rare holds values other than 0 / 1")):
        v = data.get(key)
        if v is not None and v.size and (int(v.min()) < 0 or int(v.max()) >= hi):
            problems.append(what)
    return problems


def expected_keys(cfg: BuildConfig, materialized: bool) -> tuple[str, ...]:
    keys = INDEX_KEYS + (("noise_seed",) if cfg.needs_noise_seed else ())
    return keys + (("pixels",) if materialized else ())


# ---- hashes -----------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


# ---- shards ---------------------------------------------------------------------------------
PixelFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (example, exemplar) block -> uint8 pixels


def write_shard(
    path: Path,
    *,
    shard: int,
    start: int,
    arrays: dict[str, np.ndarray],
    dtypes: dict[str, np.dtype],
    pixels: PixelFn | None = None,
    pixel_block_rows: int = 256,
) -> str:
    """Write one shard atomically; return the sha256 of its bytes.

    `arrays` holds the generator's output (example, exemplar, label, is_rare, [noise_seed]); they are
    narrowed to `dtypes`. With `pixels`, a uint8 `pixels` dataset is filled block by block.
    """
    rows = int(arrays["example"].shape[0])
    tmp = path.with_name(path.name + ".tmp")
    length = arrays["example"].shape[1]
    need = sum(np.asarray(arrays[k]).size * dtypes[k].itemsize for k in arrays if k in dtypes) + _HDF5_OVERHEAD
    need += rows * length * IMAGE_SIZE * IMAGE_SIZE if pixels is not None else 0
    # HDF5 does not survive a write that fails for lack of space (h5py errors, then a segfault at exit). So a
    # shard of up to _IN_MEMORY_BYTES is made in memory (HDF5's core driver: the same bytes as a file written
    # directly, tested) and written with plain file I/O, where a full disk is an ordinary OSError; bigger
    # (materialized) shards are written directly after checking the free space.
    try:
        if need <= _IN_MEMORY_BYTES:
            image = _write_hdf5(None, shard, start, rows, arrays, dtypes, pixels, pixel_block_rows)
            with open(tmp, "wb") as out:
                out.write(image)
        else:
            if (free := shutil.disk_usage(path.parent).free) < need:
                raise ShardError(_disk_full(path, f"needs about {need / 1e6:,.1f} MB, {free / 1e6:,.1f} MB free"))
            _write_hdf5(tmp, shard, start, rows, arrays, dtypes, pixels, pixel_block_rows)
        commit(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
            raise ShardError(_disk_full(path, "the disk filled up")) from None
        raise
    return file_sha256(path)


_IN_MEMORY_BYTES = 1 << 29  # shards up to 512 MiB (every index-only shard of the default size) are made in memory
_HDF5_OVERHEAD = 1 << 14  # bytes of HDF5 metadata per shard file (4 KiB measured), with a margin


def _disk_full(path: Path, detail: str) -> str:
    return (f"disk full: cannot write {path} ({detail}); free space in {path.parent}, then rerun the same command "
            "to resume (finished shards are kept)")


def _write_hdf5(tmp: Path | None, shard: int, start: int, rows: int, arrays: dict[str, np.ndarray],
                dtypes: dict[str, np.dtype], pixels: PixelFn | None, pixel_block_rows: int) -> bytes | None:
    """Write the shard to `tmp`, or (tmp None) in memory and return the file's bytes."""
    where = dict(name=tmp) if tmp is not None else dict(name=f"shard-{shard}-{id(arrays)}", driver="core", backing_store=False)
    with h5py.File(mode="w", **where) as f:
        for key in ("example", "exemplar", "label", "is_rare", "noise_seed"):
            if key in arrays:
                data = np.ascontiguousarray(arrays[key], dtype=dtypes[key])
                f.create_dataset(key, data=data, track_times=False)
        if pixels is not None:
            length = arrays["example"].shape[1]
            ds = f.create_dataset(
                "pixels", shape=(rows, length, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8, track_times=False
            )
            for r in range(0, rows, pixel_block_rows):
                s = slice(r, min(rows, r + pixel_block_rows))
                ds[s] = pixels(arrays["example"][s], arrays["exemplar"][s])
        for name, value in (("format_version", FORMAT_VERSION), ("shard", shard), ("start", start), ("rows", rows)):
            f.attrs[name] = np.int64(value)
        if tmp is None:
            f.flush()
            return f.id.get_file_image()
    return None


def read_shard(path: Path, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Read whole datasets of one shard (all but `pixels` unless named in `keys`)."""
    try:
        with h5py.File(path, "r") as f:
            names = list(keys) if keys is not None else [k for k in f if k != "pixels"]
            return {k: f[k][()] for k in names}
    except (OSError, KeyError) as e:
        raise ShardError(f"cannot read {path}: {e}; rerun `seqgen build` on its folder to rebuild it") from None


# ---- manifest -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardEntry:
    file: str
    start: int
    rows: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "start": self.start, "rows": self.rows, "sha256": self.sha256}


def build_header(
    cfg: BuildConfig, split: Any, image_table: dict[str, Any] | None, materialized: bool
) -> dict[str, Any]:
    """Everything the manifest says except the shard list: the identity of a build."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "length": cfg.length,
        "num_labels": cfg.num_labels,
        "split": split.to_dict(),
        "image_table": image_table,
        "materialized": materialized,
    }


# What every header (build.json, manifest.json) and sidecar must hold; checked on every read.
HEADER_SCHEMA: dict[str, Any] = {
    "format": str,
    "format_version": int,
    "config": dict,
    "length": int,
    "num_labels": int,
    "split": {"rare": [int], "common": [int], "holdout": [int], "zipf_weights_sha256": Optional(str)},
    "image_table": Optional({"fingerprint": str, "shape": [int]}),
    "materialized": Optional(bool),
}
MANIFEST_SCHEMA: dict[str, Any] = {
    **HEADER_SCHEMA, "shards": [{"file": str, "start": int, "rows": int, "sha256": str}],
}
SIDECAR_SCHEMA: dict[str, Any] = {"build": str, "file": str, "start": int, "rows": int, "sha256": str}
_SCHEMAS = {"manifest": MANIFEST_SCHEMA, MANIFEST: MANIFEST_SCHEMA, BUILD_FILE: HEADER_SCHEMA, "sidecar": SIDECAR_SCHEMA}
_FIX = "rebuild with `seqgen build`"


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A manifest, build.json or sidecar, format- and type-checked (`seqgen.files`); ShardError (one line)
    when not valid; FileNotFoundError passes through."""
    data = read_json_object(path, what=what, fix=_FIX, error=ShardError)
    schema = _SCHEMAS.get(what)
    if schema is not None and "format" in schema:
        got, version = data.get("format"), data.get("format_version")
        want = f"expected {FORMAT!r} v{FORMAT_VERSION}; rebuild it with this version of seqgen"
        if got != FORMAT:
            raise ShardError(f"{path} is not a seqgen shard manifest (format {got!r} v{version!r}), {want}")
        if version != FORMAT_VERSION:
            raise ShardError(f"{path}: format_version {version!r} is not supported, {want}")
    if schema is not None:
        check_schema(data, schema, where=f"{what} {path}", error=ShardError, fix=_FIX)
    return data


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a finished set; ShardError (one line) when the folder is not a shard set (described as
    it is: `describe_shard_set`), the manifest is not this format or is malformed."""
    if (problem := describe_shard_set(folder)) is not None:
        raise ShardError(f"shard set {folder} {problem}")
    path = Path(folder) / MANIFEST
    check_path(path, "file", what="manifest", fix=f"rebuild the set with `seqgen build --overwrite --out {folder}`",
               error=ShardError)
    return read_json(path, "manifest")


def describe_shard_set(folder: str | Path) -> str | None:
    """What `folder` is when it is not a finished shard set, and the fix, as the end of a one-line message
    ("does not exist; build it with ...", "is a file of shard set X; pass its folder X", "is a run directory
    ...", "is a folder of shard sets (a, b); pass one of them ..."); None when it holds a manifest."""
    folder = Path(folder)
    build = f"`seqgen build --type TYPE --out {folder}`"
    problem = describe_path(folder, "dir")
    if problem is not None:
        if problem.startswith("does not exist"):
            return f"{problem}; check the path, or build the set there with {build}"
        if problem.startswith("is a file"):
            if folder.name == MANIFEST or folder.name == BUILD_FILE or folder.name.startswith("shard-"):
                return f"is a file of the shard set {folder.parent}; pass that folder: {folder.parent}"
            return f"{problem}; pass the folder that `seqgen build --out` wrote"
        if "symbolic link" in problem:
            return f"{problem}; point the link at a shard set folder, or pass the set's own folder"
        return f"{problem}; pass a readable shard set folder"
    if os.path.lexists(folder / MANIFEST):
        return None
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return f"is an empty directory (no shard set was built there); build one with {build}"
    if BUILD_FILE in names or any(n.startswith("shard-") and n.endswith(".h5") for n in names):
        how = (f"`seqgen finalize {folder}` (it checks every shard and writes the manifest)" if BUILD_FILE in names
               else f"`seqgen build --overwrite --out {folder}` with the set's options")
        return f"has no {MANIFEST}: an unfinished build; finish it with {how}"
    if "config.json" in names and ("checkpoints" in names or "metrics.jsonl" in names):
        return ("is a run directory of `trainer fit`, not a shard set; pass a shard set folder (the run's own "
                f"training set is named in {folder / 'config.json'} under data.train.path)")
    sets = [n for n in names if (folder / n / MANIFEST).is_file()]
    if sets:
        shown = ", ".join(sets[:4]) + (", ..." if len(sets) > 4 else "")
        return f"is a folder of shard sets ({shown}), not one; pass one of them, e.g. {folder / sets[0]}"
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return (f"is not a shard set: it holds no {MANIFEST} ({len(names)} entries: {shown}); pass the folder that "
            f"`seqgen build --out` wrote, or build one with {build}")


def manifest_config(manifest: dict[str, Any]) -> BuildConfig:
    try:
        return BuildConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise ShardError(f"manifest config is invalid ({e}); rebuild the set with `seqgen build`") from None
