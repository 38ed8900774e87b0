"""Test helper: write a small shard set exactly in docs/shard-format.md's format (version 1), without seqgen."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from seqgen.config import BuildConfig, ExampleType
from seqgen.split import make_split

FIELDS = {"example": np.int32, "exemplar": np.uint8, "label": np.int32, "is_rare": np.uint8, "noise_seed": np.uint32}


def write_shard_set(directory: str | Path, cfg: BuildConfig, arrays: dict[str, np.ndarray], shard_size: int,
                    *, image_fingerprint: str = "test-table", manifest: bool = True) -> BuildConfig:
    """Write `arrays` (full-set arrays keyed by dataset name) as shards of `shard_size` rows + manifest.json.

    `cfg.num_seqs` / `cfg.shard_size` are replaced by the arrays' rows and `shard_size`; returns that config.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    n = len(arrays["example"])
    cfg = dataclasses.replace(cfg, num_seqs=n, shard_size=shard_size).validate()
    shards = []
    for s in range(cfg.num_shards):
        start, rows = s * shard_size, cfg.shard_rows(s)
        name = f"shard-{s:05d}.h5"
        with h5py.File(d / name, "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=np.asarray(value[start:start + rows], dtype=FIELDS[key]))
            f.attrs.update(format_version=1, shard=s, start=start, rows=rows)
        sha = hashlib.sha256((d / name).read_bytes()).hexdigest()
        shards.append({"file": name, "start": start, "rows": rows, "sha256": sha})
    symbolic = cfg.dataset.example_type is ExampleType.SYMBOLIC
    doc = {
        "format": "emergent-icl/seqgen-shards",
        "format_version": 1,
        "config": cfg.to_dict(),
        "length": cfg.length,
        "num_labels": cfg.num_labels,
        "split": make_split(cfg).to_dict(),
        "image_table": None if symbolic else {"fingerprint": image_fingerprint, "shape": [1623, 20, 105, 105]},
        "shards": shards,
    }
    if manifest:
        (d / "manifest.json").write_text(json.dumps(doc))
    return cfg
