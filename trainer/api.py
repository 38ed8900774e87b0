"""The trainer's Python API: `load_run("runs/x")`, a run directory as an object (docs/api.md).

A thin layer on the modules that already read and use a run: `trainer.run` (config.json) and `trainer.runlog` (metrics.jsonl and
its evaluation store; `series` is also what `trainer plot` draws), `trainer.checkpoint` (the steps),
`trainer.state` (`load_state`), `trainer.data` / `trainer.images` (the training set, its class split and
the image table) and `trainer.evaluate` (`evaluate_run`: `Run.evaluate` is `trainer evaluate`, the same
code and the same numbers; it records nothing unless asked). `TrainedModel` runs a checkpoint's model on
batches of sequences (`seqgen.open_shards` slices): logits through `trainer.models.forward`, attention
weights through `trainer.analyze.measures.tokens_of` and `trainer.analyze.inspect.inspect`.

Every expected failure (no such run, no checkpoint, a moved training set, a bad shard set) is a one-line
`seqgen.errors.UserError` subclass naming the fix (`RunError`, `CheckpointError`, `DataError`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from seqgen.config import BuildConfig, SeqType
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import ShardSet, open_shard_set
from trainer.metrics import metric_key_of
from trainer.run import RunDir, RunError
from trainer.runlog import series

__all__ = ["Curve", "Metrics", "Run", "Series", "TrainedModel", "load_run"]

PathLike = str | os.PathLike
DEFAULT_CACHE_DIR = "data/cache"  # as `--cache-dir` (seqgen.cliopts)


class Series(NamedTuple):
    """A training metric against step: `steps` int64 [n], `values` float64 [n] (NaN where it diverged)."""

    steps: np.ndarray
    values: np.ndarray


class Curve(NamedTuple):
    """An evaluation metric against step: `steps` int64 [n]; `mean`, `lo`, `hi` (its 95 % interval) float64
    [n]; `n` int64 [n], the sequences each point was computed on."""

    steps: np.ndarray
    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    n: np.ndarray


class Metrics(Mapping[str, Series]):
    """A run's metrics as arrays. As a mapping: the training metrics (`metrics["loss"]` is a `Series`, logged
    every `log_every` steps). `evals[set][metric]`: a `Curve` per eval set (its folder name) and metric, from
    the evaluations of `trainer fit` (and `trainer evaluate --watch`); `seq_types[set]`: each set's sequence
    type; `icl` / `iwl`: the paper's headline curves (`trainer.metrics`)."""

    def __init__(self, train: dict[str, Series], evals: dict[str, dict[str, Curve]], seq_types: dict[str, str]):
        self._train = train
        self.evals = evals
        self.seq_types = seq_types

    def __getitem__(self, name: str) -> Series:
        try:
            return self._train[name]
        except KeyError:
            raise KeyError(f"no training metric {name!r}; the run logged {sorted(self._train)} (evaluation curves "
                           "are in .evals[set][metric])") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._train)

    def __len__(self) -> int:
        return len(self._train)

    def __repr__(self) -> str:
        return f"Metrics(train={sorted(self._train)}, evals={sorted(self.evals)})"

    def _headline(self, seq_type: SeqType, what: str) -> Curve:
        names = [s for s, t in self.seq_types.items() if t == seq_type.value]
        if not names:
            raise RunError(f"this run has no {what} curve: it was not evaluated on a {seq_type.value} set; fit with "
                           f"--eval on one, or evaluate its checkpoints with Run.evaluate")
        return self.evals[names[0]][metric_key_of(seq_type)]

    @property
    def icl(self) -> Curve:
        """ICL: accuracy_closed on the run's (first) fewshot_holdout eval set."""
        return self._headline(SeqType.FEWSHOT_HOLDOUT, "ICL")

    @property
    def iwl(self) -> Curve:
        """IWL: accuracy_query on the run's (first) no_support_zipfian eval set."""
        return self._headline(SeqType.NO_SUPPORT_ZIPFIAN, "IWL")


def _metrics(run: RunDir) -> Metrics:
    train, evals = series(run)
    as_series = {k: Series(np.array([s for s, _ in pts], np.int64),
                           np.array([np.nan if v is None else v for _, v in pts], np.float64))
                 for k, pts in train.items()}
    curves: dict[str, dict[str, Curve]] = {}
    seq_types: dict[str, str] = {}
    for (name, seq_type), pts in evals.items():
        seq_types[name] = seq_type
        names = dict.fromkeys(m for _, metrics in pts for m in metrics)
        curves[name] = {}
        for m in names:
            got = [(s, ms[m]) for s, ms in pts if m in ms]
            curves[name][m] = Curve(np.array([s for s, _ in got], np.int64),
                                    np.array([v["mean"] for _, v in got], np.float64),
                                    np.array([v["ci95"][0] for _, v in got], np.float64),
                                    np.array([v["ci95"][1] for _, v in got], np.float64),
                                    np.array([v["n"] for _, v in got], np.int64))
    return Metrics(as_series, curves, seq_types)


# ---- a checkpoint's model ---------------------------------------------------------------------------------
Batch = Mapping[str, Any]  # example, label [B, L] (or [L]: one sequence); exemplar, noise_seed where needed


def _device_batch(batch: Batch) -> dict[str, jax.Array]:
    """The integer arrays the model's input pipeline reads, batched ([L] -> [1, L]) and on the device."""
    if "example" not in batch or "label" not in batch:
        raise RunError(f"a batch needs 'example' and 'label' arrays (a seqgen.open_shards slice), got keys {sorted(batch)}")
    example = np.asarray(batch["example"])
    one = example.ndim == 1
    b = 1 if one else example.shape[0]

    def arr(name: str, dtype: Any, default: np.ndarray) -> jax.Array:
        v = np.asarray(batch[name]) if name in batch else default
        return jnp.asarray((v[None] if one else v).astype(dtype))

    return {"example": arr("example", np.int32, example), "label": arr("label", np.int32, example),
            "exemplar": arr("exemplar", np.int32, np.zeros_like(example)),
            "noise_seed": arr("noise_seed", np.uint32, np.zeros(() if one else (b,), np.uint32))}


@functools.lru_cache(maxsize=16)
def _passes(set_cfg: BuildConfig, train_cfg: TrainConfig) -> tuple[Any, Any]:
    """Jitted logits and attention passes for batches of a set of config `set_cfg` (static), with the inputs
    made as the run `train_cfg` makes them."""
    from trainer.analyze.inspect import inspect
    from trainer.analyze.measures import tokens_of
    from trainer.images import examples_for
    from trainer.models import forward

    make_examples = examples_for(train_cfg)

    @eqx.filter_jit
    def logits(table, model, bn_state, batch, key):
        examples = make_examples(table, batch, set_cfg)
        return forward(model, bn_state, examples, batch["label"], key=key, inference=True)[0]

    @eqx.filter_jit
    def attention(table, model, bn_state, batch):
        tokens = tokens_of(model, bn_state, make_examples(table, batch, set_cfg), batch["label"])
        model = eqx.nn.inference_mode(model)
        return jax.vmap(lambda x: inspect(model.seq_model, x, collect=True)[1]["attention"])(tokens)

    return logits, attention


@dataclass(frozen=True, eq=False)
class TrainedModel:
    """The model of one checkpoint and what it takes to run it: `model` (a `trainer.models.Model`, an Equinox
    module), its BatchNorm state `bn_state`, the device image `table` (a placeholder for symbolic data), the
    run's `config` and its training set's `data_config` (label space, dataset)."""

    step: int
    model: Any
    bn_state: Any
    table: jax.Array
    config: TrainConfig
    data_config: BuildConfig

    def logits(self, batch: Batch, set_config: BuildConfig | None = None, *, key: jax.Array | None = None) -> np.ndarray:
        """Logits [B, T, num_labels] (T = 2L - 1 interleaved tokens; the query's prediction is [:, -1]) for a
        batch of sequences (e.g. `seqgen.open_shards(p)[0:8]`; one sequence gives B = 1), at inference.
        `set_config`: the BuildConfig of the set the batch comes from (its images: noise, augmentation;
        default the training set's). `key`: only for models with example dropout (active at inference)."""
        fn, _ = _passes(set_config or self.data_config, self.config)
        return np.asarray(fn(self.table, self.model, self.bn_state, _device_batch(batch), key))

    def predict(self, batch: Batch, set_config: BuildConfig | None = None, *, key: jax.Array | None = None) -> np.ndarray:
        """The predicted label of each sequence's query [B] (open vocabulary: argmax over every label)."""
        return self.logits(batch, set_config, key=key)[:, -1].argmax(-1)

    def attention(self, batch: Batch, set_config: BuildConfig | None = None) -> np.ndarray:
        """Attention weights [B, layers, heads, T, T] (row: the attending token; tokens x_0, y_0, ..., x_query),
        as `trainer analyze` measures them. Transformers with interleaved labels only."""
        from trainer.analyze.measures import check_model

        check_model(self.config)
        _, fn = _passes(set_config or self.data_config, self.config)
        return np.asarray(fn(self.table, self.model, self.bn_state, _device_batch(batch)))


# ---- the run ----------------------------------------------------------------------------------------------
class Run:
    """A run directory of `trainer fit` (make it with `load_run`).

    `config`: its TrainConfig; `data`: config.json's record of its shard sets (paths, fingerprints);
    `metrics`: `Metrics` (re-read at each access: a running fit appends); `checkpoints`: the steps of its
    complete checkpoints; `model(step)`: a `TrainedModel`; `evaluate(paths)`: `trainer evaluate`."""

    def __init__(self, path: PathLike, *, train: PathLike | None, omniglot: PathLike | None, cache_dir: PathLike | None):
        self.dir = RunDir(path)
        self.path = self.dir.path
        self._train_override = train
        self._omniglot, self._cache_dir = omniglot, cache_dir
        self.data: dict[str, Any] = self.dir.read()["data"]
        self.config: TrainConfig = self.dir.train_config()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={self.config.training.steps}, checkpoints={self.checkpoints})"

    @property
    def metrics(self) -> Metrics:
        return _metrics(self.dir)

    @property
    def checkpoints(self) -> list[int]:
        return checkpoint.list_steps(self.path)

    def _train_path(self) -> str:
        path = self._train_override or self.data["train"]["path"]
        if not Path(path, "manifest.json").is_file():
            raise RunError(f"the training set of run {self.path}, {path}, is not there (its class split is needed); "
                           "pass load_run(..., train=DIR) with that set or a copy of it")
        return str(path)

    @functools.cached_property
    def _train(self) -> ShardSet:
        from trainer.evaluate import _check_train_is_the_runs

        train = open_shard_set(self._train_path())
        _check_train_is_the_runs(self.dir, train)
        return train

    @functools.cached_property
    def _table(self) -> jax.Array:
        from trainer.images import device_table
        from trainer.runtime.distributed import make_topology

        return device_table(self._train, self.config.training.image_size, make_topology(1), self._omniglot,
                            self._cache_dir)

    def _step(self, step: int | None) -> int:
        if step is not None:
            return int(step)
        latest = checkpoint.latest_step(self.path)
        if latest is None:
            raise RunError(f"{self.path} has no complete checkpoint yet; wait for `trainer fit` to save one")
        return latest

    def model(self, step: int | None = None) -> TrainedModel:
        """The checkpoint at `step` (default: the latest) as a `TrainedModel`; CheckpointError (one line, with
        the available steps) when there is none at `step`."""
        from trainer.state import load_state

        step = self._step(step)
        state = load_state(self.path, step, self.config, self._train.num_labels)
        return TrainedModel(step, state.model, state.bn_state, self._table, self.config, self._train.config)

    def evaluate(self, paths: PathLike | Sequence[PathLike], *, step: int | None = None, max_seqs: int | None = None,
                 batch_size: int = 256, record: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
        """`trainer evaluate PATHS --run-dir RUN [--step] [--max-seqs] [--batch-size]`, from Python: the same
        code (`trainer.evaluate.evaluate_run`) and numbers. Returns {set name: {metric: {"mean", "ci95": [lo,
        hi], "n"}}}, the form the run's evaluation store keeps. With `record`, the results are also recorded in
        the run directory as `trainer evaluate` records them (metrics.jsonl, evaluations/step-N.json)."""
        from trainer.evaluate import evaluate_run
        from trainer.runtime.distributed import make_topology

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        if not paths:
            raise RunError("Run.evaluate needs at least one shard set path")
        names = [Path(p).name for p in paths]
        if len(set(names)) != len(names):
            raise RunError(f"eval sets are named by their folders and these repeat a name: {names}; "
                           "evaluate them in separate calls")
        results = evaluate_run(self.path, paths, step=self._step(step), train_dir=self._train_override,
                               max_seqs=max_seqs, batch_size=batch_size, omniglot_dir=self._omniglot,
                               cache_dir=self._cache_dir, topo=make_topology(), echo=lambda _: None, record=record)
        if results is None:  # Ctrl+C during the evaluation (evaluate_run's interrupt handler caught it)
            raise KeyboardInterrupt
        return {name: summary for name, _, summary in results}


def load_run(path: PathLike, *, train: PathLike | None = None, omniglot: PathLike | None = None,
             cache_dir: PathLike | None = DEFAULT_CACHE_DIR) -> Run:
    """Open the run directory `path` of a `trainer fit`. `train`: its training set, if it moved since the fit
    (`--train`); `omniglot`, `cache_dir`: where Omniglot and its cached image table are (`--omniglot`,
    `--cache-dir`; Omniglot runs only). RunError (one line) when `path` holds no run."""
    p = Path(path)
    if not p.is_dir():
        raise RunError(f"run directory {p} not found; pass the --run-dir of a `trainer fit`")
    return Run(p, train=train, omniglot=omniglot, cache_dir=cache_dir)
