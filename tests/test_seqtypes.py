"""The registry of sequence types (seqgen/seqtypes.py) is complete and is what the modules read."""

from __future__ import annotations

from seqgen import seqtypes
from seqgen.config import SeqType
from seqgen.sampling import SEQ_TYPE_TAGS
from seqgen.verify import allowed_pool
from trainer.metrics import column_of


def test_every_type_has_one_spec_with_a_distinct_tag():
    assert set(seqtypes.SPECS) == set(SeqType)
    tags = [s.tag for s in seqtypes.SPECS.values()]
    assert len(set(tags)) == len(tags)
    # the tags key every set's random streams: these values are fixed forever
    assert SEQ_TYPE_TAGS[SeqType.BURSTY] == 0x1B0E and SEQ_TYPE_TAGS[SeqType.FEWSHOT_HOLDOUT] == 0x3F04
    assert SEQ_TYPE_TAGS[SeqType.NO_SUPPORT_ZIPFIAN] == 0x2C03 and SEQ_TYPE_TAGS[SeqType.COPY_AVAILABLE] == 0x5C01


def test_the_modules_read_the_registry():
    for t, s in seqtypes.SPECS.items():
        assert allowed_pool(t) == s.pool
        assert t.is_fewshot == (s.layout == "fewshot") and t.is_no_support == (s.layout == "no_support")
        assert t.is_strategy == (s.layout == "strategy") and t.evaluation_only == s.evaluation_only
        assert column_of(t) == (s.column or t.value)
    assert [t for t in SeqType if t.evaluation_only] == [SeqType.FEWSHOT_HOLDOUT]
    assert (column_of("fewshot_holdout"), column_of("no_support_zipfian")) == ("icl", "iwl")
