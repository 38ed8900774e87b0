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


def test_every_layout_reads_known_options_and_has_a_generator():
    import dataclasses

    from seqgen.config import SequenceConfig
    from seqgen.sampling import LAYOUTS

    fields = {f.name for f in dataclasses.fields(SequenceConfig)}
    assert set(seqtypes.READS) == set(LAYOUTS) == {s.layout for s in seqtypes.SPECS.values()}
    assert seqtypes.READS["bursty"] == fields  # a training set reads every option
    for layout, names in seqtypes.READS.items():
        assert names <= fields, layout


def test_an_evaluation_set_keeps_exactly_what_its_layout_reads():
    import dataclasses

    from seqgen.config import BuildConfig, SequenceConfig
    from trainer.sweep.spec import eval_config

    d = SequenceConfig()
    train = BuildConfig(sequence=SequenceConfig(p_bursty=0.5, seq_len=11, fs_shots=3, bursty_shots=2, ways=3,
                                                p_fewshot=0.3, grouped=True, noise_scale=0.2, polysemy=2))
    for t in SeqType:
        ev = eval_config(train, t, 10, 7)
        assert (ev.seq_type, ev.num_seqs, ev.seed, ev.split) == (t, 10, 7, train.split)
        for f in dataclasses.fields(SequenceConfig):
            want = getattr(train.sequence, f.name) if f.name in seqtypes.reads(t) else getattr(d, f.name)
            assert getattr(ev.sequence, f.name) == want, (t.value, f.name)
    # the strategy kernel reads `grouped`: its evaluation sets keep the training set's (they once reset it)
    assert eval_config(train, SeqType.FLIP, 10, 7).sequence.grouped is True
