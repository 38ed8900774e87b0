"""Sweep throughput on this machine: runs per hour for 3 seeds of `configs/cpu.toml`, three ways.

    python bench/sweep_bench.py [--steps 100] [--rounds 2] [--config configs/cpu.toml] [--omniglot DIR]

- sequential: one process trains the seeds one after another (what `trainer sweep` did), all cores;
- vectorized: one process trains the seeds as ONE group (`trainer.group`: the step vmapped over runs);
- parallel: 2 processes at once, each pinned to one core (`os.sched_setaffinity` before jax is imported,
  what `taskset -c N` does), the seeds dealt out to them as `trainer sweep --jobs 2` would (2 + 1).
Each mode's worker compiles first (timed and reported separately, excluded from runs/hour), then trains
`--steps` steps per run on a bursty shard set of the config's data built from the real Omniglot; runs/hour
= runs / training seconds * 3600, extrapolated to the config's full run length (`training.steps`) too. For
the parallel mode both workers start training together (after both compiled) and the wall time is the
slower one's; "steady" adds the two workers' steps/s (each always busy, as in a long sweep).
The modes are measured in the same invocation, in `--rounds` rounds with the order rotated, medians
printed: other tenants of this shared machine (a background training sweep) slow all modes alike only on
average, so compare ratios within one invocation. The workers also print the threads and the CPU-seconds
per wall-second they used, which shows how many cores a pinned worker really uses.
Like the `trainer` command, workers run with huge-page malloc (trainer/runtime/hugepages.py); they share a JAX
compilation cache in the bench's temporary folder, so a later worker's "compile" may be a cache load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---- the worker (a separate process per mode, so that each compiles and runs as a fresh `trainer`) -----
def worker(args: argparse.Namespace) -> None:
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})  # before jax starts its thread pools
    import equinox as eqx
    import jax
    import numpy as np

    from seqgen.configio import load_toml
    from trainer.config import train_config_from_toml, with_overrides
    from trainer.data import BatchStream, open_shard_set
    from trainer.runtime.distributed import make_topology, replicate
    from trainer.group import make_group_step, stack_states
    from trainer.images import device_table
    from trainer.state import init_state
    from trainer.step import StepContext, make_train_step

    seeds = [int(s) for s in args.seeds.split(",")]
    base = train_config_from_toml(load_toml(args.config))
    cfgs = [with_overrides(base, {"training.seed": s}).validate() for s in seeds]
    k = cfgs[0].training.steps_per_dispatch
    shards = open_shard_set(args.train)
    topo = make_topology(1)
    table = device_table(shards, cfgs[0].training.image_size, topo, args.omniglot, args.cache_dir)
    ctx = StepContext.create(cfgs[0], shards.config)
    vectorized = args.worker == "vectorized"
    step = make_group_step(ctx) if vectorized else make_train_step(ctx)

    def fresh():
        states = [init_state(c, shards.num_labels) for c in cfgs]
        if vectorized:
            arrays, static = eqx.partition(stack_states(states), eqx.is_array)
            return [eqx.combine(replicate(topo, arrays), static)]
        return [replicate(topo, s) for s in states]

    def batches(stream_list):
        local = [[next(s) for _ in range(k)] for s in stream_list]
        if vectorized:
            return {n: np.stack([np.stack([b[n] for b in r]) for r in local], axis=1) for n in local[0][0]}
        return {n: np.stack([b[n] for b in local[0]]) for n in local[0][0]}

    t0 = time.perf_counter()
    states = fresh()
    with BatchStream(shards, cfgs[0].training.batch_size) as s:
        streams = [s] * (len(seeds) if vectorized else 1)
        out = step(table, states[0], batches(streams), np.int32(k))
        jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    del out
    states = fresh()
    Path(args.ready).touch()
    while not Path(args.go).exists():  # the parent starts all workers of a mode together
        time.sleep(0.01)
    cpu0, t0 = os.times(), time.perf_counter()
    runs = [states[0]] if vectorized else states
    for r, state in enumerate(runs):
        members = range(len(seeds)) if vectorized else [r]
        streams = [BatchStream(shards, cfgs[0].training.batch_size, start_step=args.steps * i) for i in members]
        try:
            for _ in range(args.steps // k):
                state, m = step(table, state, batches(streams), np.int32(k))
            jax.block_until_ready(m)
        finally:
            for s in streams:
                s.close()
    wall = time.perf_counter() - t0
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    print(json.dumps({"mode": args.worker, "runs": len(seeds), "steps": args.steps // k * k, "train_s": wall,
                      "compile_s": compile_s, "cpu_per_wall": cpu / wall,
                      "threads": len(os.listdir("/proc/self/task")), "cpus": sorted(os.sched_getaffinity(0))}))


# ---- the parent ---------------------------------------------------------------------------------------
def _spawn(mode: str, seeds: list[int], cpus: str, args: argparse.Namespace, tmp: Path, tag: str):
    ready, go = tmp / f"{tag}.ready", tmp / f"{tag}.go"
    cmd = [sys.executable, __file__, "--worker", mode, "--seeds", ",".join(map(str, seeds)), "--steps",
           str(args.steps), "--config", args.config, "--train", str(tmp / "bursty"), "--omniglot", args.omniglot,
           "--cache-dir", args.cache_dir, "--ready", str(ready), "--go", str(go)]
    if cpus:
        cmd += ["--cpus", cpus]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    from trainer.runtime.hugepages import TUNABLE

    env.setdefault("GLIBC_TUNABLES", f"{TUNABLE}=1")
    # Workers of the same program reuse one compilation (compile time is excluded from runs/hour anyway;
    # this only shortens the bench on a busy machine).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp / "jax-cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True), ready, go


def run_mode(mode: str, args: argparse.Namespace, tmp: Path, tag: str) -> dict:
    seeds = list(range(args.seeds))
    if mode == "parallel":
        ncpu = len(os.sched_getaffinity(0))
        cores = sorted(os.sched_getaffinity(0))
        plan = [(seeds[j::2], str(cores[j % ncpu])) for j in range(2)]
        procs = [_spawn("sequential", s, c, args, tmp, f"{tag}-{j}") for j, (s, c) in enumerate(plan)]
    else:
        procs = [_spawn(mode, seeds, "", args, tmp, tag)]
    while not all(r.exists() or p.poll() is not None for p, r, _ in procs):
        time.sleep(0.05)
    for _, _, go in procs:
        go.touch()
    results = []
    for p, _, _ in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"error: the {mode} worker failed (exit {p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    runs = sum(r["runs"] for r in results)
    wall = max(r["train_s"] for r in results)
    steady = sum(r["runs"] * r["steps"] / r["train_s"] for r in results) / results[0]["steps"]  # runs/s
    return {"runs_per_h": runs / wall * 3600, "steady_runs_per_h": steady * 3600,
            "compile_s": max(r["compile_s"] for r in results), "workers": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="training steps per run (a multiple of steps_per_dispatch)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu.toml"))
    ap.add_argument("--modes", default="sequential,vectorized,parallel")
    ap.add_argument("--omniglot", default=os.environ.get("OMNIGLOT_DIR", str(ROOT.parent / "shared" / "omniglot")))
    ap.add_argument("--cache-dir", default="data/cache")
    if "--worker" in sys.argv:  # internal: one worker process (see _spawn)
        wp = argparse.ArgumentParser()
        for name in ("--worker", "--seeds", "--config", "--train", "--omniglot", "--cache-dir", "--ready", "--go",
                     "--cpus"):
            wp.add_argument(name)
        wp.add_argument("--steps", type=int)
        return worker(wp.parse_args())
    args = ap.parse_args()

    from dataclasses import replace

    from seqgen.build import build
    from seqgen.config import build_config_from_toml
    from seqgen.configio import load_toml
    from trainer.config import train_config_from_toml

    data = load_toml(args.config)
    full_steps = train_config_from_toml(data).training.steps
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        batch = train_config_from_toml(data).training.batch_size
        num = max(4096, args.seeds * args.steps * batch)
        build(replace(build_config_from_toml(data), num_seqs=num, shard_size=num), tmp / "bursty",
              omniglot_dir=args.omniglot, cache_dir=args.cache_dir, progress=False)
        measured: dict[str, list[dict]] = {m: [] for m in modes}
        for rnd in range(args.rounds):
            order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
            for mode in order:
                res = run_mode(mode, args, tmp, f"r{rnd}-{mode}")
                measured[mode].append(res)
                w = "; ".join(f"cpus {x['cpus']} threads {x['threads']} cpu/wall {x['cpu_per_wall']:.2f}"
                              for x in res["workers"])
                print(f"round {rnd} {mode:10s}: {res['runs_per_h']:7.1f} runs/h of {args.steps} steps "
                      f"(steady {res['steady_runs_per_h']:.1f}), compile {res['compile_s']:.1f} s  [{w}]", flush=True)

    import numpy as np

    med = {m: float(np.median([r["runs_per_h"] for r in v])) for m, v in measured.items()}
    steady = {m: float(np.median([r["steady_runs_per_h"] for r in v])) for m, v in measured.items()}
    comp = {m: float(np.median([r["compile_s"] for r in v])) for m, v in measured.items()}
    print(f"\n{args.seeds} seeds of {Path(args.config).name}, {args.steps} steps per run, {args.rounds} rounds, "
          f"{len(os.sched_getaffinity(0))} cpus (shared machine: other tenants add noise to every mode)")
    base = med.get("sequential")
    for m in modes:
        ratio = f"{med[m] / base:.2f}x sequential" if base else ""
        print(f"{m:10s}: {med[m]:8.1f} runs/h of {args.steps} steps = {med[m] * args.steps / full_steps:6.2f} full "
              f"{full_steps}-step runs/h; steady {steady[m]:.1f}; compile {comp[m]:.1f} s (excluded)  {ratio}")
    if base:
        print("ratios (medians): " + ", ".join(f"{m}/sequential {med[m] / base:.2f}x" for m in modes if m != "sequential"))


if __name__ == "__main__":
    main()
