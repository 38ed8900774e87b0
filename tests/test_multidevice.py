"""Data parallelism on 4 simulated CPU devices (subprocesses, since XLA_FLAGS must be set before jax starts).

The same seed and shards give the same training on 1 and 4 devices up to float reassociation.
Tolerance: losses rtol 1e-5; >= 99.5 % of parameter entries within rtol 1e-4 / atol 1e-5 and all within
atol 1e-3. (The attention key bias has an exactly-zero gradient in exact arithmetic — softmax ignores a
constant shift — so Adam's normalisation amplifies reassociation noise there to steps of ~lr; that is the
only place where larger differences appear.) Checkpoints move between device counts; BatchNorm statistics
over a sharded batch are the global batch's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.trainkit import tiny_config
from trainer import checkpoint
from trainer.run import RunDir
from trainer.state import state_skeleton

ROOT = Path(__file__).resolve().parents[1]


def _worker(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-W", "error", "-m", "tests.multidevice_worker", *map(str, args)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _params(run, step):
    state = checkpoint.load(run, step, state_skeleton(tiny_config(), 40))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state.model) if np.asarray(x).dtype.kind == "f"]


def _same_training(a, b):
    close = sum(int(np.isclose(x, y, rtol=1e-4, atol=1e-5).sum()) for x, y in zip(a, b))
    total = sum(x.size for x in a)
    return close >= 0.995 * total and all(np.allclose(x, y, rtol=0, atol=1e-3) for x, y in zip(a, b))


def _losses(run):
    return [r["metrics"]["loss"] for r in RunDir(run).read_metrics() if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("md")
    shards = root / "shards"
    _worker("fit", shards, root / "one", 1, 8)
    _worker("fit", shards, root / "four", 4, 8)
    return root


def test_one_and_four_devices_train_the_same(runs):
    a, b = _params(runs / "one", 8), _params(runs / "four", 8)
    assert _same_training(a, b)
    assert np.allclose(_losses(runs / "one"), _losses(runs / "four"), rtol=1e-5)
    assert not all(np.array_equal(x, y) for x, y in zip(_params(runs / "one", 4), a))  # training moved them


def test_checkpoints_resume_across_device_counts(runs, tmp_path):
    import shutil

    for src, devices in (("four", 1), ("one", 4)):
        dst = tmp_path / f"{src}-to-{devices}"
        shutil.copytree(runs / src, dst)
        for late in (8,):
            shutil.rmtree(dst / "checkpoints" / f"step-{late}")
        out = _worker("fit", runs / "shards", dst, devices, 8, "resume")
        assert json.loads(out.strip().splitlines()[-1])["step"] == 8
        a, b = _params(runs / "one", 8), _params(dst, 8)
        assert _same_training(a, b)


def test_batchnorm_statistics_are_global_over_sharded_batches(tmp_path):
    _worker("bn", tmp_path / "bn.json")
    r = json.loads((tmp_path / "bn.json").read_text())
    assert r["devices"] == 4 and "batch" in r["sharded"]
    assert r["state_changed"] > 1e-4  # BatchNorm state really updated
    assert r["logits_diff"] < 1e-4 and r["state_diff"] < 1e-5


def test_batch_size_must_divide_the_device_count():
    from trainer.runtime.distributed import Topology, TopologyError, make_topology

    topo = make_topology()
    fake = Topology(topo.mesh, 0, 1)
    fake.check_batch(32)
    with pytest.raises(TopologyError, match="not divisible"):
        Topology(jax.sharding.Mesh(np.asarray(jax.devices() * 3)[:3].reshape(3), ("batch",)), 0, 1).check_batch(32)


# ---- a vectorized group spread over the devices: R/D runs per device, no communication --------------------
@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    root = tmp_path_factory.mktemp("spread")
    _worker("group", root, root / "group.json")
    return root, json.loads((root / "group.json").read_text())


def _group_leaves(run, step, seed):
    from tests.multidevice_worker import group_seed_config

    state = checkpoint.load(run, step, state_skeleton(group_seed_config(seed), 40))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


@pytest.mark.parametrize("group, seeds", [("group4", (0, 1, 2, 3)), ("group3", (0, 1, 2))])
def test_a_group_spread_over_four_devices_equals_its_runs_alone(spread, group, seeds):
    """4 runs on 4 devices (one each), and 3 runs padded to 4: each run equals the run trained alone on one
    device up to float round-off (tests/trainkit.py's group tolerances)."""
    from tests.trainkit import GROUP_ATOL, GROUP_RTOL

    root, _ = spread
    for seed in seeds:
        alone, grouped = root / "alone" / f"seed-{seed}", root / group / f"seed-{seed}"
        for step in (4, 8):
            for x, y in zip(_group_leaves(grouped, step, seed), _group_leaves(alone, step, seed), strict=True):
                np.testing.assert_allclose(x, y, rtol=GROUP_RTOL, atol=GROUP_ATOL)
        assert [r["step"] for r in RunDir(grouped).read_metrics() if r["kind"] == "train"] == [2, 4, 6, 8]
        np.testing.assert_allclose(_losses(grouped), _losses(alone), rtol=1e-5)
        evals = [[r["metrics"]["loss"]["mean"] for r in RunDir(d).read_metrics() if r["kind"] == "eval"]
                 for d in (grouped, alone)]
        assert len(evals[0]) == 2
        np.testing.assert_allclose(*evals, rtol=1e-4)
    # the runs kept their own seeds (the padding run, a copy of run 0, wrote nothing)
    assert not np.array_equal(_group_leaves(root / group / "seed-0", 8, 0)[-1], _group_leaves(root / group / "seed-1", 8, 1)[-1])
    assert sorted(p.name for p in (root / group).iterdir()) == [f"seed-{s}" for s in seeds]


def test_a_spread_group_step_has_no_cross_device_collectives(spread):
    """The compiled group step over 4 devices (a ResNet: BatchNorm statistics per run) holds no all-reduce,
    all-gather or other collective; one run's data-parallel step (the control) all-reduces."""
    _, r = spread
    assert r["devices"] == 4
    assert r["group_collectives"] == {} and r["group_program_chars"] > 10_000
    assert r["data_parallel_collectives"].get("all-reduce", 0) > 0, r
