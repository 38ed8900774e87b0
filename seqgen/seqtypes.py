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

Adding a type: an entry here, its sampling kernel (`seqgen.kernels`, dispatched in `seqgen.sampling`), and its
tests. `SeqType` (seqgen.config) holds the names; its properties read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from seqgen.config import SeqType

Layout = Literal["bursty", "fewshot", "no_support", "mixed", "strategy"]
Pool = Literal["rare", "common", "holdout", "zipfian"]


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


def spec(seq_type: SeqType | str) -> SeqTypeSpec:
    """The spec of a sequence type (by enum or name)."""
    return SPECS[SeqType(seq_type)]
