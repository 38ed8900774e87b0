"""Step time of one run against a vectorized group of G runs (trainer.group), in the same process.

    python bench/group_bench.py [--group 8] [--image-size 105] [--layers 12] [--batch 32] [--steps 100]
                                [--steps-per-dispatch 50] [--full-steps 500000] [--omniglot DIR]

Both are compiled first (compile times printed), then their jitted calls alternate (one call of K steps
each, `--steps` steps in all per mode) so that other tenants' noise hits both alike. Prints ms/step of one
run and of the group (median over calls), the group's step time as a multiple of one run's, and runs per
hour at `--full-steps` steps per run (the paper's 500k by default) for one run at a time and for the group.
The kernel path is the platform's default (trainer/models/kernels.py; EMERGENT_ICL_KERNELS overrides it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqgen.build import build  # noqa: E402
from seqgen.config import BuildConfig  # noqa: E402
from trainer.config import TrainConfig, TrainingConfig  # noqa: E402
from trainer.data import BatchStream, open_shard_set  # noqa: E402
from trainer.runtime.distributed import make_topology, replicate  # noqa: E402
from trainer.group import make_group_step, stack_states  # noqa: E402
from trainer.runtime.hugepages import reexec_with_hugepages  # noqa: E402
from trainer.models import ModelConfig  # noqa: E402
from trainer.models.kernels import kernel_path  # noqa: E402
from trainer.images import device_table  # noqa: E402
from trainer.state import init_state  # noqa: E402
from trainer.step import StepContext, make_train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=105)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--steps-per-dispatch", type=int, default=50)
    ap.add_argument("--full-steps", type=int, default=500_000)
    ap.add_argument("--num-seqs", type=int, default=20_000)
    ap.add_argument("--omniglot", default=os.environ.get("OMNIGLOT_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "omniglot")))
    ap.add_argument("--cache-dir", default="data/cache")
    args = ap.parse_args()
    k, g = args.steps_per_dispatch, args.group
    calls = max(1, args.steps // k)
    with tempfile.TemporaryDirectory() as tmp:
        set_dir = Path(tmp) / "bursty"
        build(BuildConfig(num_seqs=args.num_seqs, shard_size=args.num_seqs), set_dir, omniglot_dir=args.omniglot,
              cache_dir=args.cache_dir, progress=False)
        shards = open_shard_set(set_dir)
        topo = make_topology(1)
        table = device_table(shards, args.image_size, topo, args.omniglot, args.cache_dir)
        cfgs = [TrainConfig(model=ModelConfig(num_layers=args.layers),
                            training=TrainingConfig(batch_size=args.batch, image_size=args.image_size, seed=s)).validate()
                for s in range(g)]
        ctx = StepContext.create(cfgs[0], shards.config)
        single, group = make_train_step(ctx), make_group_step(ctx)
        state = replicate(topo, init_state(cfgs[0], shards.num_labels))
        arrays, static = eqx.partition(stack_states([init_state(c, shards.num_labels) for c in cfgs]), eqx.is_array)
        states = eqx.combine(replicate(topo, arrays), static)
        with BatchStream(shards, args.batch) as stream:
            def host(n_runs):
                local = [[next(stream) for _ in range(k)] for _ in range(n_runs)]
                if n_runs == 1:
                    return jax.device_put({n: np.stack([b[n] for b in local[0]]) for n in local[0][0]})
                return jax.device_put({n: np.stack([np.stack([b[n] for b in r]) for r in local], axis=1)
                                       for n in local[0][0]})

            compile_s = {}
            for name, fn in (("single", single), ("group", group)):
                t0 = time.perf_counter()
                if name == "single":
                    state, m = fn(table, state, host(1), np.int32(k))
                else:
                    states, m = fn(table, states, host(g), np.int32(k))
                jax.block_until_ready(m)
                compile_s[name] = time.perf_counter() - t0
            times: dict[str, list[float]] = {"single": [], "group": []}
            for _ in range(calls):
                b1, bg = host(1), host(g)
                t0 = time.perf_counter()
                state, m = single(table, state, b1, np.int32(k))
                jax.block_until_ready(m)
                times["single"].append((time.perf_counter() - t0) / k)
                t0 = time.perf_counter()
                states, m = group(table, states, bg, np.int32(k))
                jax.block_until_ready(m)
                times["group"].append((time.perf_counter() - t0) / k)
    one, grp = (float(np.median(times[n])) for n in ("single", "group"))
    print(f"paper model: {args.layers} layers, {args.image_size} px, batch {args.batch}; backend "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}), kernel path {kernel_path()}, "
          f"{k} steps/dispatch, {calls} calls each")
    print(f"compile: single {compile_s['single']:.1f} s, group of {g} {compile_s['group']:.1f} s")
    print(f"single run:     {one * 1e3:8.2f} ms/step (median; fastest {min(times['single']) * 1e3:.2f})  "
          f"-> {3600 / (one * args.full_steps):.3f} runs/h of {args.full_steps} steps")
    print(f"group of {g:3d}:   {grp * 1e3:8.2f} ms/step (median; fastest {min(times['group']) * 1e3:.2f})  "
          f"-> {g * 3600 / (grp * args.full_steps):.3f} runs/h of {args.full_steps} steps")
    print(f"group step / single step: {grp / one:.2f}x for {g} runs; throughput {g * one / grp:.2f}x one run at a time")


if __name__ == "__main__":
    reexec_with_hugepages()
    main()
