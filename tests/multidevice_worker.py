"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (see test_multidevice.py).

Modes:
  fit ROOT RUN DEVICES STEPS [resume]  train the tiny symbolic model on DEVICES simulated CPU devices
  bn OUT                               ResNet BatchNorm on a batch sharded over 4 devices vs 1 device
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


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "fit":
        fit_mode(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), len(sys.argv) > 6)
    else:
        bn_mode(sys.argv[2])
