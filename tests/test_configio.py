"""seqgen.configio: the config plumbing both packages share (overrides, diffs)."""

from __future__ import annotations

from seqgen.config import BuildConfig, replace_nested
from seqgen.configio import apply_overrides, changed_keys
from trainer.config import BOOKKEEPING, TrainConfig, with_overrides


def test_apply_overrides_sets_dotted_keys_and_skips_options_not_given():
    data = {"a": {"b": 1, "c": 2}, "d": 3}
    assert apply_overrides(data, {"a.b": 10, "d": None, "a.c": (1, 2)}) == {"a": {"b": 10, "c": (1, 2)}, "d": 3}
    # both packages' configs go through it
    assert replace_nested(BuildConfig(), {"sequence.p_bursty": 0.5}).sequence.p_bursty == 0.5
    assert with_overrides(TrainConfig(), {"training.steps": 7, "training.seed": None}).training.steps == 7


def test_changed_keys_is_the_one_config_diff():
    old = {"a": {"b": 1, "c": [1, 2]}, "gone": 1}
    new = {"a": {"b": 2, "c": (1, 2)}, "added": 1}
    assert changed_keys(old, new) == ["a.b", "added", "gone"]  # a tuple equals the list it was stored as
    assert changed_keys(old, new, ignore={"a.b"}) == ["added", "gone"]
    base = TrainConfig()
    logged = with_overrides(base, {"training.log_every": 7, "training.steps": 9})
    assert changed_keys(base.to_dict(), logged.to_dict()) == ["training.log_every", "training.steps"]
    assert changed_keys(base.to_dict(), logged.to_dict(), ignore=BOOKKEEPING) == ["training.steps"]
