"""seqgen's Python API: `open_shards(path)`, a finished shard set as a sequence set you index and iterate.

A thin layer on the shard format (`seqgen.shards`, docs/shard-format.md): the manifest is read and checked
by `shards.read_manifest` (format, version, field types), the config by `shards.manifest_config`, and rows
come from `shards.read_shard`, one whole shard at a time (contiguous reads are fast, random HDF5 row reads
are not: ENGINEERING.md), each shard's sha256 checked against the manifest when it is first read. Sequence
`i` is row `i - start` of the shard whose rows hold it, exactly as stored (stored dtypes: `example` and
`label` int16 or int32, `exemplar` and `is_rare` uint8, `noise_seed` uint32 when the set has noise).
`pixels` of a materialized set are not read (the trainer makes images on the device from the indices).
Documented in docs/api.md, with examples run as doctests.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from seqgen import shards as fmt
from seqgen.config import BuildConfig
from seqgen.configio import ConfigError

__all__ = ["SequenceSet", "open_shards"]

_CACHED_SHARDS = 4  # whole shards kept in memory (LRU): sequential reads load each shard once


class SequenceSet:
    """A finished shard set: `len(s)` sequences, `s[i]` (a dict of arrays for sequence i), `s[a:b]` (the
    same keys, stacked over rows a..b-1), iteration in order; `.manifest`, `.config` (its `BuildConfig`),
    `.split`, `.length` (examples per sequence, query included) and `.num_labels`. Make it with
    `open_shards`."""

    def __init__(self, path: Path, manifest: dict[str, Any], config: BuildConfig) -> None:
        self.path = path
        self.manifest = manifest
        self.config = config
        self.split: dict[str, Any] = manifest["split"]
        self.length: int = manifest["length"]
        self.num_labels: int = manifest["num_labels"]
        self._shards = manifest["shards"]
        self._starts = np.array([s["start"] for s in self._shards], np.int64)
        self._len = int(sum(s["rows"] for s in self._shards))
        self._cache: collections.OrderedDict[int, dict[str, np.ndarray]] = collections.OrderedDict()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (f"SequenceSet({str(self.path)!r}, seq_type={self.config.seq_type.value!r}, "
                f"sequences={self._len}, length={self.length})")

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        """The arrays of shard `index` (sha256-checked on first read), from a small LRU cache."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        entry = self._shards[index]
        path = self.path / entry["file"]
        if index not in self._verified:
            if not path.is_file():
                raise fmt.ShardError(f"shard set {self.path}: {entry['file']} is missing; rebuild the set with "
                                     "`seqgen build` (or check it with `seqgen verify`)")
            if fmt.file_sha256(path) != entry["sha256"]:
                raise fmt.ShardError(f"shard set {self.path}: {entry['file']} fails its sha256 check against "
                                     f"{fmt.MANIFEST} (corrupt or modified); run `seqgen verify` and rebuild the set")
            self._verified.add(index)
        data = fmt.read_shard(path)
        self._cache[index] = data
        while len(self._cache) > _CACHED_SHARDS:
            self._cache.popitem(last=False)
        return data

    def _locate(self, i: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        return shard, i - int(self._starts[shard])

    def __getitem__(self, index: Any) -> dict[str, np.ndarray]:
        if isinstance(index, slice):
            return self._rows(range(*index.indices(self._len)))
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"sequence sets are indexed by an int or a slice, not {type(index).__name__}")
        i = int(index) + (self._len if index < 0 else 0)
        if not 0 <= i < self._len:
            raise IndexError(f"sequence {int(index)} out of range for {self._len} sequences")
        shard, row = self._locate(i)
        return {k: np.array(v[row]) for k, v in self._shard(shard).items()}

    def _rows(self, rows: range) -> dict[str, np.ndarray]:
        """Rows `rows` stacked, read shard by shard."""
        idx = np.asarray(rows, np.int64)
        if idx.size == 0:
            first = self._shard(0)
            return {k: v[:0].copy() for k, v in first.items()}
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        order = []
        for shard in dict.fromkeys(shard_of.tolist()):  # the shards in order of first appearance
            where = np.nonzero(shard_of == shard)[0]
            order.append(where)
            for k, v in self._shard(shard).items():
                parts[k].append(v[idx[where] - self._starts[shard]])
        inverse = np.argsort(np.concatenate(order), kind="stable")
        return {k: np.concatenate(v)[inverse] for k, v in parts.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for shard in range(len(self._shards)):
            data = self._shard(shard)
            for row in range(self._shards[shard]["rows"]):
                yield {k: np.array(v[row]) for k, v in data.items()}


def open_shards(path: str | os.PathLike) -> SequenceSet:
    """Open the finished shard set in folder `path` (`seqgen build`'s output).

    Raises `seqgen.shards.ShardError` (a `seqgen.errors.UserError`, one line naming the fix) when the folder
    is missing, unfinished (no manifest), not this format, or its manifest is malformed or inconsistent."""
    folder = Path(path)
    manifest = fmt.read_manifest(folder)
    try:
        config = fmt.manifest_config(manifest).validate()
    except ConfigError as e:
        raise fmt.ShardError(f"shard set {folder}: manifest config is invalid ({e}); rebuild the set") from None
    expected = 0
    for index, entry in enumerate(manifest["shards"]):
        if entry["file"] != fmt.shard_file(index) or entry["start"] != expected or entry["rows"] < 1:
            raise fmt.ShardError(f"shard set {folder}: manifest entry {index} ({entry['file']}, start {entry['start']}, "
                                 f"{entry['rows']} rows) is out of sequence; rebuild the set")
        expected += entry["rows"]
    if not manifest["shards"] or expected != config.num_seqs:
        raise fmt.ShardError(f"shard set {folder}: its shards hold {expected} sequences, its config says "
                             f"{config.num_seqs}; rebuild the set")
    return SequenceSet(folder, manifest, config)
