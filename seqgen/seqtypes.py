"""The sequence types: one registry of what each type is, asked by every module that treats types apart.

A type's spec says
- `layout`: how its sequences are laid out: "bursty" (the training mix of bursty and i.i.d. sequences),
  "fewshot" (`ways` classes x `fs_shots` and a query among them), "no_support" (the query's class absent
  from the context), "mixed" (few-shot or no-support per sequence), "strategy" (few-shot sequences of
  trained classes whose labels contradict or repeat the trained ones: beyond the paper);
- `pool`: the split pool every class of its sequences comes from ("rare", "common", "holdout", or
  "zipfian": rare + common);
- `evaluation_only`: its classes are the holdout classes, never to be trained on (`trainer.data.check_roles`);
- `column`: the name of its headline number in sweep tables, checks and plots (None: the type's own name);
- `tag`: the fixed number that keys its random streams, so that sets of different types built from one
  seed are independent. Never change a tag: it would change every set of that type.

What a layout reads of the sequence options (`READS`) decides which options an evaluation set keeps from
its training set (`trainer.sweep.spec.eval_config`): the rest are reset to their defaults, so that runs
differing only there share evaluation sets.

Adding a type of the fewshot or no_support layout: its name in `SeqType` and its entry in `SPECS`, both
here, and its tests. (A second strategy or mixed type would not be: flip and mixed are still recognised by
name in seqgen.sampling, seqgen.config and seqgen.verify.) A type of a new layout adds its `READS` row, its sampling kernel (`seqgen.kernels`) and that
kernel's entry in the layout table of `seqgen.sampling`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

Layout = Literal["bursty", "fewshot", "no_support", "mixed", "strategy"]
Pool = Literal["rare", "common", "holdout", "zipfian"]


class SeqType(str, enum.Enum):
    BURSTY = "bursty"
    NO_SUPPORT_COMMON = "no_support_common"
    NO_SUPPORT_RARE = "no_support_rare"
    NO_SUPPORT_ZIPFIAN = "no_support_zipfian"
    FEWSHOT_COMMON = "fewshot_common"
    FEWSHOT_RARE = "fewshot_rare"
    FEWSHOT_ZIPFIAN = "fewshot_zipfian"
    FEWSHOT_HOLDOUT = "fewshot_holdout"
    MIXED = "mixed"
    # strategy evaluations (beyond the paper; seqgen.sampling and docs/analysis.md): few-shot sequences of
    # TRAINED classes whose in-context labels contradict (flip) or repeat (copy_available) the trained ones
    FLIP = "flip"
    COPY_AVAILABLE = "copy_available"

    @property
    def layout(self) -> Layout:
        return SPECS[self].layout

    @property
    def is_fewshot(self) -> bool:
        return self.layout == "fewshot"

    @property
    def is_no_support(self) -> bool:
        return self.layout == "no_support"

    @property
    def evaluation_only(self) -> bool:
        """Sequences of the split's holdout classes (fewshot_holdout): they measure ICL on classes never
        trained on, so a set of this type must never be trained on (`trainer.data.check_roles`)."""
        return SPECS[self].evaluation_only

    @property
    def is_strategy(self) -> bool:
        """flip / copy_available: `ways` distinct trained classes x `fs_shots` + a query among them."""
        return self.layout == "strategy"

    def _spec(self) -> SeqTypeSpec:
        return SPECS[self]


@dataclass(frozen=True)
class SeqTypeSpec:
    layout: Layout
    pool: Pool
    tag: int
    evaluation_only: bool = False
    column: str | None = None


SPECS: dict[SeqType, SeqTypeSpec] = {
    SeqType.BURSTY: SeqTypeSpec("bursty", "zipfian", 0x1B0E),
    SeqType.NO_SUPPORT_COMMON: SeqTypeSpec("no_support", "common", 0x2C01, column="iwl_common"),
    SeqType.NO_SUPPORT_RARE: SeqTypeSpec("no_support", "rare", 0x2C02, column="iwl_rare"),
    SeqType.NO_SUPPORT_ZIPFIAN: SeqTypeSpec("no_support", "zipfian", 0x2C03, column="iwl"),
    SeqType.FEWSHOT_COMMON: SeqTypeSpec("fewshot", "common", 0x3F01),
    SeqType.FEWSHOT_RARE: SeqTypeSpec("fewshot", "rare", 0x3F02),
    SeqType.FEWSHOT_ZIPFIAN: SeqTypeSpec("fewshot", "zipfian", 0x3F03),
    SeqType.FEWSHOT_HOLDOUT: SeqTypeSpec("fewshot", "holdout", 0x3F04, evaluation_only=True, column="icl"),
    SeqType.MIXED: SeqTypeSpec("mixed", "zipfian", 0x4D01),
    SeqType.FLIP: SeqTypeSpec("strategy", "zipfian", 0x5F01),
    SeqType.COPY_AVAILABLE: SeqTypeSpec("strategy", "zipfian", 0x5C01),
}

# The sequence options (fields of seqgen.config.SequenceConfig) that sets of each layout read. Every layout
# reads the label space (labeling, polysemy, randomly_generate_rare) and the within-class noise.
_ALWAYS = frozenset({"labeling_common", "labeling_rare", "polysemy", "randomly_generate_rare", "noise_scale"})
READS: dict[str, frozenset[str]] = {
    "bursty": _ALWAYS | {"seq_len", "fs_shots", "bursty_shots", "ways", "p_bursty", "p_bursty_common",
                         "p_bursty_zipfian", "p_fewshot", "non_bursty_type", "grouped"},
    "fewshot": _ALWAYS | {"fs_shots", "ways", "grouped"},
    "no_support": _ALWAYS | {"seq_len", "ways"},  # ways: not read, kept so existing sets keep their identity
    "mixed": _ALWAYS | {"fs_shots", "ways", "p_fewshot"},
    "strategy": _ALWAYS | {"seq_len", "fs_shots", "ways", "grouped"},  # seq_len: kept likewise
}


def spec(seq_type: SeqType | str) -> SeqTypeSpec:
    """The spec of a sequence type (by enum or name)."""
    return SPECS[SeqType(seq_type)]


def reads(seq_type: SeqType | str) -> frozenset[str]:
    """The sequence options a set of this type reads (by its layout)."""
    return READS[spec(seq_type).layout]
