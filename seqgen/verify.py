"""`seqgen verify`: re-check a finished shard set (`seqgen.shards`, the format) from its files alone:
manifest, hashes, row counts, shapes / dtypes, and the invariants of the sequence type (label and class
ranges, split pools, exemplar counts, few-shot / no-support structure, the strategy types' labels) on a
sample of rows; with the expected split, that the set's class split is the one its config makes and that
its rows regenerate from (config, shard index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from seqgen import seqtypes
from seqgen.config import IMAGE_SIZE, BuildConfig, ExampleType, Labeling, SeqType
from seqgen.files import canonical_sha256
from seqgen.shards import (BUILD_FILE, FORMAT_VERSION, INDEX_KEYS, MANIFEST, ShardError, build_header, expected_keys,
                           file_sha256, manifest_config, range_problems, read_json, read_manifest, read_shard,
                           shard_file, sidecar_file, storage_dtypes)

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
    """The split pool every class of a sequence of this type comes from (`seqgen.seqtypes`)."""
    return seqtypes.spec(seq_type).pool


def _in(values: np.ndarray, pool: np.ndarray, size: int) -> np.ndarray:
    table = np.zeros(size, dtype=bool)
    table[pool] = True
    return table[values]


def class_label_ranges(cfg: BuildConfig, pools: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """Per dataset class, the labels [lo, hi) its examples may carry in a set of this config, where the
    labeling fixes them (None where it does not: few-shot 'unfixed' labels, mixed sets, rare 'unfixed'; and
    the strategy types flip / copy_available, whose labels `check_invariants` checks against the trained ones).

    Ordered labels: rare index i -> [i*X, i*X + X) under polysemy X (X = 1 otherwise), common index j ->
    n_rare*X + j (bursty; no-support sets use the unshifted n_rare + j, as the original), holdout after
    the common ones; `original` labeling: the class id itself."""
    sq, t = cfg.sequence, cfg.seq_type
    n_cls = cfg.dataset.num_dataset_classes
    if t.is_fewshot or t is SeqType.MIXED or t.is_strategy:  # strategy types: their own invariants (verify)
        return None
    lo = np.full(n_cls, -1, np.int64)
    hi = np.full(n_cls, -1, np.int64)
    rare, common, holdout = pools["rare"], pools["common"], pools["holdout"]
    n_rare, n_common = len(rare), len(common)
    if t is SeqType.BURSTY:
        original = (sq.labeling_rare is Labeling.ORIGINAL, sq.labeling_common is Labeling.ORIGINAL)
        if sq.labeling_rare is Labeling.UNFIXED or original[0] != original[1]:
            return None  # a rare class's label then depends on the part of the sequence it is in
        if all(original):
            both = np.concatenate([rare, common])
            lo[both], hi[both] = both, both + 1
            return lo, hi
        X = sq.polysemy
        lo[rare] = np.arange(n_rare) * X
        hi[rare] = lo[rare] + X
        lo[common] = n_rare * X + np.arange(n_common)
        hi[common] = lo[common] + 1
        return lo, hi
    if sq.labeling_common is Labeling.ORIGINAL:
        every = np.concatenate([rare, common, holdout])
        lo[every], hi[every] = every, every + 1
        return lo, hi
    lo[rare] = np.arange(n_rare)
    lo[common] = n_rare + np.arange(n_common)
    lo[holdout] = n_rare + n_common + np.arange(len(holdout))
    hi[:] = np.where(lo >= 0, lo + 1, -1)
    return lo, hi


def check_invariants(cfg: BuildConfig, header: dict[str, Any], data: dict[str, np.ndarray], sample: int) -> list[str]:
    """Problems (one line each) in one shard's arrays, as read from disk."""
    problems = range_problems(cfg, data)
    ex, lab, rare = data["example"], data["label"], data["is_rare"]
    n_cls = cfg.dataset.num_dataset_classes
    if problems and problems[0].startswith("example class ids"):
        return problems[:1]
    pools = _pools(header)
    kind = allowed_pool(cfg.seq_type)
    if not _in(ex, pools[kind], n_cls).all():
        problems.append(f"classes outside the {kind} pool that {cfg.seq_type.value} draws from")
        return problems
    ranges = class_label_ranges(cfg, pools)
    in_range = not (lab.size and (lab.min() < 0 or lab.max() >= cfg.num_labels))
    if ranges is not None and ex.size and in_range:
        lo, hi = ranges[0][ex], ranges[1][ex]
        if ((lab < lo) | (lab >= hi)).any():
            r, k = (int(a[0]) for a in np.nonzero((lab < lo) | (lab >= hi)))
            problems.append(f"labels disagree with their classes' labeling (row {r}, position {k}: class "
                            f"{int(ex[r, k])} labelled {int(lab[r, k])}, expected [{int(lo[r, k])}, {int(hi[r, k])}))")
    elif (cfg.seq_type.is_fewshot or cfg.seq_type is SeqType.MIXED) and lab.size and in_range:
        fs = slice(None) if cfg.seq_type.is_fewshot else (rare[:, -1] == 1)
        if (lab[fs] >= cfg.sequence.ways).any():
            problems.append(f"few-shot labels outside 0..ways-1 = 0..{cfg.sequence.ways - 1}")
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
    if cfg.seq_type.is_strategy:
        problems += _strategy_problems(cfg, pools, s_ex, s_lab)
    return problems


def _strategy_problems(cfg: BuildConfig, pools: dict[str, np.ndarray], ex: np.ndarray, lab: np.ndarray) -> list[str]:
    """flip / copy_available (seqgen.sampling): `ways` distinct classes x `fs_shots`, one label each, the
    query one of them under its class's label; flip: no class under its trained label, the context labels
    a permutation of the classes' trained labels; copy_available: every label the trained one."""
    from seqgen.sampling import trained_label_table

    name, ways, shots = cfg.seq_type.value, cfg.sequence.ways, cfg.sequence.fs_shots
    trained = trained_label_table(cfg, pools["rare"], pools["common"])
    flip = cfg.seq_type is SeqType.FLIP
    for e, l in zip(ex, lab):
        ctx, ctxl = e[:-1], l[:-1]
        classes, counts = np.unique(ctx, return_counts=True)
        if len(classes) != ways or (counts != shots).any():
            return [f"{name}: a context does not hold {ways} distinct classes {shots} times each"]
        own = {int(c): set(ctxl[ctx == c].tolist()) for c in classes}
        if any(len(v) != 1 for v in own.values()):
            return [f"{name}: a class carries two labels within one context"]
        if int(e[-1]) not in own or {int(l[-1])} != own[int(e[-1])]:
            return [f"{name}: a query's class or label is not the one its context shows"]
        ctx_labels = {c: next(iter(v)) for c, v in own.items()}
        want = {c: int(trained[c]) for c in ctx_labels}
        if flip and (any(ctx_labels[c] == want[c] for c in ctx_labels)
                     or sorted(ctx_labels.values()) != sorted(want.values())):
            return [f"{name}: in-context labels are not a derangement of the classes' trained labels"]
        if not flip and ctx_labels != want:
            return [f"{name}: a class in the context is not under its trained label"]
    return []


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
    problems += _check_identity(folder, manifest, entries)
    for i, entry in enumerate(entries):
        problems += _check_shard(folder, i, entry, cfg, manifest, sample)
    if expected_split is not None and not problems:
        problems += _check_regenerated(folder, cfg, expected_split, entries)
    return manifest, problems


def _check_identity(folder: Path, manifest: dict[str, Any], entries: list[dict[str, Any]]) -> list[str]:
    """The manifest's header (config, split, ...) must be the one build.json and every sidecar record: the
    sidecars name the build that wrote each shard by the hash of that header, so an edited manifest config
    is caught even where it would still pass every other check."""
    header = {k: v for k, v in manifest.items() if k != "shards"}
    build_id = canonical_sha256(header)
    problems: list[str] = []
    try:
        if canonical_sha256(read_json(folder / BUILD_FILE, BUILD_FILE)) != build_id:
            problems.append(f"{MANIFEST} differs from {BUILD_FILE} (edited manifest or build.json); rebuild the set")
    except FileNotFoundError:
        pass
    except ShardError as e:
        problems.append(str(e))
    for i, entry in enumerate(entries):
        try:
            side = read_json(folder / sidecar_file(i), "sidecar")
        except FileNotFoundError:
            continue
        except ShardError as e:
            problems.append(str(e))
            continue
        if side["build"] != build_id:
            problems.append(f"{sidecar_file(i)}: shard {i} was written by another build than {MANIFEST} describes "
                            "(edited manifest config?); rebuild the set")
            break
    return problems


def _check_regenerated(folder: Path, cfg: BuildConfig, split: Any, entries: list[dict[str, Any]],
                       rows: int = 16) -> list[str]:
    """Regenerate the first rows of every shard from the manifest's config and compare: what a config edit
    changes shows up here even without build.json and sidecars."""
    from seqgen.sampling import generate

    for i, entry in enumerate(entries):
        n = min(rows, int(entry["rows"]))
        want = generate(cfg, split, int(entry["start"]), n)
        got = read_shard(folder / entry["file"], [k for k in want])
        for k in want:
            if not np.array_equal(np.asarray(got[k][:n], np.int64), np.asarray(want[k], np.int64)):
                return [f"{entry['file']}: {k} differs from what the manifest's config generates (edited config, or "
                        "shards of another build); rebuild the set"]
    return []
