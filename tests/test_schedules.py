"""Eval / checkpoint schedules, AdamW and L2 against hand-computed values; one end-to-end fit using them."""

from __future__ import annotations

import dataclasses
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from seqgen.config import SeqType
from seqgen.configio import ConfigError
from tests.trainkit import symbolic_set, tiny_config
from trainer import checkpoint
from trainer.config import OptimizerConfig, TrainConfig, TrainingConfig
from trainer.fit import fit
from trainer.loop import dispatch_size
from trainer.models import make_model
from trainer.models.layers import Dense, LayerNorm, not_decayed
from trainer.state import decay_mask, decoupled_optimizer, global_norm, l2_penalty
from trainer.run import RunDir
from trainer.schedule import ScheduleKind, StepSchedule, log_steps
from trainer.state import learning_rate, make_optimizer


# ---- schedules -----------------------------------------------------------------------------------
def test_log_steps_by_hand():
    assert log_steps(100, 10) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63, 79, 100)
    assert log_steps(1000, 3) == (1, 2, 5, 10, 22, 46, 100, 215, 464, 1000)
    assert log_steps(1, 4) == (1,)


def test_every_is_todays_rule():
    t = TrainingConfig(steps=95, eval_every=10)
    s = StepSchedule.of(t, "eval")
    for step in range(1, 96):
        assert s.due(step) == (step % 10 == 0 or step == 95)
        assert s.until_next(step) == 10 - step % 10
    assert s.all_steps() == [10, 20, 30, 40, 50, 60, 70, 80, 90, 95]


def test_log_and_list_schedules():
    t = TrainingConfig(steps=50, eval_schedule=ScheduleKind.LOG, eval_per_decade=10,
                       checkpoint_schedule=ScheduleKind.LIST, checkpoint_steps=(7, 3, 70))
    ev, ck = StepSchedule.of(t, "eval"), StepSchedule.of(t, "checkpoint")
    assert ev.all_steps() == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50]
    assert ck.all_steps() == [3, 7, 50]  # 70 lies beyond the run; the last step is always included
    assert [s for s in range(60) if ck.due(s)] == [3, 7, 50]
    assert (ck.until_next(0), ck.until_next(3), ck.until_next(7), ev.until_next(40)) == (3, 4, 43, 10)


def test_dispatches_never_jump_over_a_scheduled_step():
    t = dataclasses.replace(tiny_config(steps=200).training, steps_per_dispatch=16, log_every=50,
                            eval_schedule=ScheduleKind.LOG, checkpoint_schedule=ScheduleKind.LIST,
                            checkpoint_steps=(37, 111))
    due = set(StepSchedule.of(t, "eval").all_steps()) | {37, 111, 200} | set(range(50, 201, 50))
    step, reached = 0, set()
    while step < t.steps:
        step += dispatch_size(step, t)
        reached.add(step)
    assert due <= reached


def test_schedule_refusals_and_old_configs_load():
    base = TrainConfig().to_dict()
    for key in ("eval_schedule", "eval_steps", "eval_per_decade", "checkpoint_schedule"):
        del base["training"][key]
    for key in ("weight_decay", "l2", "decay_mask"):
        del base["optimizer"][key]
    assert TrainConfig.from_dict(base) == TrainConfig()  # a config.json written before these options
    bad = [({"eval_schedule": "list"}, "eval_steps"), ({"checkpoint_steps": [5]}, "checkpoint_schedule"),
           ({"eval_per_decade": 0}, "per_decade"), ({"eval_schedule": "list", "eval_steps": [0]}, "positive"),
           ({"eval_schedule": "sometimes"}, "every, log, list")]
    for opts, match in bad:
        data = TrainConfig().to_dict()
        data["training"].update(opts)
        with pytest.raises(ConfigError, match=match):
            TrainConfig.from_dict(data).validate()
    for opts, match in [({"weight_decay": -1.0}, "weight_decay"), ({"l2": -0.1}, "l2"),
                        ({"decay_mask": "biases"}, "decay_mask")]:
        with pytest.raises(ConfigError, match=match):
            TrainConfig(optimizer=OptimizerConfig(**opts)).validate()


# ---- regularisers ---------------------------------------------------------------------------------
class _Toy(eqx.Module):
    """Parameters of hand-set values: a dense layer and a LayerNorm (their biases, scales and offsets are
    declared not decayed in trainer.models.layers), a declared bias and an undeclared table."""

    dense: Dense
    ln: LayerNorm
    qkv_bias: jax.Array = not_decayed()
    label_table: jax.Array = eqx.field(default=None)


def _params():
    dense = eqx.tree_at(lambda d: (d.weight, d.bias), Dense(2, 2, std=1.0, key=jax.random.PRNGKey(0)),
                        (jnp.array([[1.0, -2.0], [0.5, 3.0]]), jnp.array([1.0, 1.0])))
    ln = eqx.tree_at(lambda n: (n.scale, n.offset), LayerNorm(2), (jnp.array([2.0, 2.0]), jnp.array([0.5, -0.5])))
    return _Toy(dense, ln, jnp.array([4.0]), jnp.array([[0.0, 1.0, 2.0]]))


def test_decay_mask_excludes_biases_and_norms():
    m = decay_mask(_params())
    assert (m.dense.weight, m.dense.bias, m.ln.scale, m.ln.offset, m.qkv_bias, m.label_table) == (
        True, False, False, False, False, True)
    assert all(jax.tree_util.tree_leaves(decay_mask(_params(), "all")))
    assert all(jax.tree_util.tree_leaves(decay_mask({"bias": jnp.ones(2)})))  # undeclared: decayed


@pytest.mark.parametrize("seq_model", ["transformer", "lstm", "vanilla_rnn"])
def test_the_declared_rule_spares_exactly_biases_and_norms_of_the_paper_models(seq_model):
    """Declared where each layer is defined, the rule leaves out exactly the arrays named bias, qkv_bias,
    scale or offset (the name rule it replaced, so runs with weight decay or L2 compute what they did)."""
    cfg = TrainConfig().model
    cfg = dataclasses.replace(cfg, seq_model=seq_model, num_layers=2)
    model = eqx.filter_eval_shape(lambda: make_model(cfg, 30, key=jax.random.PRNGKey(0), image_size=28)[0])
    params = eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    mask = decay_mask(params)
    spared = {jax.tree_util.keystr(path) for path, keep in jax.tree_util.tree_leaves_with_path(mask) if not keep}
    by_name = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
               if getattr(path[-1], "name", None) in ("bias", "qkv_bias", "scale", "offset")}
    assert spared == by_name and len(spared) > 10


def test_l2_penalty_by_hand():
    # weights only: (1 + 4 + 0.25 + 9) + (0 + 1 + 4) = 19.25; times mu / 2
    assert float(l2_penalty(_params(), 0.1)) == pytest.approx(0.05 * 19.25)
    everything = 19.25 + 2 + 8 + 0.5 + 16
    assert float(l2_penalty(_params(), 0.1, "all")) == pytest.approx(0.05 * everything)
    assert float(global_norm(_params())) == pytest.approx(np.sqrt(everything))


def _run(opt, params, grads_seq):
    state = opt.init(params)
    for g in grads_seq:
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_adamw_matches_the_textbook_update_and_optax():
    cfg = OptimizerConfig(max_lr=0.1, warmup_steps=2, weight_decay=0.3, decay_mask="all")
    p0 = {"w": jnp.array([1.0, -2.0, 0.5]), "bias": jnp.array([3.0])}
    grads = [{"w": jnp.array([0.2, -0.1, 0.4]), "bias": jnp.array([1.0])},
             {"w": jnp.array([-0.3, 0.5, 0.1]), "bias": jnp.array([-2.0])},
             {"w": jnp.array([0.1, 0.1, -0.2]), "bias": jnp.array([0.5])}]
    got = _run(make_optimizer(cfg), p0, grads)
    # textbook AdamW (Loshchilov & Hutter's decoupled decay, optax's lr-scaled convention), in NumPy
    b1, b2, eps = cfg.b1, cfg.b2, cfg.eps
    lr = [min(0.1 / 2 * s, 0.1 * np.sqrt(2) / np.sqrt(s)) if s else 0.0 for s in range(3)]
    want = {}
    for name in p0:
        th, m, v = np.asarray(p0[name], np.float64), 0.0, 0.0
        for t, g in enumerate(grads, start=1):
            g = np.asarray(g[name], np.float64)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            direction = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            th = th - lr[t - 1] * (direction + 0.3 * th)
        want[name] = th
    for name in p0:
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5)
    ref = _run(optax.adamw(learning_rate(cfg), b1=b1, b2=b2, eps=eps, weight_decay=0.3), p0, grads)
    for name in p0:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(ref[name]), rtol=1e-6)


class _WeightBias(eqx.Module):
    weight: jax.Array
    bias: jax.Array = not_decayed()


def test_masked_decay_spares_biases_and_zero_decay_is_todays_adam():
    cfg = OptimizerConfig(max_lr=0.1, warmup_steps=1, weight_decay=0.5)
    p0 = _WeightBias(jnp.array([2.0, -4.0]), jnp.array([1.0]))
    zero = jax.tree_util.tree_map(jnp.zeros_like, p0)
    p = _run(make_optimizer(cfg), p0, [zero, zero])  # lr(0) = 0, lr(1) = 0.1; Adam's direction is 0
    np.testing.assert_allclose(np.asarray(p.weight), [2.0 * (1 - 0.1 * 0.5), -4.0 * (1 - 0.1 * 0.5)], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(p.bias), [1.0])
    plain = OptimizerConfig(max_lr=0.1, warmup_steps=1)
    g = [_WeightBias(jnp.array([0.1, 0.2]), jnp.array([0.3]))] * 3
    a, b = _run(make_optimizer(plain), p0, g), _run(optax.adam(learning_rate(plain)), p0, g)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    assert isinstance(decoupled_optimizer(cfg, learning_rate(cfg)), optax.GradientTransformation)


# ---- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return (symbolic_set(root, SeqType.BURSTY, 2048), symbolic_set(root, SeqType.FLIP, 128, seed=3),
            symbolic_set(root, SeqType.COPY_AVAILABLE, 128, seed=4))


def test_fit_with_schedules_regularisers_and_strategy_sets(sets, tmp_path):
    train, flip, copy = sets
    cfg = tiny_config(steps=30, eval_schedule=ScheduleKind.LOG, eval_per_decade=4,
                      checkpoint_schedule=ScheduleKind.LIST, checkpoint_steps=(4, 11), steps_per_dispatch=8)
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, weight_decay=0.01, l2=1e-3))
    fit(cfg, train, [flip, copy], tmp_path / "run", progress=False)
    records = list(RunDir(tmp_path / "run").read_metrics())
    evals = [r for r in records if r["kind"] == "eval"]
    assert sorted({r["step"] for r in evals}) == [1, 2, 3, 6, 10, 18, 30] == list(log_steps(30, 4)) + [30]
    assert checkpoint.list_steps(tmp_path / "run") == [4, 11, 30]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert all(r["metrics"]["grad_norm"] > 0 and r["metrics"]["param_norm"] > 0 for r in train_recs)
    for r in evals:
        m = r["metrics"]
        total = m["from_context"]["mean"] + m["from_weights"]["mean"] + m["neither"]["mean"]
        if r["seq_type"] == "flip":
            assert total == pytest.approx(1.0)  # context and trained labels always differ on flip sets
        else:
            assert m["from_context"]["mean"] == m["from_weights"]["mean"] == m["accuracy_query"]["mean"]
    stored = json.loads((tmp_path / "run" / "config.json").read_text())["trainer"]
    assert stored["optimizer"]["weight_decay"] == 0.01 and stored["training"]["checkpoint_steps"] == [4, 11]
