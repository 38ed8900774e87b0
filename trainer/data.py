"""Shard sets on the host: open and validate a seqgen shard set, stream its batches, iterate it for evaluation.

A shard set (docs/shard-format.md) is a directory of `shard-NNNNN.h5` files plus a
`manifest.json` written last; `open_shard_set` refuses a directory without it (an unfinished build),
checks (with seqgen's own manifest reader) the format version and the manifest's field types, that the
class split is the one its config produces, that every shard is there with the advertised rows, shapes,
dtypes and attributes (a swapped shard names another index), and reads the `seqgen.config.BuildConfig`
back. The reader checks each shard's sha256 against the manifest when it first reads it, and the value
ranges of every block it reads (class ids, labels, exemplars, is_rare), refusing with one line.
`check_compatible` refuses an evaluation set whose class split, label space, dataset options or image
table differ from the training set's (`open_sets`: a run's training and eval sets, checked, with
`check_roles`: no evaluation-only set as the training set, no set both trained and evaluated on unless
asked, and `check_eval_names`: no two evaluation sets recorded under one name; `--eval NAME=PATH` names one);
`data_record` is what a run records of its sets (paths, manifest fingerprints).

Data order is a pure function of (shard set, batch size, step), as in Grain / Levanter: batch `k` is rows
`(k*B + j) mod num_seqs`, `j < B`, of the concatenated set (epochs repeat in the same order; the order was
randomised when the set was built). Resuming at step `k` needs only `k`. With `process_count = P` hosts,
host `p` reads only the slice `j in [p*B/P, (p+1)*B/P)` of every global batch, so the hosts' slices
concatenate to the global batch.

`BatchStream` reads on ONE background thread (h5py serialises all HDF5 calls, so more threads would not
help) in large contiguous blocks that it keeps in a small LRU cache (random row reads of HDF5 are slow,
ENGINEERING.md), and prefetches a few batches into a bounded queue. It yields dicts of integer numpy
arrays only; pixels are made on the device (`trainer.images`):

    example [B, L] int32   exemplar [B, L] int32   label [B, L] int32   is_rare [B, L] int32
    noise_seed [B] uint32 (zeros when the set has none)   row [B] int64 (global row index)

`eval_batches` yields the first `n` sequences once, in order, the last batch padded, with `valid [B] bool`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from seqgen import shards as fmt
from seqgen.config import BuildConfig
from seqgen.configio import ConfigError
from seqgen.errors import UserError
from seqgen.files import canonical_sha256

__all__ = [
    "FORMAT", "FORMAT_VERSION", "BatchStream", "DataError", "EvalSpec", "ShardInfo", "ShardSet", "check_compatible",
    "check_eval_names", "check_roles", "data_record", "eval_batches", "eval_name", "manifest_fingerprint",
    "open_sets", "open_shard_set", "parse_eval_spec",
]

FORMAT, FORMAT_VERSION, MANIFEST = fmt.FORMAT, fmt.FORMAT_VERSION, fmt.MANIFEST  # seqgen's own format
SEQ_FIELDS = ("example", "exemplar", "label", "is_rare")  # [rows, length] in every shard


class DataError(UserError):
    """A missing, unfinished, corrupt or mismatched shard set; the message is one line naming the fix."""


@dataclass(frozen=True)
class ShardInfo:
    file: str
    start: int
    rows: int
    sha256: str


@dataclass(frozen=True, eq=False)
class ShardSet:
    """A validated shard set: its manifest, typed config and the facts the trainer needs."""

    path: Path
    manifest: dict[str, Any]
    config: BuildConfig
    num_seqs: int
    length: int
    num_labels: int
    split: dict[str, Any]
    image_table_fingerprint: str | None
    # shard files whose sha256 was checked against the manifest by this process (on first read)
    verified: set[str] = field(default_factory=set, repr=False)
    _verify_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    label: str | None = None  # an evaluation set's name given with --eval NAME=PATH (`eval_name`)

    @property
    def shards(self) -> tuple[ShardInfo, ...]:
        return tuple(ShardInfo(s["file"], int(s["start"]), int(s["rows"]), str(s.get("sha256", "")))
                     for s in self.manifest["shards"])

    def verify_shard(self, info: ShardInfo) -> None:
        """Check the shard file's sha256 against the manifest, once per process (DataError when it differs).

        Hashing reads the file once: 38-42 ms for a default 14 MB shard of 262,144 bursty sequences, about
        1e-4 of an epoch of training on it (`bench/shard_check_bench.py`; docs/shard-format.md)."""
        with self._verify_lock:
            if info.file in self.verified:
                return
            if fmt.file_sha256(self.path / info.file) != info.sha256:
                raise _fail(self.path, f"{info.file} fails its sha256 check against {MANIFEST} (corrupt, swapped or "
                                       "modified shard, or an edited manifest); run `seqgen verify` and rebuild the set")
            self.verified.add(info.file)


# ---- opening and validating ------------------------------------------------------------------
def _fail(path: Path, what: str) -> DataError:
    return DataError(f"shard set {path}: {what}")


def _read_manifest(path: Path) -> dict[str, Any]:
    """seqgen's own manifest reader (format, version and field types checked), errors as DataError."""
    try:
        return fmt.read_manifest(path)
    except fmt.ShardError as e:
        raise DataError(str(e)) from None


def _check_shard_file(path: Path, info: ShardInfo, index: int, length: int, needs_seed: bool) -> None:
    """Datasets, shapes, dtypes and attributes of one shard, as the format and the manifest say."""
    fpath = path / info.file
    if not fpath.is_file():
        raise _fail(path, f"shard file {info.file} is missing; rebuild the set")
    try:
        with h5py.File(fpath, "r") as f:
            names = SEQ_FIELDS + (("noise_seed",) if needs_seed else ())
            for name in names:
                if name not in f:
                    raise _fail(path, f"{info.file} lacks dataset '{name}'; rebuild the set")
                want = (info.rows,) if name == "noise_seed" else (info.rows, length)
                if f[name].shape != want:
                    raise _fail(path, f"{info.file}/{name} has shape {f[name].shape}, manifest says "
                                      f"{want}; rebuild the set")
                if (why := fmt.dtype_problem(name, f[name].dtype)) is not None:
                    raise _fail(path, f"{info.file}: {why}; rebuild the set")
            attrs = {k: (int(f.attrs[k]) if k in f.attrs else None) for k in ("shard", "start", "rows")}
    except OSError as e:
        raise _fail(path, f"cannot read {info.file} ({' '.join(str(e).split())}); rebuild the set") from None
    if attrs != {"shard": index, "start": info.start, "rows": info.rows}:
        raise _fail(path, f"{info.file} says it is shard {attrs['shard']} (start {attrs['start']}, rows "
                          f"{attrs['rows']}) but the manifest lists it as shard {index} (start {info.start}, rows "
                          f"{info.rows}): swapped or foreign shard files; rebuild the set")


def open_shard_set(path: str | Path, *, check_checksums: bool = False) -> ShardSet:
    """Open and validate a shard set directory; DataError (one line) when unusable.

    Every shard's sha256 is checked when it is first read (`ShardSet.verify_shard`); `check_checksums`
    checks them all now."""
    path = Path(path)
    m = _read_manifest(path)
    try:
        cfg = BuildConfig.from_dict(m["config"]).validate()
    except (ConfigError, TypeError) as e:
        raise _fail(path, f"manifest config is invalid ({e}); rebuild the set") from None
    length, num_labels = int(m["length"]), int(m["num_labels"])
    if length != cfg.length or num_labels != cfg.num_labels:
        raise _fail(path, f"manifest length/num_labels ({length}/{num_labels}) disagree with its config "
                          f"({cfg.length}/{cfg.num_labels}); rebuild the set")
    from seqgen.split import make_split

    if m["split"] != make_split(cfg).to_dict():
        raise _fail(path, f"the class split in {MANIFEST} differs from the split its config produces (edited "
                          "manifest); rebuild the set")
    image_table = m.get("image_table")
    fingerprint = image_table.get("fingerprint") if isinstance(image_table, dict) else None
    ss = ShardSet(path, m, cfg, 0, length, num_labels, m["split"], fingerprint)
    shards = ss.shards
    if not shards:
        raise _fail(path, "manifest lists no shards; rebuild the set")
    expected = 0
    for index, info in enumerate(shards):
        if info.start != expected or info.rows < 1 or info.file != fmt.shard_file(index):
            raise _fail(path, f"shard {info.file} starts at {info.start} with {info.rows} rows, expected "
                              f"{fmt.shard_file(index)} at start {expected}; rebuild the set")
        expected += info.rows
        _check_shard_file(path, info, index, length, cfg.needs_noise_seed)
    if expected != cfg.num_seqs:
        raise _fail(path, f"shards hold {expected} sequences, config says {cfg.num_seqs}; rebuild the set")
    ss = ShardSet(path, m, cfg, expected, length, num_labels, m["split"], fingerprint)
    if check_checksums:
        for info in shards:
            ss.verify_shard(info)
    return ss


def check_compatible(train: ShardSet, other: ShardSet) -> None:
    """Refuse (DataError, one line) an evaluation set that does not share the training set's classes and labels."""
    def split_lists(s: ShardSet) -> dict[str, Any]:
        return {k: s.split.get(k) for k in ("rare", "common", "holdout", "zipf_weights_sha256")}

    checks = [
        ("dataset config", train.config.dataset == other.config.dataset, "same dataset options"),
        ("class split", split_lists(train) == split_lists(other), "same split options"),
        ("num_labels", train.num_labels == other.num_labels,
         f"{train.num_labels} vs {other.num_labels}; same split and labeling options"),
        ("image table", train.image_table_fingerprint == other.image_table_fingerprint, "same Omniglot"),
    ]
    for what, ok, fix in checks:
        if not ok:
            raise DataError(f"eval set {other.path} does not match training set {train.path}: {what} differs; "
                            f"rebuild it with the training set's options ({fix})")


# ---- evaluation sets: names and roles ---------------------------------------------------------------------
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
ALLOW_TRAIN_EVAL = "--allow-train-eval"  # the command-line flag that lets a set be trained and evaluated on


@dataclass(frozen=True)
class EvalSpec:
    """An evaluation set as given: its folder, its name (`--eval NAME=PATH`; else the folder's base name)
    and whether it may also be the training set (`--allow-train-eval`)."""

    path: Path
    name: str | None = None
    also_train: bool = False


def parse_eval_spec(spec: "str | os.PathLike | EvalSpec", *, also_train: bool = False) -> EvalSpec:
    """`PATH` or `NAME=PATH` (a NAME of letters, digits and `_ . + -`, no `/`; a path that exists as written,
    `=` and all, is a path)."""
    if isinstance(spec, EvalSpec):
        return spec
    text = os.fspath(spec)
    name, eq, rest = text.partition("=")
    if isinstance(spec, str) and eq and "/" not in name and not os.path.lexists(text):
        if not _NAME.match(name) or not rest:
            raise DataError(f"--eval {text}: NAME=PATH needs a NAME of letters, digits and _ . + - (starting with a "
                            "letter or digit) and a PATH; e.g. --eval icl=data/shards/fewshot_holdout")
        return EvalSpec(Path(rest), name, also_train)
    return EvalSpec(Path(text), None, also_train)


def eval_name(shard_set: ShardSet) -> str:
    """The name an evaluation set's results are recorded under: --eval NAME=PATH's NAME, else its folder's name."""
    return shard_set.label or Path(shard_set.path).name


def check_eval_names(evals: Sequence[ShardSet]) -> None:
    """Refuse (one line) two evaluation sets that would be recorded under one name (one's results would
    overwrite the other's), naming both and names that tell them apart."""
    seen: dict[str, ShardSet] = {}
    for e in evals:
        name = eval_name(e)
        first = seen.setdefault(name, e)
        if first is e:
            continue
        a, b = Path(first.path), Path(e.path)
        if a.resolve() == b.resolve():
            raise DataError(f"evaluation set {b} is given twice (as '{name}'); drop one --eval")
        names = [f"{p.parent.name}-{p.name}" if p.parent.name else p.name for p in (a, b)]
        if names[0] == names[1] or any(n in seen for n in names) or not all(_NAME.match(n) for n in names):
            names = [f"{name}-1", f"{name}-2"]
        raise DataError(f"evaluation sets {a} and {b} would both be recorded as '{name}' (one's results would "
                        f"overwrite the other's); name them apart: --eval {names[0]}={a} --eval {names[1]}={b}")


def check_roles(train: ShardSet, evals: Sequence[ShardSet], specs: Sequence[EvalSpec] | None = None, *,
                train_role: bool = True) -> None:
    """Refuse (one line) a training set of an evaluation-only type (`SeqType.evaluation_only`: its classes are
    held out of training), unless `train_role` is False (the run already trained: `trainer evaluate`), and an
    evaluation set that is the training set itself (same folder or same content), unless its spec says
    `also_train` (`--allow-train-eval`)."""
    seq_type = train.config.seq_type
    if train_role and seq_type.evaluation_only:
        raise DataError(f"--train {train.path} is a {seq_type.value} set, for evaluation only (its sequences show "
                        "the split's holdout classes, which must stay unseen in training); train on a training set "
                        f"(e.g. `seqgen build --type bursty`) and pass this one as --eval {train.path}")
    fingerprint = manifest_fingerprint(train)
    for i, e in enumerate(evals):
        also = specs[i].also_train if specs is not None else False
        same = Path(e.path).resolve() == Path(train.path).resolve() or manifest_fingerprint(e) == fingerprint
        if same and not also:
            raise DataError(f"{e.path} is both the training set and an evaluation set (the results would measure "
                            "memorised training sequences, not ICL / IWL); evaluate on a separately built set (e.g. "
                            "`seqgen build` with another --seed), or add "
                            f"{ALLOW_TRAIN_EVAL} if that is what you mean")


def open_sets(train_path: str | os.PathLike, eval_paths: Sequence["str | os.PathLike | EvalSpec"], *,
              train_role: bool = True) -> tuple[ShardSet, list[ShardSet]]:
    """The training set and the eval sets of a run (each a path, `NAME=PATH` or an `EvalSpec`), each validated
    and checked against the training set; evaluation names unique (`check_eval_names`) and roles respected
    (`check_roles`), all before any training or evaluation. Every evaluation shard's sha256 is checked now
    (the training set's are checked as training reads them, from step 1): a damaged evaluation set used to
    be found at the first evaluation, after the steps before it had been trained."""
    specs = [parse_eval_spec(p) for p in eval_paths]
    train = open_shard_set(train_path)
    evals = [dataclasses.replace(open_shard_set(s.path, check_checksums=True), label=s.name) for s in specs]
    check_roles(train, evals, specs, train_role=train_role)
    check_eval_names(evals)
    for e in evals:
        check_compatible(train, e)
    return train, evals


def manifest_fingerprint(s: ShardSet) -> str:
    """sha256 of the manifest (which lists every shard's sha256): identifies a shard set's content."""
    return canonical_sha256(s.manifest, spaced=True)  # the form stored in every run's config.json


def data_record(train: ShardSet, evals: Sequence[ShardSet]) -> dict[str, Any]:
    """Paths and fingerprints of a run's shard sets, saved in config.json and checkpoints."""

    def one(s: ShardSet) -> dict[str, Any]:
        return {
            "path": str(Path(s.path).resolve()),
            "seq_type": s.config.seq_type.value,
            "fingerprint": manifest_fingerprint(s),
        }

    return {
        "train": one(train),
        "eval": [{**one(e), "name": eval_name(e)} for e in evals],
        "num_labels": train.num_labels,
        "ways": train.config.sequence.ways,
        "n_holdout": train.config.split.n_holdout_classes,
    }


# ---- reading rows ------------------------------------------------------------------------------
class _RowReader:
    """Rows of a shard set by global index, read in contiguous blocks kept in a small LRU cache."""

    def __init__(self, ss: ShardSet, block_rows: int, cache_blocks: int = 4):
        self.ss = ss
        self.shards = ss.shards
        self.starts = np.array([s.start for s in self.shards], np.int64)
        self.block_rows = block_rows
        self.cache: collections.OrderedDict[tuple[int, int], dict[str, np.ndarray]] = collections.OrderedDict()
        self.cache_blocks = cache_blocks
        self.files: dict[int, h5py.File] = {}

    def _block(self, shard: int, block: int) -> dict[str, np.ndarray]:
        key = (shard, block)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        info = self.shards[shard]
        if shard not in self.files:
            self.ss.verify_shard(info)  # sha256 against the manifest, on first read
            self.files[shard] = h5py.File(self.ss.path / info.file, "r")
        f = self.files[shard]
        lo, hi = block * self.block_rows, min((block + 1) * self.block_rows, info.rows)
        data = {}
        for name in SEQ_FIELDS:
            raw = f[name][lo:hi]
            if (why := fmt.dtype_problem(name, raw.dtype)) is not None:
                raise _fail(self.ss.path, f"{info.file}: {why}; rebuild the set")
            data[name] = np.asarray(raw, dtype=np.int32)
        if problems := fmt.range_problems(self.ss.config, data):
            raise _fail(self.ss.path, f"{info.file} rows {lo}..{hi - 1}: {problems[0]}; run `seqgen verify` "
                                      "and rebuild the set")
        if "noise_seed" in f:
            data["noise_seed"] = np.asarray(f["noise_seed"][lo:hi], dtype=np.uint32)
        else:
            data["noise_seed"] = np.zeros(hi - lo, np.uint32)
        self.cache[key] = data
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)
        return data

    def read(self, start: int, count: int) -> dict[str, np.ndarray]:
        """Rows (start + i) mod num_seqs for i < count, as one dict of arrays (+ 'row')."""
        n = self.ss.num_seqs
        parts: list[dict[str, np.ndarray]] = []
        pos, left = start % n, count
        while left > 0:
            shard = int(np.searchsorted(self.starts, pos, side="right") - 1)
            local = pos - int(self.starts[shard])
            block = local // self.block_rows
            data = self._block(shard, block)
            off = local - block * self.block_rows
            take = min(left, len(data["example"]) - off)
            parts.append({k: v[off:off + take] for k, v in data.items()})
            pos, left = (pos + take) % n, left - take
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out["row"] = (start + np.arange(count, dtype=np.int64)) % n
        return out

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
        self.cache.clear()


# ---- the background stream ----------------------------------------------------------------------
_END = object()


@dataclass(frozen=True)
class _Failure:
    exc: BaseException


class BatchStream:
    """Host batches `start_step, start_step + 1, ...` (until `stop_step`, else forever), read on a thread.

    Use as an iterator and close it (`close()` or `with BatchStream(...) as s:`). `step` is the index of
    the next batch `next()` returns, i.e. what a checkpoint must store to resume exactly.
    """

    def __init__(self, shard_set: ShardSet, batch_size: int, *, start_step: int = 0, stop_step: int | None = None,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 4, block_rows: int = 1 << 16):
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} must be in [0, process_count={process_count})")
        if batch_size % process_count:
            raise DataError(f"batch size {batch_size} must be divisible by the {process_count} processes")
        if start_step < 0:
            raise DataError(f"start step must be >= 0, got {start_step}")
        if prefetch < 1 or block_rows < 1:
            raise DataError("prefetch and block_rows must be >= 1")
        self.shard_set = shard_set
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.offset = process_index * self.local_batch_size
        self.step = start_step
        self.stop_step = stop_step
        self._block_rows = block_rows
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._done = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="BatchStream", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        reader = _RowReader(self.shard_set, self._block_rows)
        try:
            k = self.step
            while self.stop_step is None or k < self.stop_step:
                batch = reader.read(k * self.batch_size + self.offset, self.local_batch_size)
                if not self._put(batch):
                    return
                k += 1
            self._put(_END)
        except BaseException as e:  # re-raised in the consumer
            self._put(_Failure(e))
        finally:
            reader.close()

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._error is not None:
            raise self._error
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if self._stop.is_set() or not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise StopIteration from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._error = item.exc
            raise item.exc
        self.step += 1
        return item

    def close(self) -> None:
        """Stop the reader thread and wait for it; idempotent."""
        self._stop.set()
        self._done = True
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)

    def __enter__(self) -> "BatchStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()


def eval_batches(shard_set: ShardSet, batch_size: int, max_seqs: int | None = None, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The first `min(max_seqs, num_seqs)` sequences once, in order; batches carry `valid [b] bool`.

    The last batch is padded to full size with further (wrapped) rows whose `valid` is False, so summing
    per-sequence metrics over `valid` rows counts exactly n sequences.
    """
    if max_seqs is not None and max_seqs < 1:
        raise DataError(f"max_seqs must be >= 1, got {max_seqs}")
    n = shard_set.num_seqs if max_seqs is None else min(max_seqs, shard_set.num_seqs)
    num_batches = -(-n // batch_size)
    stream = BatchStream(shard_set, batch_size, stop_step=num_batches, process_index=process_index,
                         process_count=process_count)
    try:
        for k, batch in enumerate(stream):
            j = k * batch_size + stream.offset + np.arange(stream.local_batch_size, dtype=np.int64)
            batch["valid"] = j < n
            yield batch
    finally:
        stream.close()
