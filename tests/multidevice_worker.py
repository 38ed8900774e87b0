"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (see test_multidevice.py).

Modes:
  fit ROOT RUN DEVICES STEPS [resume]  train the tiny symbolic model on DEVICES simulated CPU devices
  bn OUT                               ResNet BatchNorm on a batch sharded over 4 devices vs 1 device
  group ROOT OUT                       4 runs alone (1 device each), as a group of 4 and a group of 3 on
                                       4 devices; the collectives in the compiled train programs
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


def fit_mode(root, run, devices, steps, resume):
    from tests.trainkit import paper_like_sets, tiny_config
    from trainer.runtime.distributed import make_topology
    from trainer.fit import fit

    train, icl, _ = paper_like_sets(Path(root), train_seqs=512)
    cfg = tiny_config(steps=steps, eval_every=4, checkpoint_every=4, log_every=2, eval_seqs=64)
    result = fit(cfg, train, [icl], run, resume=resume, topo=make_topology(devices), progress=False)
    print(json.dumps({"step": result.step, "devices": len(jax.devices())}))


def bn_mode(out):
    from trainer.runtime.distributed import make_topology, replicate, to_global
    from trainer.models import ModelConfig, forward, make_model

    cfg = ModelConfig(emb_dim=16, num_layers=1, num_heads=2)
    model, state = make_model(cfg, 10, key=jr.PRNGKey(0), image_size=16)
    images = jr.uniform(jr.PRNGKey(1), (8, 3, 16, 16, 1))
    labels = jr.randint(jr.PRNGKey(2), (8, 3), 0, 10)

    @jax.jit
    def run(model, state, images, labels):
        return forward(model, state, images, labels, key=None, inference=False)

    single = run(model, state, images, labels)
    topo = make_topology(4)
    batch = to_global(topo, {"x": np.asarray(images), "y": np.asarray(labels)})
    sharded = run(replicate(topo, model), replicate(topo, state), batch["x"], batch["y"])
    logits_diff = float(jnp.max(jnp.abs(single[0] - sharded[0])))
    state_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                     zip(jax.tree_util.tree_leaves(single[1]), jax.tree_util.tree_leaves(sharded[1])))
    changed = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                  zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(single[1])))
    Path(out).write_text(json.dumps({"devices": len(jax.devices()), "logits_diff": logits_diff,
                                     "state_diff": state_diff, "state_changed": changed,
                                     "sharded": str(batch["x"].sharding)}))


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "collective-broadcast")


def collectives(compiled_text: str) -> dict[str, int]:
    """How many of each cross-device collective a compiled HLO module holds (its instructions, `= op(`
    or `op-start(`)."""
    import re

    return {c: n for c in COLLECTIVES if (n := len(re.findall(rf"\b{c}(?:-start)?\(", compiled_text)))}


def group_seed_config(seed):
    from dataclasses import replace

    from tests.trainkit import GROUP_ADAM_EPS, tiny_config

    cfg = tiny_config(steps=8, seed=seed, steps_per_dispatch=3, log_every=2, eval_every=4, checkpoint_every=4,
                      eval_seqs=64)
    return replace(cfg, optimizer=replace(cfg.optimizer, eps=GROUP_ADAM_EPS))


def group_mode(root, out):
    """The same 4 seeds trained alone on one device each, as a group of 4 over 4 devices (one run per
    device) and the first 3 as a group of 3 (padded to 4); then the collectives of the compiled programs:
    the group step over 4 devices (a small ResNet: BatchNorm included) and, as the control, one run's
    data-parallel step."""
    from tests.trainkit import paper_like_sets
    from trainer.fit import fit
    from trainer.group import fit_group
    from trainer.runtime.distributed import make_topology

    root = Path(root)
    train, icl, _ = paper_like_sets(root / "shards", train_seqs=512)
    seeds = (0, 1, 2, 3)
    for s in seeds:
        fit(group_seed_config(s), train, [icl], root / "alone" / f"seed-{s}", topo=make_topology(1), progress=False)
    four = make_topology(4)
    fit_group([group_seed_config(s) for s in seeds], [train] * 4, [[icl]] * 4,
              [root / "group4" / f"seed-{s}" for s in seeds], topo=four, progress=False)
    fit_group([group_seed_config(s) for s in seeds[:3]], [train] * 3, [[icl]] * 3,
              [root / "group3" / f"seed-{s}" for s in seeds[:3]], topo=four, progress=False)
    Path(out).write_text(json.dumps({"devices": len(jax.devices()), **_programs(train, four)}))


def _programs(train, topo):
    import equinox as eqx

    from trainer.config import TrainConfig, TrainingConfig
    from trainer.data import BatchStream, open_shard_set
    from trainer.group import make_group_step, stack_states
    from trainer.models import ExampleEncoding, ModelConfig
    from trainer.runtime.distributed import replicate, to_global
    from trainer.state import init_state
    from trainer.step import StepContext, make_train_step

    shards = open_shard_set(train)
    model = ModelConfig(example_encoding=ExampleEncoding.RESNET, emb_dim=16, num_layers=1, num_heads=2,
                        resnet_channels=(4, 8, 8), resnet_blocks=(1, 1, 1, 1))
    cfgs = [TrainConfig(model=model, training=TrainingConfig(batch_size=8, image_size=16, seed=s)).validate()
            for s in range(4)]
    ctx = StepContext.create(cfgs[0], shards.config)
    table = replicate(topo, jr.uniform(jr.PRNGKey(0), (shards.num_labels + 10, 16, 16, 1)))

    def examples(table, batch, set_cfg):  # random images per symbol: the ResNet (and its BatchNorm) runs
        return table[batch["example"]]

    k = 2
    with BatchStream(shards, 8) as stream:
        local = [[next(stream) for _ in range(k)] for _ in range(4)]
    names = ("example", "label")
    grouped = {n: np.stack([np.stack([b[n] for b in run]) for run in local], axis=1) for n in names}  # [K, R, B, L]
    arrays, static = eqx.partition(stack_states([init_state(c, shards.num_labels) for c in cfgs]), eqx.is_array)
    states = eqx.combine(jax.device_put(arrays, topo.runs_sharding()), static)
    import trainer.step

    made_by = trainer.step.examples_for  # the trainer's input maker, replaced at this test's edge
    trainer.step.examples_for = lambda cfg: examples
    try:
        group_step = make_group_step(ctx, topo)
    finally:
        trainer.step.examples_for = made_by
    group_text = group_step.lower(
        table, states, jax.device_put(grouped, topo.runs_sharding(1)), np.int32(k)).compile().compiled.as_text()
    # the control: one run's data-parallel step over the same devices (the tiny embedding model: cheaper to
    # compile) all-reduces its gradients
    tiny = group_seed_config(0)
    single = replicate(topo, init_state(tiny, shards.num_labels))
    batches = to_global(topo, {n: grouped[n][:, 0] for n in names}, leading=1)
    dp_text = make_train_step(StepContext.create(tiny, shards.config)).lower(
        table, single, batches, np.int32(k)).compile().compiled.as_text()
    return {"group_collectives": collectives(group_text), "data_parallel_collectives": collectives(dp_text),
            "group_program_chars": len(group_text)}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "fit":
        fit_mode(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), len(sys.argv) > 6)
    elif mode == "group":
        group_mode(sys.argv[2], sys.argv[3])
    else:
        bn_mode(sys.argv[2])
