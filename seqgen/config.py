"""Typed, frozen configuration of a sequence set.

One `BuildConfig` describes a shard set completely: which examples exist (`DatasetConfig`), how classes
are split into rare / common / holdout (`SplitConfig`), what a sequence looks like (`SequenceConfig`),
which kind of sequence is generated (`SeqType`), how many, and from which seed. It is built once (from
defaults, a TOML file and command-line options), validated before any work, and saved verbatim into the
shard manifest, where the trainer reads it back. Every field that a command line sets carries its one-line
documentation (`documented`), which is also that option's `--help` text (`seqgen.cliopts`).

Defaults are the paper's `images_all_exemplars` config (Chan et al. 2022; the original's
`experiment/configs/images_all_exemplars.py`). Options that the original encoded in strings are typed
here: `labeling_rare="ordered_polysemy3"` is `labeling_rare=Labeling.ORDERED, polysemy=3`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from seqgen.configio import ConfigError, apply_overrides, check_finite, documented, from_plain, to_plain
from seqgen.seqtypes import SeqType  # the names of the types live with their registry (seqgen.seqtypes)

N_OMNIGLOT_CLASSES = 1623
N_EXEMPLARS = 20
N_AUGMENTATIONS = 8  # flip left-right x rot90 k in 0..3
IMAGE_SIZE = 105


# Bounds on sizes, so that a typo fails here in one line rather than as a MemoryError or an overflow later.
MAX_NUM_SEQS = 1 << 40
# symbolic classes: the split and the Zipf weights hold several arrays of one entry per class (8 bytes each)
MAX_SYMBOLIC_CLASSES = 1 << 24
MAX_LENGTH = 1 << 16
MAX_SHARD_CELLS = 1 << 28  # sequences per shard x examples per sequence (~2.7 GB: a shard is generated in memory)


class ExampleType(str, enum.Enum):
    OMNIGLOT = "omniglot"
    SYMBOLIC = "symbolic"


class Exemplars(str, enum.Enum):
    ALL = "all"  # 20 drawings per class, one class label (the standard Omniglot problem)
    SINGLE = "single"  # only the first drawing of each class
    SEPARATED = "separated"  # every drawing its own class (class = character * 20 + drawer)


class Labeling(str, enum.Enum):
    ORDERED = "ordered"  # rare: [0, n_rare), common: [n_rare, n_rare + n_common), holdout after
    UNFIXED = "unfixed"  # few-shot classes get labels 0..ways-1 at random per sequence
    ORIGINAL = "original"  # the dataset's class id


class NonBurstyType(str, enum.Enum):
    ZIPFIAN = "zipfian"
    COMMON_UNIFORM = "common_uniform"
    COMMON_NO_SUPPORT = "common_no_support"


@dataclass(frozen=True)
class DatasetConfig:
    """Which examples exist, and so how many dataset classes there are."""

    example_type: ExampleType = documented(ExampleType.OMNIGLOT, "Omniglot images, or integer (symbolic) examples.")
    exemplars: Exemplars = documented(
        Exemplars.ALL, "Omniglot drawings per class: all 20 (one label), the first one only (single), or each its "
        "own class (separated).")
    augment: bool = documented(False, "x8 classes: flip left-right x rot90 (the `images_augmented` config).")
    symbolic_size: int = documented(1000, "Number of integer examples (= classes) when example_type is symbolic.")

    @property
    def num_dataset_classes(self) -> int:
        if self.example_type is ExampleType.SYMBOLIC:
            return self.symbolic_size
        n = N_OMNIGLOT_CLASSES
        if self.exemplars is Exemplars.SEPARATED:
            n *= N_EXEMPLARS
        if self.augment:
            n *= N_AUGMENTATIONS
        return n

    @property
    def exemplars_per_class(self) -> int:
        """Distinct exemplars of one dataset class (1 for symbolic, single and separated)."""
        if self.example_type is ExampleType.OMNIGLOT and self.exemplars is Exemplars.ALL:
            return N_EXEMPLARS
        return 1


@dataclass(frozen=True)
class SplitConfig:
    """Rare / common / holdout split of the dataset classes (the original `generator_config`)."""

    n_rare_classes: int = documented(1603, "Classes of the rare pool (the first of the split's class ordering).")
    n_common_classes: int = documented(10, "Classes of the common pool (after the rare ones).")
    n_holdout_classes: int = documented(10, "Classes held out of training (the last of the ordering).")
    zipf_exponent: float = documented(0.0, "Exponent a of the Zipf weights 1/j**a over rare + common classes "
                                      "(0: uniform).")
    use_zipf_for_common_rare: bool = documented(
        False, "Draw rare and common classes by their slices of the Zipf weights (else uniformly).")
    preserve_ordering_every_n: int | None = documented(
        None, "Shuffle the classes in blocks of N consecutive ones, e.g. 8 so that the augmentations of a "
        "character stay on one side of the split (0 on the command line, or unset: off).")
    split_seed: int = documented(1337, "Seed of the class ordering that makes the split.")

    @property
    def n_classes(self) -> int:
        return self.n_rare_classes + self.n_common_classes + self.n_holdout_classes


@dataclass(frozen=True)
class SequenceConfig:
    """What one sequence looks like (the original `seq_config`, plus `noise_scale`)."""

    seq_len: int = documented(9, "Length of bursty / no_support sequences, query included (few-shot, mixed and "
                              "strategy types use fs_shots*ways+1).")
    fs_shots: int = documented(4, "Support examples per class in few-shot (and mixed / strategy) sequences.")
    bursty_shots: int = documented(3, "Support examples per class in the few-shot block of a bursty sequence.")
    ways: int = documented(2, "Classes in a few-shot block (bursty) or a few-shot sequence.")
    p_bursty: float = documented(0.9, "Bursty sets: probability that a sequence is bursty (a few-shot block "
                                 "plus a remainder; else non_bursty_type).")
    p_bursty_common: float = documented(0.0, "Probability that a bursty block draws common classes.")
    p_bursty_zipfian: float = documented(1.0, "Probability that a bursty block draws zipfian (rare + common) "
                                         "classes; the rest of the probability draws rare ones.")
    p_fewshot: float = documented(0.1, "Mixed sets: fraction of rare few-shot sequences (else common ones).")
    non_bursty_type: NonBurstyType = documented(
        NonBurstyType.ZIPFIAN, "Non-bursty sequences of bursty sets: zipfian random classes, uniform common "
        "classes, or common classes without the query's class in the support.")
    labeling_common: Labeling = documented(
        Labeling.ORDERED, "Labels of common classes: ordered (after the rare labels) or original (dataset class id).")
    labeling_rare: Labeling = documented(
        Labeling.ORDERED, "Labels of rare classes: ordered (index in the rare pool), unfixed (0..ways-1 at random "
        "per sequence) or original (dataset class id).")
    polysemy: int = documented(1, "Labels per rare class, with labeling_rare ordered (the original's "
                               "ordered_polysemyX).")
    randomly_generate_rare: bool = documented(
        False, "Show rare classes as random images (drawn by the trainer from stored noise seeds).")
    grouped: bool = documented(False, "Shuffle the support of few-shot sequences within blocks of `ways` only.")
    noise_scale: float = documented(0.0, "Std of Gaussian pixel noise (added by the trainer from the stored "
                                    "noise seeds; 0: none).")


@dataclass(frozen=True)
class BuildConfig:
    """A whole shard set: one sequence type, `num_seqs` sequences from `seed`."""

    seq_type: SeqType = documented(SeqType.BURSTY, "Sequence type of the set.")
    num_seqs: int = documented(1_000_000, "Number of sequences.")
    seed: int = documented(0, "Root seed of the set (sequence i is a function of seed and i).")
    shard_size: int = documented(1 << 18, "Sequences per shard file.")
    dataset: DatasetConfig = field(default_factory=DatasetConfig, metadata={"doc": "Which examples exist."})
    split: SplitConfig = field(default_factory=SplitConfig, metadata={"doc": "Rare / common / holdout split."})
    sequence: SequenceConfig = field(default_factory=SequenceConfig, metadata={"doc": "What a sequence looks like."})

    # ---- derived quantities -------------------------------------------------------------
    @property
    def length(self) -> int:
        """Examples per stored sequence, query included."""
        s = self.sequence
        if self.seq_type.is_fewshot or self.seq_type is SeqType.MIXED or self.seq_type.is_strategy:
            return s.fs_shots * s.ways + 1
        return s.seq_len

    @property
    def num_shards(self) -> int:
        return -(-self.num_seqs // self.shard_size)

    def shard_rows(self, shard: int) -> int:
        return min(self.shard_size, self.num_seqs - shard * self.shard_size)

    @property
    def num_labels(self) -> int:
        """Size of the label space = the model's number of output classes.

        As the original (`_get_sub_configs`): polysemy X > 1 gives X * n_rare + n_common, otherwise
        n_rare + n_common + n_holdout -- except under `original` labeling, where labels are dataset class
        ids: the original still used n_rare + n_common + n_holdout, too small whenever the split leaves
        classes out (labels >= num_classes get a zero one-hot target and can never be learnt); here it is
        the dataset's class count (the same number for the paper's 1603 + 10 + 10 Omniglot split).
        """
        sp, sq = self.split, self.sequence
        if sq.labeling_rare is Labeling.ORDERED and sq.polysemy > 1:
            return sq.polysemy * sp.n_rare_classes + sp.n_common_classes
        if Labeling.ORIGINAL in (sq.labeling_common, sq.labeling_rare):
            return self.dataset.num_dataset_classes
        return sp.n_classes

    @property
    def random_rare_images(self) -> bool:
        """Whether rare classes are shown as random images (`randomly_generate_rare`): never in `mixed`
        sets, whose generator (the original's get_mixed_seq) passes randomly_generate_rare=False."""
        return self.sequence.randomly_generate_rare and self.seq_type is not SeqType.MIXED

    @property
    def needs_noise_seed(self) -> bool:
        # randomly_generate_rare keeps storing noise seeds in mixed sets too (unused there), so that sets
        # built before `random_rare_images` still verify
        return self.sequence.noise_scale > 0 or self.sequence.randomly_generate_rare

    # ---- validation ---------------------------------------------------------------------
    def validate(self) -> "BuildConfig":
        """Raise ConfigError (one line, naming the fix) for any impossible option; return self."""
        d, sp, sq = self.dataset, self.split, self.sequence
        check_finite(self)
        if self.num_seqs < 1:
            raise ConfigError(f"--num-seqs must be >= 1, got {self.num_seqs}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1, got {self.shard_size}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be in [0, 2**63), got {self.seed}")
        if not 0 <= sp.split_seed < 2**63:
            raise ConfigError(f"--split-seed must be in [0, 2**63), got {sp.split_seed}")
        if self.num_seqs > MAX_NUM_SEQS:
            raise ConfigError(f"--num-seqs must be <= {MAX_NUM_SEQS:,} (2**40), got {self.num_seqs:,}")
        if d.example_type is ExampleType.SYMBOLIC and d.symbolic_size > MAX_SYMBOLIC_CLASSES:
            raise ConfigError(f"symbolic_size must be <= {MAX_SYMBOLIC_CLASSES:,} (seqgen keeps arrays of one entry "
                              f"per class in memory), got {d.symbolic_size:,}")
        for name in ("seq_len", "fs_shots", "bursty_shots", "ways", "polysemy"):
            if getattr(sq, name) > MAX_LENGTH:
                raise ConfigError(f"{name} must be <= {MAX_LENGTH}, got {getattr(sq, name):,}")
        if min(self.shard_size, self.num_seqs) * max(self.length, 1) > MAX_SHARD_CELLS:
            raise ConfigError(
                f"a shard of {min(self.shard_size, self.num_seqs):,} sequences x {self.length} examples is too big to "
                f"hold in memory (> {MAX_SHARD_CELLS:,} entries); lower --shard-size"
            )
        if d.example_type is ExampleType.SYMBOLIC and d.symbolic_size < 1:
            raise ConfigError(f"symbolic_size must be >= 1, got {d.symbolic_size}")
        for name in ("n_rare_classes", "n_common_classes", "n_holdout_classes"):
            if getattr(sp, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(sp, name)}")
        total = d.num_dataset_classes
        if sp.n_classes > total:
            raise ConfigError(
                f"rare+common+holdout = {sp.n_classes} classes but the dataset has only {total}; "
                "lower n_rare_classes / n_common_classes / n_holdout_classes"
            )
        n = sp.preserve_ordering_every_n
        if n is not None and (n < 1 or total % n):
            raise ConfigError(
                f"preserve_ordering_every_n={n} must divide the {total} dataset classes"
            )
        if sp.zipf_exponent < 0:
            raise ConfigError(f"zipf_exponent must be >= 0, got {sp.zipf_exponent}")
        for name in ("fs_shots", "bursty_shots", "ways"):
            if getattr(sq, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(sq, name)}")
        if sq.polysemy < 1:
            raise ConfigError(f"polysemy must be >= 1, got {sq.polysemy}")
        if sq.polysemy > 1 and sq.labeling_rare is not Labeling.ORDERED:
            raise ConfigError("polysemy > 1 needs labeling_rare = ordered (the original's ordered_polysemyX)")
        if sq.polysemy > 1 and sq.labeling_common is not Labeling.ORDERED:
            raise ConfigError("polysemy > 1 labels common classes n_rare*polysemy + index (the original's "
                              "ordered{K}); use labeling_common = ordered")
        if sq.labeling_common is Labeling.UNFIXED:
            raise ConfigError("labeling_common must be ordered or original (unfixed is for rare / few-shot labels)")
        for name in ("p_bursty", "p_bursty_common", "p_bursty_zipfian", "p_fewshot"):
            p = getattr(sq, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {p}")
        if sq.p_bursty_common + sq.p_bursty_zipfian > 1.0 + 1e-12:
            raise ConfigError("p_bursty_common + p_bursty_zipfian must be <= 1")
        if sq.noise_scale < 0:
            raise ConfigError(f"noise_scale must be >= 0, got {sq.noise_scale}")
        if d.example_type is ExampleType.SYMBOLIC and (sq.noise_scale > 0 or sq.randomly_generate_rare):
            raise ConfigError("noise_scale and randomly_generate_rare apply to images only, not symbolic examples")
        if self.length < 2:
            raise ConfigError(f"sequences need at least one context example and a query, got length {self.length}")
        self._validate_type_needs()
        return self

    def _validate_type_needs(self) -> None:
        sp, sq, t = self.split, self.sequence, self.seq_type
        pool = {
            "rare": sp.n_rare_classes,
            "common": sp.n_common_classes,
            "holdout": sp.n_holdout_classes,
            "zipfian": sp.n_rare_classes + sp.n_common_classes,
        }
        needs: list[str] = []
        if t is SeqType.BURSTY:
            if sq.seq_len < sq.bursty_shots * sq.ways + 1:
                raise ConfigError(
                    f"seq_len={sq.seq_len} < bursty_shots*ways+1 = {sq.bursty_shots * sq.ways + 1}; "
                    "raise --seq-len or lower --bursty-shots / --ways"
                )
            p_rare = 1.0 - sq.p_bursty_common - sq.p_bursty_zipfian
            remainder = sq.seq_len > sq.bursty_shots * sq.ways + 1
            if sq.p_bursty > 0 and p_rare > 1e-12:
                needs.append("rare")
                if remainder:
                    needs.append("common")
            if sq.p_bursty > 0 and sq.p_bursty_common > 0:
                needs.append("common")
                if remainder:
                    needs.append("rare")
            if sq.p_bursty > 0 and sq.p_bursty_zipfian > 0:
                needs.append("zipfian")
            if sq.p_bursty < 1:
                needs.append("zipfian" if sq.non_bursty_type is NonBurstyType.ZIPFIAN else "common")
                if sq.non_bursty_type is NonBurstyType.COMMON_NO_SUPPORT and sp.n_common_classes < 2:
                    raise ConfigError("non_bursty_type common_no_support needs >= 2 common classes")
        elif t.is_no_support:
            kind = t._spec().pool
            if pool[kind] < 2:
                raise ConfigError(f"{t.value} needs >= 2 {kind} classes (query + a different support class)")
        elif t.is_fewshot:
            needs.append(t._spec().pool)
        elif t.is_strategy:
            if t is SeqType.FLIP and sq.ways < 2:
                raise ConfigError("flip needs ways >= 2 (with one way no label can differ from the trained one); "
                                  "raise --ways")
            if pool["zipfian"] < sq.ways:
                raise ConfigError(f"{t.value} draws {sq.ways} distinct rare/common classes but there are only "
                                  f"{pool['zipfian']}; lower --ways")
            if sq.polysemy > 1 or sq.labeling_common is not sq.labeling_rare:
                raise ConfigError(f"{t.value} needs one trained label per class: polysemy = 1 and labeling_rare = "
                                  "labeling_common (ordered or original), as the training set's")
        elif t is SeqType.MIXED:
            if sq.p_fewshot > 0:
                needs.append("rare")
            if sq.p_fewshot < 1:
                needs.append("common")
        for kind in needs:
            if pool[kind] < 1:
                raise ConfigError(f"{t.value} with these probabilities draws {kind} classes, but there are none")
        # Exemplars are drawn without replacement within a sequence: a class can appear at most
        # exemplars_per_class times when there is more than one exemplar (original behaviour).
        # With a single exemplar per class, the one image repeats (also the original's behaviour).

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildConfig":
        return from_plain(cls, data, "")


def build_config_from_toml(data: dict[str, Any]) -> BuildConfig:
    """The seqgen part of a config file: the `[seqgen]` table (other tables belong to the trainer)."""
    return BuildConfig.from_dict(data.get("seqgen", {}))


def replace_nested(cfg: BuildConfig, overrides: dict[str, Any]) -> BuildConfig:
    """Apply dotted overrides, e.g. {"sequence.p_bursty": 0.5, "num_seqs": 10}; values already typed."""
    return BuildConfig.from_dict(apply_overrides(cfg.to_dict(), overrides))
