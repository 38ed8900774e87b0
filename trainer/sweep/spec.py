"""The sweep file: its format, loading and validation (`trainer sweep FILE`, see `trainer.sweep`).

A sweep file is TOML. It layers on a base config file (the same `[seqgen.*]` / `[trainer.*]` tables
that `seqgen build --config` and `trainer fit --config` read) and lists the runs of one figure:

    # Fig. 2: burstiness drives in-context learning.
    [sweep]
    name = "burstiness"                 # optional; default: the file name without .toml
    figure = "Fig. 2"                   # optional, shown in results.md
    claim = "ICL needs bursty data"     # optional, shown in results.md
    base = "../cpu.toml"                # required: a path relative to this file, or a list of paths
                                        #   (later files override earlier ones, table by table)
    x = "p_bursty"                      # required: the x-axis name
    x_scale = "linear"                  # optional: linear (default) | log
    train_seqs = 1000000                # required: training sequences per training set (seqgen num_seqs)
    eval_seqs = 2048                    # optional (default 2048): sequences per evaluation set
    eval_types = ["fewshot_holdout", "no_support_zipfian"]   # optional; these are the default
    eval_seed = 1                       # optional (default 1): seqgen seed of the evaluation sets
    deviations = ["28 px, not 105"]     # optional: how this setting departs from the paper (in results.md)
    seeds = [0, 1, 2]                   # optional: train every run once per seed (see below)
    log_to = ["tensorboard"]            # optional: mirror each run's records live (tensorboard, wandb;
                                        #   trainer.sinks); adds to `trainer sweep --log-to`

    [trainer.training]                  # optional: overrides applied to every run, after the base
    steps = 20000

    [[runs]]
    name = "p0.9"                       # required, unique; the run directory's name
    x = 0.9                             # required: a number, or a string for a categorical axis
    base = "../other.toml"              # optional: replaces the sweep's base for this run
    [runs.seqgen.sequence]              # optional: this run's overrides, last
    p_bursty = 0.9

    [[checks]]                          # optional: the paper's claim as comparisons (trainer.sweep.checks)
    claim = "ICL needs bursty data"     # required: what is checked, in words
    metric = "icl"                      # required: a column (icl, iwl, iwl_common, iwl_rare, ...)
    run = "p0.9"                        # required: a run name
    compare = "greater"                 # required: greater | less | near
    than = "p0"                         # required: another run's name, or a number (e.g. 0.5 = chance)
    margin = 0.1                        # greater / less: the mean difference must be >= margin (default 0)
    tolerance = 0.05                    # near: |difference| <= tolerance in a seed (required for near)
    than_metric = "icl"                 # optional: the other side's metric (default: metric); with it,
                                        # `than` may name the same run (e.g. ablated ICL < ICL of one run)

Check metrics are the columns of the evaluation types, plus, with a `fewshot_holdout` evaluation,
`icl_of_ceiling` (ICL divided by the setting's ICL ceiling, `trainer.metrics.icl_ceiling`: settings with
different holdout class counts compare on one scale) and the columns that `trainer analyze` writes to a run's analysis.jsonl (`trainer.analyze.records.ANALYSIS_COLUMNS`:
analysis_icl, ablated_icl_min, mean_ablated_icl_min, joint_ablated_icl, mean_joint_ablated_icl, induction_max,
prev_token_max), read at the run's
final step; a check stays PENDING until that analysis is there.

Seeds: with `seeds = [s0, s1, ...]` each run becomes one run per seed, named `<name>/seed-<s>` and trained
into `<out>/runs/<name>/seed-<s>`: seed s is both the trainer's seed (`training.seed`) and the training
set's seed (`seqgen.seed`), so do not set either in the tables. The evaluation sets keep `eval_seed` and
are shared: every seed is scored on the same sequences. Without `seeds` a run is trained once, with the
seeds of its tables, into `<out>/runs/<name>` (as before seeds existed). The seed of a training set may
equal `eval_seed`: sequence i of a set is a function of (seed, sequence type, i), and a training set is
bursty while the evaluation sets are of other types (an evaluation type `bursty` is refused then).

Every run gets a bursty training set (`seq_type`, `num_seqs` are set by the sweep: do not set them in
the tables) and one evaluation set per `eval_types`, with the run's dataset / split / sequence options
(so the class split matches) and seed `eval_seed`. Sequence options
that an evaluation type never reads (e.g. `p_bursty` for `fewshot_holdout`) are reset to their defaults,
so runs that differ only there share evaluation sets. `trainer.training.eval_seqs` defaults to
`eval_seqs` (evaluate whole sets).

Shard sets live in a shared folder (default `data/shards/sweeps/`), one per config, named
`<seq_type>-<sha256 of the BuildConfig, 12 hex>`: sets are reused across runs and across sweeps. Runs
train into `<out>/runs/<name>` (default out: `runs/sweeps/<sweep name>`); a rerun skips finished runs
(final checkpoint and final evaluations present), resumes partial ones and evaluates a finished run on
evaluation sets it has not seen. Ctrl+C stops the sweep after the current run saves a checkpoint.
`<out>` receives `results.csv`, `results.md`, `figure.png`, `curves.png` (see `trainer.sweep.report`)
and `sweep.json` (the resolved plan); with `--results DIR` (default `results/<sweep name>` when `--out` is
not given) the report and a copy of each run's `config.json`, `metrics.jsonl` and `evaluations/` go there
instead, so that the report can be rebuilt from that folder alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from seqgen.config import BuildConfig, SeqType, SequenceConfig
from seqgen.configio import ConfigError, load_toml
from seqgen.seqtypes import reads
from seqgen.errors import UserError
from trainer.config import TrainConfig
from trainer.analyze.records import ANALYSIS_COLUMNS
from trainer.sweep.compare import COMPARISONS, Comparison
from trainer.metrics import ICL_OF_CEILING, column_of

DEFAULT_EVAL_TYPES = (SeqType.FEWSHOT_HOLDOUT, SeqType.NO_SUPPORT_ZIPFIAN)
DEFAULT_EVAL_SEQS = 2048
DEFAULT_SHARDS_DIR = Path("data/shards/sweeps")
_SWEEP_KEYS = {"name", "figure", "claim", "base", "x", "x_scale", "train_seqs", "eval_seqs", "eval_types",
               "eval_seed", "seeds", "deviations", "log_to"}
_RUN_KEYS = {"name", "x", "base", "seqgen", "trainer"}
_CHECK_KEYS = {"claim", "metric", "run", "compare", "than", "margin", "tolerance", "than_metric"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SweepError(UserError):
    """A sweep that cannot proceed as asked (e.g. a run directory from another config); one line."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: a setting of the figure (`setting`, its x) at one seed (None: no seed dimension)."""

    setting: str
    seed: int | None
    x: float | str
    train: BuildConfig
    evals: tuple[BuildConfig, ...]
    trainer: TrainConfig
    bases: tuple[str, ...]

    @property
    def name(self) -> str:
        """`<setting>/seed-<s>`, or the setting alone without a seed dimension; also the run folder."""
        return self.setting if self.seed is None else f"{self.setting}/seed-{self.seed}"

    @property
    def steps(self) -> int:
        return self.trainer.training.steps


@dataclasses.dataclass(frozen=True)
class CheckSpec:
    """A claim as a comparison of one metric between two settings (paired by seed) or a setting and a number."""

    claim: str
    metric: str
    run: str
    compare: str  # a name in trainer.sweep.compare.COMPARISONS
    than: str | float
    margin: float = 0.0
    tolerance: float | None = None
    than_metric: str | None = None  # the other side's metric when it is not `metric`

    @property
    def other_metric(self) -> str:
        return self.than_metric or self.metric

    @property
    def reads_analysis(self) -> bool:
        """Whether a side of the check is read from analysis.jsonl (`trainer analyze`)."""
        return bool({self.metric, self.other_metric} & set(ANALYSIS_COLUMNS))

    @property
    def comparison(self) -> Comparison:
        return COMPARISONS[self.compare]

    @property
    def threshold(self) -> float:
        """The comparison's threshold: `margin` or `tolerance`, whichever it takes."""
        return self.tolerance if self.comparison.threshold == "tolerance" else self.margin

    def describe(self) -> str:
        other = f"{self.than:g}" if isinstance(self.than, float) else f"{self.other_metric}({self.than})"
        return self.comparison.words(f"{self.metric}({self.run})", other, self.threshold)


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    figure: str
    claim: str
    x_label: str
    x_scale: str
    train_seqs: int
    eval_seqs: int
    eval_types: tuple[SeqType, ...]
    eval_seed: int
    seeds: tuple[int, ...] | None
    settings: tuple[str, ...]
    runs: tuple[RunSpec, ...]
    checks: tuple[CheckSpec, ...] = ()
    deviations: tuple[str, ...] = ()
    log_to: tuple[str, ...] = ()  # live tracking of every run (trainer.sinks); not part of any run's config


# ---- loading and validation -----------------------------------------------------------------------
def _merge(into: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, anything else replaces."""
    out = copy.deepcopy(into)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _bases(value: Any, where: str, folder: Path) -> tuple[Path, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(b, str) for b in items):
        raise ConfigError(f"{where}: base must be a path or a list of paths (relative to the sweep file)")
    paths = tuple(Path(os.path.normpath(folder / b)) for b in items)
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"{where}: base config {p} not found; fix the path (relative to the sweep file)")
    return paths


def _check_keys(table: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; valid keys: {', '.join(sorted(allowed))}")
    return table


def _int(table: dict[str, Any], key: str, where: str, default: int | None, minimum: int) -> int:
    value = table.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: '{key}' is required")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, where: str, key: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (minimum is not None and value < minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise ConfigError(f"{where}: '{key}' must be a finite number{bound}, got {value!r}")
    return float(value)


def eval_config(train: BuildConfig, seq_type: SeqType, num_seqs: int, seed: int) -> BuildConfig:
    """The evaluation set of `seq_type` matching training set `train`: same dataset, split and labels.

    Sequence options the evaluation type never reads are reset to their defaults (so that sets are
    shared); kept are those its layout reads (`seqgen.seqtypes.READS`: always labeling / polysemy, which
    fix the label space, and noise)."""
    d, kept = SequenceConfig(), reads(seq_type)
    unused = [f.name for f in dataclasses.fields(SequenceConfig) if f.name not in kept]
    sequence = dataclasses.replace(train.sequence, **{k: getattr(d, k) for k in unused})
    return dataclasses.replace(train, seq_type=seq_type, num_seqs=num_seqs, seed=seed, sequence=sequence)


def _check_buildable(cfg: BuildConfig, where: str) -> None:
    from seqgen.sampling import check_supported
    from seqgen.split import make_split

    try:
        cfg.validate()
        check_supported(cfg, make_split(cfg))
    except ConfigError as e:
        raise ConfigError(f"{where}: {cfg.seq_type.value} set: {e}") from None


def _setting_tables(entry: dict[str, Any], i: int, data: dict[str, Any], folder: Path,
                    sweep_bases: tuple[Path, ...] | None, seeded: bool) -> tuple[str, float | str, tuple[Path, ...], dict[str, Any]]:
    """(name, x, bases, merged {seqgen, trainer} tables) of one [[runs]] entry."""
    where = f"runs[{i}]"
    _check_keys(entry, _RUN_KEYS, where)
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: 'name' must be a string of letters, digits, '.', '_' or '-', got {name!r}")
    where = f"run '{name}'"
    x = entry.get("x")
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise ConfigError(f"{where}: 'x' must be a number or a string, got {x!r}")
    if isinstance(x, float) and not math.isfinite(x):
        raise ConfigError(f"{where}: 'x' must be a finite number (it places the setting on the figure's axis), "
                          f"got {x}")
    if "base" in entry:
        bases = _bases(entry["base"], where, folder)
    elif sweep_bases is None:
        raise ConfigError(f"{where}: no base config; set [sweep] base (or this run's base)")
    else:
        bases = sweep_bases
    merged: dict[str, Any] = {}
    for b in bases:
        base = load_toml(b)
        try:  # an unknown option in a base file is named with its file, before the layers merge
            TrainConfig.from_dict(base.get("trainer", {}))
            BuildConfig.from_dict(base.get("seqgen", {}))
        except ConfigError as e:
            raise ConfigError(f"base config {b}: {e}") from None
        merged = _merge(merged, {k: base.get(k, {}) for k in ("seqgen", "trainer")})
    for layer in (data, entry):
        for k in ("seqgen", "trainer"):
            if k in layer and not isinstance(layer[k], dict):
                raise ConfigError(f"{where}: '{k}' must be a table of options")
            table = layer.get(k)
            if k == "seqgen" and isinstance(table, dict):
                for forbidden in ("seq_type", "num_seqs"):
                    if forbidden in table:
                        raise ConfigError(f"{where}: seqgen.{forbidden} is set by the sweep "
                                          "(train_seqs / eval_types); remove it")
                if seeded and "seed" in table:
                    raise ConfigError(f"{where}: seqgen.seed is set by [sweep] seeds; remove it")
            if k == "trainer" and seeded and isinstance(table, dict) \
                    and isinstance(table.get("training"), dict) and "seed" in table["training"]:
                raise ConfigError(f"{where}: trainer.training.seed is set by [sweep] seeds; remove it")
            merged = _merge(merged, {k: layer.get(k, {})})
    return name, x, bases, merged


def _run_spec(name: str, x: float | str, bases: tuple[Path, ...], merged: dict[str, Any], seed: int | None,
              sweep: dict[str, Any], eval_types: tuple[SeqType, ...]) -> RunSpec:
    where = f"run '{name}'" + (f" seed {seed}" if seed is not None else "")
    seq = dict(merged["seqgen"], seq_type=SeqType.BURSTY.value, num_seqs=sweep["train_seqs"])
    trainer = merged["trainer"]
    training = trainer.get("training", {})
    if isinstance(training, dict) and "eval_seqs" not in training:
        trainer = _merge(trainer, {"training": {"eval_seqs": sweep["eval_seqs"]}})
    if seed is not None:
        seq["seed"] = seed
        trainer = _merge(trainer, {"training": {"seed": seed}})
    try:
        train = BuildConfig.from_dict(seq)
        tcfg = TrainConfig.from_dict(trainer).validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if SeqType.BURSTY in eval_types and train.seed == sweep["eval_seed"]:
        raise ConfigError(f"{where}: training seed {train.seed} equals eval_seed and a bursty evaluation set "
                          "would repeat the training set; change [sweep] eval_seed")
    evals = tuple(eval_config(train, t, sweep["eval_seqs"], sweep["eval_seed"]) for t in eval_types)
    for cfg in (train, *evals):
        _check_buildable(cfg, where)
    return RunSpec(name, seed, x, train, evals, tcfg, tuple(str(b) for b in bases))


def _seeds(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in value):
        raise ConfigError(f"[sweep]: seeds must be a non-empty list of integers in [0, 2**31), got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError("[sweep]: seeds lists a seed twice")
    return tuple(value)


def _log_to(value: Any) -> tuple[str, ...]:
    from trainer.sinks import SINK_NAMES

    if not isinstance(value, list) or not all(isinstance(v, str) and v in SINK_NAMES for v in value):
        raise ConfigError(f"[sweep]: log_to must be a list of sink names ({', '.join(SINK_NAMES)}), got {value!r}")
    return tuple(dict.fromkeys(value))


def _checks(entries: Any, settings: tuple[str, ...], columns: set[str]) -> tuple[CheckSpec, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ConfigError("checks must be [[checks]] tables")
    out = []
    for i, entry in enumerate(entries):
        where = f"checks[{i}]"
        _check_keys(entry, _CHECK_KEYS, where)
        for key in ("claim", "metric", "run", "compare", "than"):
            if key not in entry:
                raise ConfigError(f"{where}: '{key}' is required")
        claim, metric, run = entry["claim"], entry["metric"], entry["run"]
        if not isinstance(claim, str) or not claim:
            raise ConfigError(f"{where}: 'claim' must be a non-empty string")
        than_metric = entry.get("than_metric")
        for key, value in (("metric", metric), ("than_metric", than_metric)):
            if value is not None and (not isinstance(value, str) or value not in columns):
                raise ConfigError(f"{where}: {key} {value!r} is not measured by this sweep; "
                                  f"one of: {', '.join(sorted(columns))}")
        if run not in settings:
            raise ConfigError(f"{where}: run {run!r} is not in this sweep; runs: {', '.join(settings)}")
        compare = entry["compare"]
        if not isinstance(compare, str) or compare not in COMPARISONS:
            raise ConfigError(f"{where}: compare must be one of {', '.join(COMPARISONS)}, got {compare!r}")
        than = entry["than"]
        if isinstance(than, str):
            if than not in settings:
                raise ConfigError(f"{where}: than {than!r} is neither a run of this sweep nor a number; "
                                  f"runs: {', '.join(settings)}")
            if than == run and than_metric in (None, metric):
                raise ConfigError(f"{where}: a run compared with itself on one metric; name another run in "
                                  "'than', or another metric in 'than_metric'")
        else:
            than = _number(than, where, "than")
            if than_metric is not None:
                raise ConfigError(f"{where}: 'than_metric' needs 'than' to name a run, not a number")
        takes, other_key = COMPARISONS[compare].threshold, {"margin": "tolerance", "tolerance": "margin"}
        if other_key[takes] in entry:
            raise ConfigError(f"{where}: compare = {compare} takes '{takes}', not '{other_key[takes]}'")
        if takes == "tolerance" and "tolerance" not in entry:
            raise ConfigError(f"{where}: compare = {compare} needs 'tolerance'")
        margin = _number(entry.get("margin", 0.0), where, "margin", 0.0)
        tolerance = _number(entry["tolerance"], where, "tolerance", 0.0) if takes == "tolerance" else None
        out.append(CheckSpec(claim, metric, run, compare, than, margin, tolerance, than_metric))
    return tuple(out)


def load_sweep(path: str | Path) -> Sweep:
    """Read and fully validate a sweep file; ConfigError (one line, naming file and place) on any problem."""
    path = Path(path)
    data = load_toml(path)
    try:
        return _load(path, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _load(path: Path, data: dict[str, Any]) -> Sweep:
    _check_keys(data, {"sweep", "seqgen", "trainer", "runs", "checks"}, "top level")
    if "sweep" not in data:
        raise ConfigError("missing [sweep] table (base, x, train_seqs, ...)")
    sw = _check_keys(data["sweep"], _SWEEP_KEYS, "[sweep]")
    sweep_bases = _bases(sw["base"], "[sweep]", path.parent) if "base" in sw else None
    name = sw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"[sweep]: 'name' must be letters, digits, '.', '_' or '-', got {name!r}")
    x_label = sw.get("x")
    if not isinstance(x_label, str) or not x_label:
        raise ConfigError("[sweep]: 'x' (the x-axis name) is required")
    x_scale = sw.get("x_scale", "linear")
    if x_scale not in ("linear", "log"):
        raise ConfigError(f"[sweep]: x_scale must be 'linear' or 'log', got {x_scale!r}")
    for key in ("figure", "claim"):
        if not isinstance(sw.get(key, ""), str):
            raise ConfigError(f"[sweep]: '{key}' must be a string")
    deviations = sw.get("deviations", [])
    if not isinstance(deviations, list) or not all(isinstance(d, str) and d for d in deviations):
        raise ConfigError("[sweep]: deviations must be a list of non-empty strings")
    resolved = {
        "train_seqs": _int(sw, "train_seqs", "[sweep]", None, 1),
        "eval_seqs": _int(sw, "eval_seqs", "[sweep]", DEFAULT_EVAL_SEQS, 1),
        "eval_seed": _int(sw, "eval_seed", "[sweep]", 1, 0),
    }
    seeds = _seeds(sw.get("seeds"))
    types = sw.get("eval_types", [t.value for t in DEFAULT_EVAL_TYPES])
    if not isinstance(types, list) or not types:
        raise ConfigError("[sweep]: eval_types must be a non-empty list of sequence types")
    try:
        eval_types = tuple(SeqType(t) for t in types)
    except ValueError:
        raise ConfigError(f"[sweep]: eval_types {types!r}: each must be one of "
                          f"{', '.join(t.value for t in SeqType)}") from None
    if len(set(eval_types)) != len(eval_types):
        raise ConfigError("[sweep]: eval_types lists a type twice")
    entries = data.get("runs")
    if not isinstance(entries, list) or not entries:
        raise ConfigError("no runs: add [[runs]] tables (name, x, seqgen / trainer overrides)")
    settings: list[str] = []
    runs = []
    for i, entry in enumerate(entries):
        setting, x, bases, merged = _setting_tables(entry, i, data, path.parent, sweep_bases, seeds is not None)
        if setting in settings:
            raise ConfigError(f"two runs are named '{setting}'; run names must be unique")
        settings.append(setting)
        for seed in seeds or (None,):
            runs.append(_run_spec(setting, x, bases, merged, seed, resolved, eval_types))
    columns = {column_of(t) for t in eval_types}
    if SeqType.FEWSHOT_HOLDOUT in eval_types:
        columns |= set(ANALYSIS_COLUMNS) | {ICL_OF_CEILING}
    checks = _checks(data.get("checks"), tuple(settings), columns)
    return Sweep(path, name, sw.get("figure", ""), sw.get("claim", ""), x_label, x_scale,
                 resolved["train_seqs"], resolved["eval_seqs"], eval_types, resolved["eval_seed"], seeds,
                 tuple(settings), tuple(runs), checks, tuple(deviations), _log_to(sw.get("log_to", [])))
