"""Checkpoints: atomic folders, latest-complete discovery, rotation, one-line errors on bad files."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from trainer import checkpoint
from trainer.checkpoint import CheckpointError


def _tree(seed=0, width=4):
    return {"lin": eqx.nn.Linear(3, width, key=jr.PRNGKey(seed)), "step": jnp.asarray(seed, jnp.int32),
            "key": jr.PRNGKey(seed + 1)}


def _equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_round_trip_and_metadata(tmp_path):
    tree = _tree(3)
    path = checkpoint.save(tmp_path, 7, tree, {"hello": "world"})
    assert path.name == "step-7" and (path / "metadata.json").is_file()
    meta = checkpoint.read_metadata(tmp_path, 7)
    assert meta["step"] == 7 and meta["hello"] == "world" and meta["format_version"] == 2
    loaded = checkpoint.load(tmp_path, 7, _tree(0))
    assert _equal(loaded, tree) and not _equal(loaded, _tree(0))


def test_incomplete_folders_are_ignored_and_latest_wins(tmp_path):
    checkpoint.save(tmp_path, 5, _tree(), {})
    checkpoint.save(tmp_path, 10, _tree(), {})
    (tmp_path / "checkpoints" / "step-20").mkdir()  # no metadata: an interrupted save
    (tmp_path / "checkpoints" / "step-30.tmp").mkdir()
    assert checkpoint.list_steps(tmp_path) == [5, 10]
    assert checkpoint.latest_step(tmp_path) == 10
    assert checkpoint.latest_step(tmp_path / "nothing") is None


def test_keep_rotates_old_checkpoints(tmp_path):
    for s in (1, 2, 3, 4):
        checkpoint.save(tmp_path, s, _tree(), {}, keep=2)
    assert checkpoint.list_steps(tmp_path) == [3, 4]


def test_truncated_state_gives_one_line_error(tmp_path):
    path = checkpoint.save(tmp_path, 1, _tree(), {})
    data = (path / "state.eqx").read_bytes()
    (path / "state.eqx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(tmp_path, 1, _tree())
    assert "truncated" in str(e.value) and "\n" not in str(e.value)


def test_incompatible_skeleton_is_refused(tmp_path):
    checkpoint.save(tmp_path, 1, _tree(width=4), {})
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path, 1, _tree(width=5))


def test_missing_step_and_foreign_metadata(tmp_path):
    path = checkpoint.save(tmp_path, 1, _tree(), {})
    with pytest.raises(CheckpointError, match="available steps: 1"):
        checkpoint.read_metadata(tmp_path, 2)
    (path / "metadata.json").write_text(json.dumps({"format": "other", "format_version": 9}))
    with pytest.raises(CheckpointError, match="not an emergent-icl checkpoint"):
        checkpoint.load(tmp_path, 1, _tree())
    (path / "metadata.json").write_text(json.dumps({"format": checkpoint.FORMAT, "format_version": 9, "step": 1}))
    with pytest.raises(CheckpointError, match="format v9; this version reads v2 only"):
        checkpoint.load(tmp_path, 1, _tree())
