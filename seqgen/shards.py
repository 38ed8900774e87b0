"""The on-disk shard format (README "Shard format (version 1)"): HDF5 shards, sidecars, the manifest.

A shard set is one directory. While it is being built it holds `build.json` (the identity of the build:
everything the manifest will say except the shard list), one `shard-NNNNN.h5` per `shard_size`
sequences, and beside each shard a small sidecar `shard-NNNNN.json` recording its rows and the sha256 of
its bytes (the shard ledger: a shard counts as done only when its sidecar matches the build and its
file's hash). `manifest.json` is written last; a directory without it is an unfinished build.

Every file is written atomically (`name.tmp` in the same folder, close, fsync, `os.replace`), and no
file contains a timestamp, so a shard is a pure function of (config, shard index): byte-identical
whether built alone, by any number of workers, or on another machine.

`verify` re-checks a finished set: manifest, hashes, row counts, shapes / dtypes and the invariants of
the sequence type (label and class ranges, split pools, exemplar counts, few-shot / no-support
structure on a sample of rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from seqgen.atomic import commit
from seqgen.config import IMAGE_SIZE, BuildConfig, ConfigError, ExampleType, SeqType

FORMAT = "emergent-icl/seqgen-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_FILE = "build.json"
INDEX_KEYS = ("example", "exemplar", "label", "is_rare")
_HASH_BLOCK = 1 << 22


class ShardError(Exception):
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


def expected_keys(cfg: BuildConfig, materialized: bool) -> tuple[str, ...]:
    keys = INDEX_KEYS + (("noise_seed",) if cfg.needs_noise_seed else ())
    return keys + (("pixels",) if materialized else ())


# ---- atomic writes and hashes (seqgen.atomic) ---------------------------------------------------------------
def write_json_atomic(path: Path, obj: Any) -> None:
    # a name of this process's own: ranged builds on several machines write the same build.json at once
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    commit(tmp, path)


def canonical_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    with h5py.File(tmp, "w") as f:
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
    commit(tmp, path)
    return file_sha256(path)


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


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ShardError(f"{what} {path} is unreadable ({e}); rebuild with `seqgen build`") from None
    if not isinstance(data, dict):
        raise ShardError(f"{what} {path} is not a JSON object; rebuild with `seqgen build`")
    return data


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a finished set; ShardError (one line) when absent or not this format."""
    path = Path(folder) / MANIFEST
    try:
        data = read_json(path, "manifest")
    except FileNotFoundError:
        raise ShardError(
            f"{folder} has no {MANIFEST}: not a finished shard set; run `seqgen build` or `seqgen finalize {folder}`"
        ) from None
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path} is format {data.get('format')!r} v{data.get('format_version')!r}, expected {FORMAT!r} "
            f"v{FORMAT_VERSION}; rebuild it with this version of seqgen"
        )
    return data


def manifest_config(manifest: dict[str, Any]) -> BuildConfig:
    try:
        return BuildConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise ShardError(f"manifest config is invalid ({e}); rebuild the set with `seqgen build`") from None


# ---- verify ---------------------------------------------------------------------------------
def _pools(header: dict[str, Any]) -> dict[str, np.ndarray]:
    sp = header["split"]
    rare, common = np.asarray(sp["rare"], np.int64), np.asarray(sp["common"], np.int64)
    return {
        "rare": rare,
        "common": common,
        "holdout": np.asarray(sp["holdout"], np.int64),
        "zipfian": np.concatenate([rare, common]),
    }


def allowed_pool(seq_type: SeqType) -> str:
    """The split pool every class of a sequence of this type comes from."""
    if seq_type is SeqType.FEWSHOT_HOLDOUT:
        return "holdout"
    if seq_type in (SeqType.FEWSHOT_COMMON, SeqType.NO_SUPPORT_COMMON):
        return "common"
    if seq_type in (SeqType.FEWSHOT_RARE, SeqType.NO_SUPPORT_RARE):
        return "rare"
    return "zipfian"  # bursty, mixed and the *_zipfian types: rare + common


def _in(values: np.ndarray, pool: np.ndarray, size: int) -> np.ndarray:
    table = np.zeros(size, dtype=bool)
    table[pool] = True
    return table[values]


def check_invariants(cfg: BuildConfig, header: dict[str, Any], data: dict[str, np.ndarray], sample: int) -> list[str]:
    """Problems (one line each) in one shard's arrays, as read from disk."""
    problems: list[str] = []
    ex, exm, lab, rare = data["example"], data["exemplar"], data["label"], data["is_rare"]
    n_cls = cfg.dataset.num_dataset_classes
    if ex.size and (ex.min() < 0 or ex.max() >= n_cls):
        return [f"example class ids outside [0, {n_cls})"]
    if lab.size and (lab.min() < 0 or lab.max() >= cfg.num_labels):
        problems.append(f"labels outside [0, num_labels={cfg.num_labels})")
    if exm.size and exm.max() >= cfg.dataset.exemplars_per_class:
        problems.append(f"exemplar >= exemplars_per_class={cfg.dataset.exemplars_per_class}")
    if rare.size and rare.max() > 1:
        problems.append("is_rare holds values other than 0 / 1")
    pools = _pools(header)
    kind = allowed_pool(cfg.seq_type)
    if not _in(ex, pools[kind], n_cls).all():
        problems.append(f"classes outside the {kind} pool that {cfg.seq_type.value} draws from")
    if not _in(ex[rare == 1], pools["rare"], n_cls).all():
        problems.append("is_rare = 1 on classes outside the rare pool")
    rows = ex.shape[0]
    idx = np.unique(np.linspace(0, rows - 1, num=min(rows, sample)).astype(np.int64)) if rows else np.zeros(0, np.int64)
    s_ex, s_lab, s_rare = ex[idx].astype(np.int64), lab[idx].astype(np.int64), rare[idx]
    q, ql, ctx, ctxl = s_ex[:, -1], s_lab[:, -1], s_ex[:, :-1], s_lab[:, :-1]
    fewshot_rows = np.ones(len(idx), bool) if cfg.seq_type.is_fewshot else np.zeros(len(idx), bool)
    if cfg.seq_type is SeqType.MIXED:
        fewshot_rows = s_rare[:, -1] == 1
        common_rows = ~fewshot_rows
        if not _in(s_ex[common_rows].ravel(), pools["common"], n_cls).all():
            problems.append("mixed: supervised (non-rare) sequences hold non-common classes")
    if fewshot_rows.any():
        support = ((ctx == q[:, None]) & (ctxl == ql[:, None])).sum(axis=1)
        if (support[fewshot_rows] < cfg.sequence.fs_shots).any():
            problems.append(f"few-shot: a query's (class, label) appears < fs_shots={cfg.sequence.fs_shots} times in its context")
    if cfg.seq_type.is_no_support and (ctx == q[:, None]).any():
        problems.append("no-support: a query class appears in its own context")
    return problems


def _check_shard(
    folder: Path, i: int, entry: dict[str, Any], cfg: BuildConfig, header: dict[str, Any], sample: int
) -> list[str]:
    name = entry.get("file", shard_file(i))
    path = folder / name
    expect_start, expect_rows = i * cfg.shard_size, cfg.shard_rows(i)
    if (name, entry.get("start"), entry.get("rows")) != (shard_file(i), expect_start, expect_rows):
        return [f"manifest entry {i} is {entry}, expected {shard_file(i)} start={expect_start} rows={expect_rows}"]
    if not path.exists():
        return [f"{name}: missing"]
    if file_sha256(path) != entry.get("sha256"):
        return [f"{name}: sha256 differs from the manifest (corrupt or truncated)"]
    dtypes = storage_dtypes(cfg)
    keys = expected_keys(cfg, bool(header.get("materialized")))
    shapes = {"noise_seed": (expect_rows,), "pixels": (expect_rows, cfg.length, IMAGE_SIZE, IMAGE_SIZE)}
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: int(f.attrs[k]) for k in ("format_version", "shard", "start", "rows")}
            if sorted(f.keys()) != sorted(keys):
                return [f"{name}: datasets {sorted(f.keys())}, expected {sorted(keys)}"]
            for k in keys:
                shape = shapes.get(k, (expect_rows, cfg.length))
                if f[k].shape != shape or f[k].dtype != dtypes[k]:
                    return [f"{name}: {k} is {f[k].dtype}{list(f[k].shape)}, expected {dtypes[k]}{list(shape)}"]
            data = {k: f[k][()] for k in INDEX_KEYS}
    except (OSError, KeyError) as e:
        return [f"{name}: unreadable ({e})"]
    if attrs != {"format_version": FORMAT_VERSION, "shard": i, "start": expect_start, "rows": expect_rows}:
        return [f"{name}: attributes {attrs} do not match the manifest"]
    return [f"{name}: {p}" for p in check_invariants(cfg, header, data, sample)]


def verify(folder: Path, *, sample: int = 4096, expected_split: Any = None) -> tuple[dict[str, Any], list[str]]:
    """Check a finished shard set; return (manifest, problems), problems one line each (empty: fine).

    `expected_split`: the `ClassSplit` recomputed from the manifest's config, compared with the manifest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    cfg = manifest_config(manifest)
    problems: list[str] = []
    if manifest.get("length") != cfg.length or manifest.get("num_labels") != cfg.num_labels:
        problems.append("manifest length / num_labels disagree with its config")
    if (cfg.dataset.example_type is ExampleType.SYMBOLIC) != (manifest.get("image_table") is None):
        problems.append("manifest image_table must be null exactly for symbolic data")
    if expected_split is not None:
        expect = build_header(cfg, expected_split, None, False)["split"]
        if manifest.get("split") != expect:
            problems.append("manifest split differs from the split its config produces")
    entries = manifest.get("shards")
    if not isinstance(entries, list) or len(entries) != cfg.num_shards:
        return manifest, problems + [f"manifest lists {len(entries or [])} shards, expected {cfg.num_shards}"]
    if sum(int(e.get("rows", 0)) for e in entries) != cfg.num_seqs:
        problems.append(f"shard rows do not add up to num_seqs={cfg.num_seqs}")
    for i, entry in enumerate(entries):
        problems += _check_shard(folder, i, entry, cfg, manifest, sample)
    return manifest, problems
