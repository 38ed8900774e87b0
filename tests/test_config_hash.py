"""One canonical-JSON hash (`seqgen.files.canonical_sha256`) behind the build id of a shard set, the
manifest fingerprint stored in every run's config.json and the sweep's shard-set folder names. The
values below were computed with the three separate functions of before (commit eb3e2f7): stored ids,
fingerprints and folder names must never change silently."""

from __future__ import annotations

from types import SimpleNamespace

from seqgen.config import BuildConfig, SeqType
from seqgen.files import canonical_sha256
from seqgen.build import canonical_sha256 as build_hash
from seqgen.verify import canonical_sha256 as verify_hash
from trainer.data import manifest_fingerprint
from trainer.sweep.plan import config_hash, set_folder

OBJ = {"b": [1, 2.5, None, True], "a": {"z": "é", "y": 0}}


def test_the_build_id_hash_is_unchanged():  # the build id of build.json and sidecars: seqgen.build, seqgen.verify
    assert build_hash is canonical_sha256 and verify_hash is canonical_sha256
    assert canonical_sha256(OBJ) == "c595c61f41578ad8c03f781b9ab44e48e3189159333bc7d6eab20a41cfe186f8"


def test_the_manifest_fingerprint_is_unchanged():  # trainer.data.manifest_fingerprint (config.json)
    assert manifest_fingerprint(SimpleNamespace(manifest=OBJ)) == \
        "f87712b00b6c89dc652bd4c84c8f2926969b3f0f1fa379a0395e433e3bd71235"


def test_the_sweep_folder_names_are_unchanged():  # trainer.sweep.plan.config_hash (data/shards/sweeps/...)
    assert config_hash(BuildConfig()) == "7ec23539cbdd"
    assert set_folder("s", BuildConfig(seq_type=SeqType.FEWSHOT_HOLDOUT)).name == "fewshot_holdout-2e17abfce864"


def test_key_order_does_not_matter_and_spacing_is_the_only_variant():
    shuffled = {"a": {"y": 0, "z": "é"}, "b": [1, 2.5, None, True]}
    assert canonical_sha256(shuffled) == canonical_sha256(OBJ)
    assert canonical_sha256(OBJ, spaced=True) == manifest_fingerprint(SimpleNamespace(manifest=OBJ))
    assert canonical_sha256(OBJ, spaced=True) != canonical_sha256(OBJ)


def test_committed_results_name_the_folders_the_sweep_plans():
    """The burstiness figure's committed run config records its shard sets under the names `set_folder`
    gives today (the same names as the sets on disk)."""
    import json
    from pathlib import Path

    import pytest

    from trainer.sweep.spec import load_sweep

    repo = Path(__file__).resolve().parents[1]
    stored = repo / "results" / "burstiness" / "runs" / "p_bursty-0" / "seed-0" / "config.json"
    if not stored.is_file():
        pytest.skip("no committed burstiness results")
    data = json.loads(stored.read_text())["data"]
    run = next(r for r in load_sweep(repo / "configs" / "sweeps" / "burstiness.toml").runs if r.name == "p_bursty-0/seed-0")
    assert Path(data["train"]["path"]).name == set_folder("s", run.train).name == "bursty-b07ae1470b2e"
    assert [Path(e["path"]).name for e in data["eval"]] == [set_folder("s", c).name for c in run.evals]
