"""Vectorized groups of runs (trainer.group): the same training as one run at a time, up to float round-off;
exact resume of a group; a group's run resumed alone by `fit` and vice versa; which runs may be grouped."""

from __future__ import annotations

from dataclasses import replace

import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from seqgen.config import SeqType
from tests.trainkit import GROUP_ADAM_EPS, GROUP_ATOL, GROUP_RTOL, paper_like_sets, symbolic_set, tiny_config
from trainer import checkpoint
from trainer.runtime.distributed import make_topology
from trainer.evaluate import evaluate_run
from trainer.fit import fit
from trainer.group import GroupError, fit_group, plan_groups, stack_states, unstack_state
from trainer.models import ExampleEncoding, ModelConfig, forward, make_model
from trainer.run import RunDir
from trainer.state import state_skeleton

RTOL, ATOL = GROUP_RTOL, GROUP_ATOL  # tests/trainkit.py says why these, and why Adam's eps is raised
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return paper_like_sets(tmp_path_factory.mktemp("shards"))


def _cfg(seed: int, steps: int = 20):
    cfg = tiny_config(steps=steps, seed=seed, log_every=5, eval_every=10, checkpoint_every=10)
    return replace(cfg, optimizer=replace(cfg.optimizer, eps=GROUP_ADAM_EPS))


@pytest.fixture(scope="module")
def grouped(sets, tmp_path_factory):
    """Three runs trained as one group for 20 steps (checkpoints at 10 and 20)."""
    train, icl, _ = sets
    dirs = [tmp_path_factory.mktemp("group") / f"seed-{s}" for s in SEEDS]
    results = fit_group([_cfg(s) for s in SEEDS], [train] * 3, [[icl]] * 3, dirs, progress=False)
    assert [(r.step, r.interrupted) for r in results] == [(20, False)] * 3
    return dirs


@pytest.fixture(scope="module")
def alone(sets, tmp_path_factory):
    """The same three runs trained one by one by `fit`."""
    train, icl, _ = sets
    dirs = [tmp_path_factory.mktemp("alone") / f"seed-{s}" for s in SEEDS]
    for s, d in zip(SEEDS, dirs):
        fit(_cfg(s), train, [icl], d, progress=False)
    return dirs


def _leaves(run_dir, step, cfg):
    state = checkpoint.load(run_dir, step, state_skeleton(cfg, 40))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def _close(a_dir, b_dir, step, seed, exact=False):
    a, b = _leaves(a_dir, step, _cfg(seed)), _leaves(b_dir, step, _cfg(seed))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def _records(run_dir, kind):
    return [r for r in RunDir(run_dir).read_metrics() if r["kind"] == kind]


def _cut_at(src, dst, step):
    """A copy of run directory `src` as it was when checkpoint `step` was its latest."""
    shutil.copytree(src, dst)
    for later in [s for s in checkpoint.list_steps(dst) if s > step]:
        shutil.rmtree(checkpoint.checkpoint_dir(dst) / f"step-{later}")
    return dst


def test_group_equals_runs_one_by_one(sets, grouped, alone):
    _, icl, _ = sets
    for seed, g, a in zip(SEEDS, grouped, alone):
        for step in (10, 20):
            _close(g, a, step, seed)
        train_g, train_a = _records(g, "train"), _records(a, "train")
        assert [r["step"] for r in train_g] == [r["step"] for r in train_a] == [5, 10, 15, 20]
        np.testing.assert_allclose([r["metrics"]["loss"] for r in train_g], [r["metrics"]["loss"] for r in train_a],
                                   rtol=1e-5)
        eval_g, eval_a = _records(g, "eval"), _records(a, "eval")
        assert [r["step"] for r in eval_g] == [10, 20]
        np.testing.assert_allclose([r["metrics"]["loss"]["mean"] for r in eval_g],
                                   [r["metrics"]["loss"]["mean"] for r in eval_a], rtol=1e-4)
    # each run kept its own seed, key and init
    assert not all(np.array_equal(x, y) for x, y in zip(_leaves(grouped[0], 20, _cfg(0)), _leaves(grouped[1], 20, _cfg(1))))
    # a group's run directory is an ordinary one: `trainer evaluate` reads it
    results = evaluate_run(grouped[1], [icl], step=None, train_dir=None, max_seqs=64, batch_size=32,
                           omniglot_dir=None, cache_dir=None, topo=make_topology(), echo=lambda s: None)
    assert results[0][1] == "fewshot_holdout" and results[0][2]["accuracy_closed"]["n"] == 64


def test_resumed_group_equals_uninterrupted_group_bitwise(sets, grouped, tmp_path):
    train, icl, _ = sets
    dirs = [_cut_at(g, tmp_path / g.name, 10) for g in grouped]
    fit_group([_cfg(s) for s in SEEDS], [train] * 3, [[icl]] * 3, dirs, resume=True, progress=False)
    for seed, g, d in zip(SEEDS, grouped, dirs):
        _close(g, d, 20, seed, exact=True)
        assert _records(g, "train") == _records(d, "train")  # each step logged once, the same values
        assert [r["metrics"] for r in _records(g, "eval")] == [r["metrics"] for r in _records(d, "eval")]


def test_a_group_run_resumes_alone_and_fit_runs_resume_as_a_group(sets, grouped, alone, tmp_path):
    train, icl, _ = sets
    one = _cut_at(grouped[1], tmp_path / "one", 10)
    fit(_cfg(1), train, [icl], one, resume=True, progress=False)
    _close(one, grouped[1], 20, 1)
    dirs = [_cut_at(a, tmp_path / "fit" / a.name, 10) for a in alone]
    fit_group([_cfg(s) for s in SEEDS], [train] * 3, [[icl]] * 3, dirs, resume=True, progress=False)
    for seed, d, g in zip(SEEDS, dirs, grouped):
        _close(d, g, 20, seed)


def test_grouping_rules_and_refusals(sets, alone, tmp_path):
    train, icl, _ = sets
    other_draw = symbolic_set(tmp_path, SeqType.BURSTY, 512, seed=5, p_bursty=0.0)  # only the draw differs
    cfgs = [_cfg(0, 5), _cfg(1, 5), tiny_config(steps=5, batch_size=8), _cfg(2, 5)]
    trains = [train, other_draw, train, train]
    assert plan_groups(cfgs, trains) == [[0, 1, 3], [2]]
    assert plan_groups(cfgs, trains, max_size=2) == [[0, 1], [2], [3]]
    # a group may mix training sets that differ only in how their sequences were drawn
    dirs = [tmp_path / "mixed" / n for n in ("a", "b")]
    fit_group(cfgs[:2], trains[:2], [[], []], dirs, progress=False)
    assert checkpoint.latest_step(dirs[1]) == 5
    with pytest.raises(GroupError, match="cannot share"):
        fit_group([cfgs[0], cfgs[2]], [train, train], [[], []], [tmp_path / "x", tmp_path / "y"], progress=False)
    with pytest.raises(GroupError, match="share a run directory"):
        fit_group(cfgs[:2], [train] * 2, [[], []], [tmp_path / "z", tmp_path / "z"], progress=False)
    assert not any((tmp_path / n).exists() for n in "xyz")
    # runs resuming from different steps are planned apart, and refused together
    cut = [_cut_at(alone[0], tmp_path / "r0", 10), _cut_at(alone[1], tmp_path / "r1", 20)]
    longer = [_cfg(0, 30), _cfg(1, 30)]
    assert plan_groups(longer, [train] * 2, cut, resume=True) == [[0], [1]]
    assert plan_groups(longer, [train] * 2, cut, resume=[False, False]) == [[0, 1]]  # both would start afresh
    with pytest.raises(GroupError, match="different steps"):
        fit_group(longer, [train] * 2, [[], []], cut, resume=True, progress=False)


def test_batchnorm_statistics_stay_per_run_under_vmap():
    """The ResNet's BatchNorm (custom VJP) vmapped over runs: outputs, new statistics and gradients of each
    run are those of the run alone."""
    cfg = ModelConfig(example_encoding=ExampleEncoding.RESNET, emb_dim=16, num_layers=1, num_heads=2,
                      resnet_channels=(4, 8, 8), resnet_blocks=(1, 1, 1, 1))
    pairs = [make_model(cfg, 7, key=jr.PRNGKey(i), image_size=16) for i in range(2)]
    images = [jr.uniform(jr.PRNGKey(10 + i), (3, 4, 16, 16, 1)) * (1 + 3 * i) for i in range(2)]  # other scales
    labels = jr.randint(jr.PRNGKey(20), (3, 4), 0, 7)

    def loss(model, state, x):
        logits, state = forward(model, state, x, labels, key=None, inference=False)
        return jnp.mean(logits ** 2), state

    grad = eqx.filter_value_and_grad(loss, has_aux=True)
    alone = [eqx.filter_jit(grad)(m, s, x) for (m, s), x in zip(pairs, images)]  # jitted: eager is minutes
    pairs = [make_model(cfg, 7, key=jr.PRNGKey(i), image_size=16) for i in range(2)]  # fresh (unused) states
    models = stack_states([m for m, _ in pairs])
    states = stack_states([s for _, s in pairs])
    batched = eqx.filter_jit(eqx.filter_vmap(grad))(models, states, jnp.stack(images))
    for i, ((value, state), grads) in enumerate(alone):
        (b_value, b_state), b_grads = unstack_state(batched, i)
        np.testing.assert_allclose(b_value, value, rtol=1e-5)
        for x, y in zip(jax.tree_util.tree_leaves(b_state), jax.tree_util.tree_leaves(state)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        for x, y in zip(jax.tree_util.tree_leaves(b_grads), jax.tree_util.tree_leaves(grads)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    first, second = (jax.tree_util.tree_leaves(alone[i][0][1]) for i in range(2))
    assert not all(np.allclose(x, y) for x, y in zip(first, second))  # the two runs' statistics differ
