"""The GPU check: one prepared run of <= 8 minutes on one GPU that measures what docs/gpu.md and
docs/speed.md need, offline, installing nothing.

    python bench/gpu_check.py --omniglot DIR [--out results/bench] [--work DIR] [--budget-s 450]
    python bench/gpu_check.py --cpu-dry-run --omniglot DIR --out /tmp/x    # every section, tiny, on the CPU
    bash bench/gpu_check.sh ...                                            # the same, through the wrapper

Sections, in order (each records its own wall time; a section that would start past `--budget-s` is
skipped and says so):
1. doctor: `trainer doctor`'s screen.
2. data: the shard sets, built here from the Omniglot folder given (the GPU machine gets only the
   checkout: copy the two zips into a git-ignored folder such as `.device/omniglot`): bursty training
   sequences of configs/cpu.toml's data (p_bursty 0.9) and its fewshot_holdout (ICL) and
   no_support_zipfian (IWL) evaluation sets.
3. speed: ms/step of the paper model (12 layers, batch 32) at 28 and 105 px for each precision (float32,
   tf32, bfloat16): the train program `trainer fit` runs, batches already on the device, the first call
   (compiling) apart.
4. group: one run against a vectorized group of 8 seeds (`trainer.group`), their calls alternating.
5. determinism: XLA's deterministic GPU ops on (this process) and off (a fresh one): ms/step at 105 px,
   and whether two runs of the same steps from the same state give bitwise the same parameters and losses.
6. compile: two processes running the same short `fit` at 105 px, with an empty persistent compilation
   cache (cold) and then with the cache it filled (cached): programs lowered per name, backend
   compilations, seconds compiling. On the CPU the cache is off (docs/gpu.md), so both are cold.
7. curve: a 2,000-step `fit` at 28 px (12 layers, configs/cpu.toml's optimizer) with ICL and IWL
   evaluated every 250 steps.

Writes `OUT/gpu-<device>.json` (everything) and `OUT/gpu-<device>.md` (the tables); <device> is the
device kind in lower case (e.g. `gpu-nvidia-h100-80gb-hbm3`), `gpu-cpu-dry-run` for a dry run.
`--cpu-dry-run` runs every section at tiny sizes (a 1-layer model with a small ResNet, 16 px, batch 4,
a 12-step curve) on the CPU: tests/test_gpu_check.py runs it, so that the script cannot rot between GPU
sessions. It compiles about a dozen train and evaluation programs of the tiny model (4-10 s each on
this project's 2-core machine, most of the dry run's time).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqgen.config import SeqType, build_config_from_toml  # noqa: E402
from seqgen.configio import load_toml  # noqa: E402
from trainer.config import ComputeConfig, Precision, TrainConfig, train_config_from_toml  # noqa: E402
from trainer.models import ModelConfig  # noqa: E402

SECTIONS = ("doctor", "data", "speed", "group", "determinism", "compile", "curve")
CPU_PRESET = ROOT / "configs" / "cpu.toml"
CACHE_ENV = "EMERGENT_ICL_COMPILE_CACHE"


@dataclass(frozen=True)
class Scale:
    """Sizes of every section: the paper's (FULL) or tiny (DRY, for the CPU)."""

    model: ModelConfig = ModelConfig()  # the paper's: 12 layers, width 64, 8 heads, ResNet embedder
    image_sizes: tuple[int, ...] = (28, 105)
    batch: int = 32
    dispatch: int = 20  # steps per jitted call in the timing sections
    timed_calls: int = 5  # timed calls per measurement (after the first, compiling, call)
    group: int = 8
    big: int = 105  # the image size of the group, determinism and compile sections
    repeat_calls: int = 2  # calls run twice from one state by the determinism check
    curve_steps: int = 2000
    curve_size: int = 28
    curve_every: int = 250
    curve_log: int = 100
    curve_dispatch: int = 50
    eval_seqs: int = 512  # sequences per evaluation of the curve
    eval_batch: int = 256
    train_seqs: int = 80_000  # the training set: 2,000 steps x 32 without repeating a sequence
    eval_set_seqs: int = 1024


FULL = Scale()
DRY = Scale(model=ModelConfig(emb_dim=16, num_layers=1, num_heads=2, resnet_channels=(4, 8, 8),
                              resnet_blocks=(1, 1, 1, 1)),
            image_sizes=(16,), batch=4, dispatch=2, timed_calls=2, group=2, big=16, repeat_calls=2,
            curve_steps=12, curve_size=16, curve_every=6, curve_log=4, curve_dispatch=2, eval_seqs=16,
            eval_batch=16, train_seqs=2_000, eval_set_seqs=64)


def train_config(scale: Scale, image_size: int, *, seed: int = 0, precision: Precision = Precision.FLOAT32,
                 deterministic: bool = True, **training: Any) -> TrainConfig:
    """configs/cpu.toml's optimizer, the scale's model, batch and `image_size`."""
    base = train_config_from_toml(load_toml(CPU_PRESET))
    training = {"steps_per_dispatch": scale.dispatch, **training}
    t = replace(base.training, batch_size=scale.batch, image_size=image_size, seed=seed,
                eval_batch_size=scale.eval_batch, **training)
    return replace(base, model=scale.model, training=t,
                   compute=replace(base.compute, precision=precision, deterministic=deterministic)).validate()


# ================================================================ timing a train program


def _put(tree):
    """A (host) train state onto the default device, its Python bool leaves (the model's flags) kept static."""
    import equinox as eqx
    import jax

    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays), static)


def _host_batches(stream, k: int, runs: int | None = None) -> dict:
    """k batches stacked [K, ...], or [K, R, ...] for a group of `runs` runs."""
    import numpy as np

    if runs is None:
        local = [next(stream) for _ in range(k)]
        return {n: np.stack([b[n] for b in local]) for n in local[0]}
    local = [[next(stream) for _ in range(k)] for _ in range(runs)]
    return {n: np.stack([np.stack([b[n] for b in r]) for r in local], axis=1) for n in local[0][0]}


class Timed:
    """One train program (`trainer.step.make_train_step` or `trainer.group.make_group_step`) and its state,
    called on fresh batches; `call()` times one call of k steps (batches already on the device)."""

    def __init__(self, step: Callable, table, state, batches: Callable[[], dict], k: int) -> None:
        self.step, self.table, self.state, self.batches, self.k = step, table, state, batches, k
        self.times: list[float] = []

    def first(self) -> dict[str, Any]:
        import jax

        from trainer.runtime.platform import count_compilations

        with count_compilations() as c:
            t0 = time.perf_counter()
            self.state, m = self.step(self.table, self.state, self.batches(), self._n())
            jax.block_until_ready(m)
            first = time.perf_counter() - t0
        return {"first_call_s": round(first, 3), "compile_s": round(c.compile_s, 3), "compilations": c.compiled}

    def _n(self):
        import numpy as np

        return np.int32(self.k)

    def call(self) -> float:
        import jax

        b = self.batches()
        jax.block_until_ready(b)
        t0 = time.perf_counter()
        self.state, m = self.step(self.table, self.state, b, self._n())
        jax.block_until_ready(m)
        self.times.append((time.perf_counter() - t0) / self.k)
        return self.times[-1]

    def summary(self) -> dict[str, Any]:
        import numpy as np

        med = float(np.median(self.times))
        return {"ms_per_step": round(med * 1e3, 3), "ms_per_step_min": round(min(self.times) * 1e3, 3),
                "steps_per_s": round(1 / med, 2), "calls": len(self.times), "steps_per_call": self.k}


class Bench:
    """The training set, image tables and topology the timing sections share."""

    def __init__(self, scale: Scale, train_dir: Path, omniglot: str, cache_dir: str) -> None:
        from trainer.data import open_shard_set
        from trainer.runtime.distributed import make_topology

        self.scale, self.omniglot, self.cache_dir = scale, omniglot, cache_dir
        self.shards = open_shard_set(train_dir)
        self.topo = make_topology(1)
        self._tables: dict[int, Any] = {}
        self._steps: dict[TrainConfig, Callable] = {}  # one program per config: measured sections share it

    def table(self, size: int):
        from trainer.images import device_table

        if size not in self._tables:
            self._tables[size] = device_table(self.shards, size, self.topo, self.omniglot, self.cache_dir)
        return self._tables[size]

    def single(self, cfg: TrainConfig, stream) -> Timed:
        import jax

        from trainer.runtime.distributed import replicate
        from trainer.runtime.platform import resolve_compute
        from trainer.state import init_state
        from trainer.step import StepContext, make_train_step

        cfg = resolve_compute(cfg)
        key = replace(cfg, training=replace(cfg.training, seed=0))  # the program does not depend on the seed
        if key not in self._steps:
            self._steps[key] = make_train_step(StepContext.create(cfg, self.shards.config))
        step = self._steps[key]
        state = replicate(self.topo, init_state(cfg, self.shards.num_labels))
        k = cfg.training.steps_per_dispatch
        return Timed(step, self.table(cfg.training.image_size), state,
                     lambda: jax.device_put(_host_batches(stream, k)), k)

    def group(self, cfgs: list[TrainConfig], stream) -> Timed:
        import equinox as eqx
        import jax

        from trainer.group import make_group_step, stack_states
        from trainer.runtime.distributed import replicate
        from trainer.runtime.platform import resolve_compute
        from trainer.state import init_state
        from trainer.step import StepContext

        cfgs = [resolve_compute(c) for c in cfgs]
        step = make_group_step(StepContext.create(cfgs[0], self.shards.config))
        arrays, static = eqx.partition(stack_states([init_state(c, self.shards.num_labels) for c in cfgs]),
                                       eqx.is_array)
        k = cfgs[0].training.steps_per_dispatch
        return Timed(step, self.table(cfgs[0].training.image_size), eqx.combine(replicate(self.topo, arrays), static),
                     lambda: jax.device_put(_host_batches(stream, k, len(cfgs))), k)


# ================================================================ the sections


def section_doctor(ctx: "Check") -> dict[str, Any]:
    from trainer.runtime.platform import doctor_lines

    lines, ok = doctor_lines(TrainConfig())
    return {"lines": lines, "backend_starts": ok}


def section_data(ctx: "Check") -> dict[str, Any]:
    from seqgen.build import build

    base = build_config_from_toml(load_toml(CPU_PRESET))
    s = ctx.scale
    plan = {"bursty": (SeqType.BURSTY, s.train_seqs, 0), "fewshot_holdout": (SeqType.FEWSHOT_HOLDOUT, s.eval_set_seqs, 1),
            "no_support_zipfian": (SeqType.NO_SUPPORT_ZIPFIAN, s.eval_set_seqs, 2)}
    out = {}
    for name, (seq_type, n, seed) in plan.items():
        folder = ctx.sets / name
        cfg = replace(base, seq_type=seq_type, num_seqs=n, seed=seed, shard_size=min(n, 1 << 17))
        t0 = time.perf_counter()
        if not (folder / "manifest.json").is_file():
            build(cfg, folder, omniglot_dir=ctx.omniglot, cache_dir=ctx.cache_dir, progress=False)
        out[name] = {"sequences": n, "seconds": round(time.perf_counter() - t0, 2)}
    return out


def section_speed(ctx: "Check") -> dict[str, Any]:
    from trainer.data import BatchStream

    bench, s = ctx.bench(), ctx.scale
    rows = []
    with BatchStream(bench.shards, s.batch) as stream:
        for size in s.image_sizes:
            for p in Precision:
                if ctx.left() <= 0:
                    rows.append({"image_size": size, "precision": p.value, "skipped": "time budget"})
                    continue
                timed = bench.single(train_config(s, size, precision=p), stream)
                first = timed.first()
                for _ in range(s.timed_calls):
                    timed.call()
                rows.append({"image_size": size, "precision": p.value, **first, **timed.summary()})
                ctx.say(f"speed: {size} px {p.value}: {rows[-1]['ms_per_step']} ms/step")
                del timed
    return {"layers": s.model.num_layers, "batch": s.batch, "rows": rows}


def section_group(ctx: "Check") -> dict[str, Any]:
    from trainer.data import BatchStream

    bench, s = ctx.bench(), ctx.scale
    cfgs = [train_config(s, s.big, seed=seed) for seed in range(s.group)]
    with BatchStream(bench.shards, s.batch) as stream:
        one, many = bench.single(cfgs[0], stream), bench.group(cfgs, stream)
        first = {"single": one.first(), "group": many.first()}
        for _ in range(s.timed_calls):  # alternating: other load hits both alike
            one.call()
            many.call()
    single, group = one.summary(), many.summary()
    ratio = group["ms_per_step"] / single["ms_per_step"]
    return {"image_size": s.big, "runs": s.group, "first": first, "single": single, "group": group,
            "group_over_single": round(ratio, 3), "throughput_vs_one_at_a_time": round(s.group / ratio, 3),
            "runs_per_hour_500k": {"single": round(3600e3 / (single["ms_per_step"] * 500_000), 3),
                                   "group": round(s.group * 3600e3 / (group["ms_per_step"] * 500_000), 3)}}


def section_determinism(ctx: "Check") -> dict[str, Any]:
    # this process runs with XLA's deterministic GPU ops (the default); a fresh one without them
    return {"deterministic": determinism(ctx.scale, ctx.bench(), True),
            "non_deterministic": ctx.child("determinism", deterministic=False)}


def section_compile(ctx: "Check") -> dict[str, Any]:
    cache = ctx.work / "compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cold = ctx.child("compile", cache=str(cache), run=str(ctx.work / "compile-cold"))
    cached = ctx.child("compile", cache=str(cache), run=str(ctx.work / "compile-cached"))
    return {"cold": cold, "cached": cached}


def section_curve(ctx: "Check") -> dict[str, Any]:
    from trainer.fit import fit
    from trainer.metrics import column_of, metric_key_of
    from trainer.run import RunDir

    s = ctx.scale
    cfg = train_config(s, s.curve_size, steps=s.curve_steps, steps_per_dispatch=s.curve_dispatch,
                       log_every=s.curve_log, eval_every=s.curve_every, checkpoint_every=s.curve_steps,
                       eval_seqs=s.eval_seqs)
    run = ctx.work / "curve"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    fit(cfg, ctx.sets / "bursty", [ctx.sets / "fewshot_holdout", ctx.sets / "no_support_zipfian"], run,
        omniglot_dir=ctx.omniglot, cache_dir=ctx.cache_dir, progress=False)
    wall = time.perf_counter() - t0
    points: dict[int, dict[str, float]] = {}
    for r in RunDir(run).read_metrics():
        at = points.setdefault(r["step"], {"step": r["step"]})
        if r["kind"] == "eval":
            at[column_of(r["seq_type"])] = round(r["metrics"][metric_key_of(r["seq_type"])]["mean"], 4)
        elif r["kind"] == "train":
            at["loss"] = round(r["metrics"]["loss"], 4)
    return {"steps": s.curve_steps, "image_size": s.curve_size, "layers": s.model.num_layers, "seconds": round(wall, 1),
            "points": [points[k] for k in sorted(points)]}


RUN = {"doctor": section_doctor, "data": section_data, "speed": section_speed, "group": section_group,
       "determinism": section_determinism, "compile": section_compile, "curve": section_curve}


# ================================================================ the children (fresh processes)


def child_determinism(scale: Scale, args: dict[str, Any]) -> dict[str, Any]:
    return determinism(scale, Bench(scale, Path(args["sets"]) / "bursty", args["omniglot"], args["cache_dir"]),
                       args["deterministic"])


def determinism(scale: Scale, bench: Bench, deterministic: bool) -> dict[str, Any]:
    """ms/step in this process (XLA's deterministic GPU ops on or off, as it started), and two runs of the
    same calls from one state: bitwise the same?"""
    import jax
    import numpy as np

    from trainer.data import BatchStream
    from trainer.runtime.platform import deterministic_in_effect

    cfg = train_config(scale, scale.big, deterministic=deterministic)
    with BatchStream(bench.shards, scale.batch) as stream:
        fixed = [_host_batches(stream, scale.dispatch) for _ in range(scale.repeat_calls)]
        timed = bench.single(cfg, stream)
    start = jax.device_get(timed.state)

    def run_once() -> str:
        state, losses = _put(start), []
        for b in fixed:
            state, m = timed.step(timed.table, state, jax.device_put(b), np.int32(scale.dispatch))
            losses.append(np.asarray(m["loss"]))
        digest = hashlib.sha256()
        for leaf in jax.tree_util.tree_leaves(jax.device_get(state)) + losses:
            if hasattr(leaf, "dtype"):
                digest.update(np.ascontiguousarray(leaf).tobytes())
        return digest.hexdigest()

    first_digest = run_once()  # compiles
    same = run_once() == first_digest
    stream_cycle = iter(fixed * (scale.timed_calls + 1))
    timed.batches = lambda: jax.device_put(next(stream_cycle))
    timed.state = _put(start)
    for _ in range(scale.timed_calls):
        timed.call()
    return {"xla_deterministic_flag": deterministic_in_effect(), "bitwise_same_twice": same,
            "steps_compared": scale.repeat_calls * scale.dispatch, **timed.summary()}


def child_compile(scale: Scale, args: dict[str, Any]) -> dict[str, Any]:
    """A short fit at the big size: what it compiled, and how long that took."""
    import jax

    from trainer.fit import fit
    from trainer.runtime.platform import count_compilations

    cfg = train_config(scale, scale.big, steps=2 * scale.dispatch, log_every=scale.dispatch,
                       eval_every=2 * scale.dispatch, checkpoint_every=2 * scale.dispatch, eval_seqs=scale.eval_seqs)
    sets = Path(args["sets"])
    shutil.rmtree(args["run"], ignore_errors=True)
    t0 = time.perf_counter()
    with count_compilations() as c:
        fit(cfg, sets / "bursty", [sets / "fewshot_holdout"], args["run"], omniglot_dir=args["omniglot"],
            cache_dir=args["cache_dir"], progress=False)
    wall = time.perf_counter() - t0
    cache = jax.config.jax_compilation_cache_dir
    files = sum(1 for p in Path(cache).rglob("*") if p.is_file()) if cache and Path(cache).is_dir() else 0
    names = Counter(c.names)
    return {"cache": cache or None, "cache_files_after": files, "fit_s": round(wall, 2), "lowered": c.lowered,
            "backend_compiles": c.compiled, "compile_s": round(c.compile_s, 2),
            "train_programs": names.get("jit(step)", 0), "eval_programs": names.get("jit(evaluate)", 0),
            "programs": dict(names.most_common(8))}


CHILDREN = {"determinism": child_determinism, "compile": child_compile}


def child_main(name: str, scale: Scale, args: dict[str, Any]) -> None:
    from trainer.runtime.platform import start

    start(None, ComputeConfig(deterministic=args.get("deterministic", True)), warn=lambda w: print(w, file=sys.stderr))
    result = CHILDREN[name](scale, args)
    Path(args["result"]).write_text(json.dumps(result))


# ================================================================ the check


class Check:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.scale = DRY if opts.cpu_dry_run else FULL
        self.work = Path(opts.work)
        self.sets = self.work / ("sets-dry" if opts.cpu_dry_run else "sets")
        self.omniglot, self.cache_dir = str(opts.omniglot), str(opts.cache_dir or self.work / "cache")
        self.budget = opts.budget_s
        self.t0 = time.monotonic()
        self._bench: Bench | None = None

    def say(self, line: str) -> None:
        print(line, flush=True)

    def bench(self) -> Bench:
        if self._bench is None:
            self._bench = Bench(self.scale, self.sets / "bursty", self.omniglot, self.cache_dir)
        return self._bench

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0) if self.budget else float("inf")

    def child(self, name: str, **args: Any) -> dict[str, Any]:
        """Run `name` in a fresh process (XLA's flags and the compilation cache are read at start)."""
        result = self.work / f"child-{name}-{os.getpid()}.json"
        result.unlink(missing_ok=True)
        payload = {"sets": str(self.sets), "omniglot": self.omniglot, "cache_dir": self.cache_dir,
                   "result": str(result), **args}
        env = dict(os.environ)
        env["XLA_FLAGS"] = re.sub(r"--xla_gpu_deterministic_ops=\S+", "", env.get("XLA_FLAGS", "")).strip()
        if "cache" in args:
            env[CACHE_ENV] = args["cache"]
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-args", json.dumps(payload)]
        if self.opts.cpu_dry_run:
            cmd.append("--cpu-dry-run")
        timeout = max(60.0, min(600.0, self.left() + 60))
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0 or not result.is_file():
            raise RuntimeError(f"child {name} failed (exit {p.returncode}): {p.stderr.strip()[-1500:]}")
        out = json.loads(result.read_text())
        result.unlink()
        return {**out, "process_s": round(time.perf_counter() - t0, 2)}

    def run(self) -> dict[str, Any]:
        from trainer.runtime.platform import devices_summary

        report: dict[str, Any] = {"dry_run": self.opts.cpu_dry_run, "scale": dataclasses.asdict(self.scale),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "devices": devices_summary(),
                                  "sections": {}}
        for name in self.opts.sections:
            if self.left() <= 0:
                report["sections"][name] = {"skipped": f"time budget of {self.budget:g} s spent"}
                self.say(f"== {name}: skipped (time budget)")
                continue
            self.say(f"== {name}")
            t0 = time.perf_counter()
            try:
                out = RUN[name](self)
            except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' numbers
                out = {"error": f"{type(e).__name__}: {str(e).strip()[:2000]}"}
                self.say(f"{name} failed: {out['error']}")
            out["seconds"] = round(time.perf_counter() - t0, 1)
            report["sections"][name] = out
        report["total_s"] = round(time.monotonic() - self.t0, 1)
        return report


def device_slug(report: dict[str, Any]) -> str:
    if report["dry_run"]:
        return "cpu-dry-run"
    kind = report["devices"]["device_kind"] or report["devices"]["backend"]
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def markdown(report: dict[str, Any]) -> str:
    d, sec = report["devices"], report["sections"]
    out = [f"# GPU check: {d['device_count']} x {d['device_kind']} ({d['backend']})", "",
           f"{report['started']}; {'CPU dry run at tiny sizes: no figure here is a GPU figure; ' if report['dry_run'] else ''}"
           f"total {report['total_s']} s (`bench/gpu_check.py`; every number in gpu-{device_slug(report)}.json).", ""]

    def failed(name: str) -> bool:
        s = sec.get(name, {})
        if "error" in s or "skipped" in s:
            out.extend([f"## {name}", "", f"{s.get('error') or s.get('skipped')}", ""])
            return True
        return name not in sec

    if not failed("doctor"):
        out += ["## trainer doctor", "", "```", *sec["doctor"]["lines"], "```", ""]
    if not failed("speed"):
        s = sec["speed"]
        out += [f"## ms/step: {s['layers']} layers, batch {s['batch']}", "",
                "| px | precision | ms/step (median) | fastest | steps/s | first call s | compile s |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        out += [f"| {r['image_size']} | {r['precision']} | {r['ms_per_step']} | {r['ms_per_step_min']} | "
                f"{r['steps_per_s']} | {r['first_call_s']} | {r['compile_s']} |" if "skipped" not in r else
                f"| {r['image_size']} | {r['precision']} | skipped: {r['skipped']} | | | | |" for r in s["rows"]]
        out.append("")
    if not failed("group"):
        g = sec["group"]
        out += [f"## A group of {g['runs']} seeds against one run ({g['image_size']} px)", "",
                f"one run {g['single']['ms_per_step']} ms/step; group {g['group']['ms_per_step']} ms/step "
                f"({g['group_over_single']}x one run's step): {g['throughput_vs_one_at_a_time']}x the throughput "
                f"of one run at a time; runs/hour at 500k steps: {g['runs_per_hour_500k']['single']} alone, "
                f"{g['runs_per_hour_500k']['group']} as groups.", ""]
    if not failed("determinism"):
        out += ["## Deterministic GPU ops", "", "| XLA deterministic ops | ms/step | bitwise the same twice |",
                "| --- | --- | --- |"]
        for name, r in sec["determinism"].items():
            if name == "seconds":
                continue
            out.append(f"| {'on' if r['xla_deterministic_flag'] else 'off'} | {r['ms_per_step']} | "
                       f"{'yes' if r['bitwise_same_twice'] else 'no'} ({r['steps_compared']} steps) |")
        out.append("")
    if not failed("compile"):
        out += ["## Compilation (a short fit)", "",
                "| cache | programs lowered | train / eval programs | backend compilations | compiling s | fit s |",
                "| --- | --- | --- | --- | --- | --- |"]
        for name in ("cold", "cached"):
            r = sec["compile"][name]
            where = "off (CPU)" if r["cache"] is None else name
            out.append(f"| {where} | {r['lowered']} | {r['train_programs']} / {r['eval_programs']} | "
                       f"{r['backend_compiles']} | {r['compile_s']} | {r['fit_s']} |")
        out.append("")
    if not failed("curve"):
        c = sec["curve"]
        out += [f"## ICL curve: {c['steps']} steps at {c['image_size']} px, {c['layers']} layers ({c['seconds']} s)", "",
                "| step | loss | ICL | IWL |", "| --- | --- | --- | --- |"]
        out += [f"| {p['step']} | {p.get('loss', '')} | {p.get('icl', '')} | {p.get('iwl', '')} |" for p in c["points"]]
        out.append("")
    out += ["## Seconds per section", "", "| section | s |", "| --- | --- |"]
    out += [f"| {n} | {s.get('seconds', '-')} |" for n, s in sec.items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--omniglot", default=os.environ.get("OMNIGLOT_DIR", str(ROOT / ".device" / "omniglot")),
                    help="the Omniglot zips (default $OMNIGLOT_DIR, else .device/omniglot)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"), help="where gpu-<device>.json/.md go")
    ap.add_argument("--also", default=None, help="a second folder for the report (the device machine's $OUT)")
    ap.add_argument("--work", default=None, help="shard sets, runs, caches (default: a folder under /tmp)")
    ap.add_argument("--cache-dir", default=None, help="the Omniglot image-table cache (default: WORK/cache)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the sections that would start after this many seconds (default 450; none in a dry run)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--cpu-dry-run", action="store_true", help="every section at tiny sizes, on the CPU")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)
    scale = DRY if opts.cpu_dry_run else FULL
    if opts.cpu_dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if opts.child:
        child_main(opts.child, scale, json.loads(opts.child_args))
        return 0
    opts.sections = [s.strip() for s in opts.sections.split(",") if s.strip()]
    unknown = [s for s in opts.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not any((Path(opts.omniglot) / f).exists() for f in ("images_background.zip", "images_background")):
        ap.error(f"no Omniglot in {opts.omniglot}: copy images_background.zip and images_evaluation.zip there "
                 "(a git-ignored folder such as .device/omniglot) or pass --omniglot DIR")
    opts.work = opts.work or f"/tmp/emergent-icl-gpu-check{'-dry' if opts.cpu_dry_run else ''}"
    opts.budget_s = opts.budget_s if opts.budget_s is not None else (0.0 if opts.cpu_dry_run else 450.0)
    Path(opts.work).mkdir(parents=True, exist_ok=True)
    # this process's compiled programs go to a cache of its own (the compile section measures a fresh one)
    os.environ.setdefault(CACHE_ENV, str(Path(opts.work) / "jax-cache"))
    from trainer.runtime.platform import start

    start(None, ComputeConfig(), warn=lambda w: print(w, file=sys.stderr))
    report = Check(opts).run()
    out = Path(opts.out)
    for folder in [out] + ([Path(opts.also)] if opts.also else []):
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"gpu-{device_slug(report)}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {stem}.json and {stem}.md ({report['total_s']} s)")
    failed = [n for n, s in report["sections"].items() if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
