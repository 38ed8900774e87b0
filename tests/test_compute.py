"""The GPU path, checked on the CPU (docs/gpu.md): one compiled train program per run whatever its schedules;
precision, kernel path and layer loop as recorded settings, applied while tracing; both kernel paths and
both layer loops through fit, a group, evaluate and a bitwise resume; the platform said and refused."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from tests.trainkit import GROUP_ADAM_EPS, GROUP_ATOL, GROUP_RTOL, paper_like_sets, tiny_config
from trainer import checkpoint
from trainer.cli import main
from trainer.config import ComputeConfig, CpuIsa, KernelPath, LayerLoop, Precision, ScheduleKind, TrainConfig
from trainer.evaluate import evaluate_run
from trainer.fit import fit
from trainer.group import fit_group
from trainer.run import RunDir
from trainer.runtime import platform
from trainer.runtime.distributed import make_topology
from trainer.runtime.platform import count_compilations, resolve_compute
from trainer.state import load_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return paper_like_sets(tmp_path_factory.mktemp("compute-sets"), train_seqs=512)


def _with(cfg: TrainConfig, **compute) -> TrainConfig:
    return dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, **compute)).validate()


def _arrays(run_dir, cfg, step: int) -> list[np.ndarray]:
    state = load_state(run_dir, step, resolve_compute(cfg), _num_labels(run_dir, step))
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape")]


def _num_labels(run_dir, step: int) -> int:
    return int(checkpoint.read_metadata(run_dir, step)["num_classes"])


def _train_losses(run_dir) -> list[float]:
    return [r["metrics"]["loss"] for r in map(json.loads, (RunDir(run_dir).metrics_path).read_text().splitlines())
            if r.get("kind") == "train"]


# ---- one compilation per program -------------------------------------------------------------------------
def test_one_train_program_whatever_the_schedules(sets, tmp_path):
    """Every dispatch of a run is one program (steps_per_dispatch padded batches, a dynamic trip count):
    a log or listed schedule, whose boundaries cut dispatches to every length, compiles what `every` does."""
    train, icl, iwl = sets
    fit(tiny_config(steps=8, steps_per_dispatch=8), train, [icl, iwl], tmp_path / "warm", progress=False)
    schedules = {
        "every": {},
        "log": dict(eval_schedule=ScheduleKind.LOG, checkpoint_schedule=ScheduleKind.LOG),
        "list": dict(eval_schedule=ScheduleKind.LIST, eval_steps=(3, 7, 11, 29), log_every=7,
                     checkpoint_schedule=ScheduleKind.LIST, checkpoint_steps=(5, 13)),
    }
    lowered = {}
    for name, opts in schedules.items():
        with count_compilations() as c:
            fit(tiny_config(steps=40, steps_per_dispatch=8, **opts), train, [icl, iwl], tmp_path / name,
                progress=False)
        assert c.of("jit(step)") == 1, (name, c.names)
        lowered[name] = c.lowered
    assert lowered["every"] == lowered["log"] == lowered["list"], lowered
    # a resume and a group compile their one train program once too
    log = tiny_config(steps=60, steps_per_dispatch=8, **schedules["log"])
    with count_compilations() as c:
        fit(log, train, [icl, iwl], tmp_path / "log", resume=True, progress=False)
    assert c.of("jit(step)") == 1, c.names
    cfgs = [dataclasses.replace(log, training=dataclasses.replace(log.training, seed=s)) for s in (0, 1)]
    with count_compilations() as c:
        fit_group(cfgs, [train, train], [[icl], [icl]], [tmp_path / "g0", tmp_path / "g1"], progress=False)
    assert c.of("jit(step)") == 1, c.names


def test_count_compilations_sees_each_new_shape():
    f = jax.jit(lambda x: x * 2)
    with count_compilations() as c:
        f(np.zeros(3, np.float32))
        f(np.ones(3, np.float32))  # same shape: no new program
        f(np.zeros(4, np.float32))
    assert c.lowered == 2 and c.of("jit(<lambda>)") == 2


# ---- the settings, recorded and applied --------------------------------------------------------------------
def test_a_fresh_run_records_how_and_where_it_computed(sets, tmp_path):
    train, icl, _ = sets
    fit(tiny_config(steps=4), train, [icl], tmp_path / "run", progress=False)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["trainer"]["compute"] == {"precision": "float32", "kernels": "custom", "layer_loop": "unroll",
                                            "deterministic": True, "cpu_isa": "native"}  # "auto" resolved here
    assert stored["platform"]["backend"] == "cpu" and stored["platform"]["device_count"] >= 1
    assert stored["platform"]["cpu_isa"] == "native"
    assert stored["platform"]["cpu"] == platform.cpu_model()


def test_precision_bounds_and_dtypes(sets, tmp_path):
    """tf32 is float32 on the CPU (no TensorFloat-32 there); bfloat16 computes in bfloat16 (losses differ
    from float32, by little over a few steps) and keeps float32 parameters and optimizer state."""
    train, icl, _ = sets
    base = tiny_config(steps=10, steps_per_dispatch=5)
    losses = {}
    for p in Precision:
        cfg = _with(base, precision=p)
        fit(cfg, train, [icl], tmp_path / p.value, progress=False)
        losses[p] = np.asarray(_train_losses(tmp_path / p.value))
    assert np.array_equal(losses[Precision.TF32], losses[Precision.FLOAT32])
    diff = np.abs(losses[Precision.BFLOAT16] - losses[Precision.FLOAT32])
    assert diff.max() > 0, "bfloat16 computed in float32"
    assert diff.max() < 0.05 * losses[Precision.FLOAT32].max(), (losses, diff)
    state = load_state(tmp_path / "bfloat16", 10, resolve_compute(_with(base, precision=Precision.BFLOAT16)),
                       _num_labels(tmp_path / "bfloat16", 10))
    floats = [x for x in jax.tree_util.tree_leaves(state) if hasattr(x, "dtype") and np.issubdtype(x.dtype, np.floating)]
    assert floats and all(x.dtype == np.float32 for x in floats)


def test_bfloat16_trains_the_resnet_and_keeps_its_batchnorm_statistics_float32(sets, monkeypatch):
    """bfloat16 through the ResNet embedder (BatchNorm statistics: an eqx.nn.State, which `forward`
    consumes; before issue 28 the cast back to float32 reused it and failed). Random images per symbol."""
    import jax.random as jr

    from trainer.config import TrainingConfig
    from trainer.data import BatchStream, open_shard_set
    from trainer.models import ExampleEncoding, ModelConfig
    from trainer.state import init_state
    import trainer.step
    from trainer.step import StepContext, make_train_step

    train, _, _ = sets
    shards = open_shard_set(train)
    model = ModelConfig(example_encoding=ExampleEncoding.RESNET, emb_dim=16, num_layers=1, num_heads=2,
                        resnet_channels=(4, 8, 8), resnet_blocks=(1, 1, 1, 1))
    states = {}
    # the trainer's input maker, replaced at this test's edge: random images per symbol
    monkeypatch.setattr(trainer.step, "examples_for", lambda cfg: lambda table, batch, set_cfg: table[batch["example"]])
    for p in (Precision.FLOAT32, Precision.BFLOAT16):
        cfg = TrainConfig(model=model, training=TrainingConfig(batch_size=4, image_size=16),
                          compute=ComputeConfig(precision=p)).validate()
        step = make_train_step(StepContext.create(cfg, shards.config))
        table = jr.uniform(jr.PRNGKey(0), (shards.num_labels + 10, 16, 16, 1))
        with BatchStream(shards, 4) as stream:
            batches = {n: np.stack([b[n] for b in [next(stream), next(stream)]]) for n in ("example", "label")}
        states[p], metrics = step(table, init_state(cfg, shards.num_labels), batches, np.int32(2))
        assert np.all(np.isfinite(np.asarray(metrics["loss"])))
    stats = {p: jax.tree_util.tree_leaves(s.bn_state) for p, s in states.items()}
    assert [x.dtype for x in stats[Precision.BFLOAT16]] == [x.dtype for x in stats[Precision.FLOAT32]]
    assert any(x.dtype == np.float32 for x in stats[Precision.BFLOAT16])
    for x, y in zip(stats[Precision.BFLOAT16], stats[Precision.FLOAT32], strict=True):
        np.testing.assert_allclose(x, y, rtol=0.05, atol=0.05)  # the same statistics, up to bfloat16's precision


def test_precision_is_applied_to_every_matmul_while_tracing():
    from trainer.runtime.platform import computing

    def f(a, b):
        return a @ b

    x = np.ones((4, 4), np.float32)
    # jax's names: "highest" is Precision.HIGHEST (full float32), "tensorfloat32" is Precision.HIGH
    for p, want in ((Precision.FLOAT32, "Precision.HIGHEST, Precision.HIGHEST"),
                    (Precision.TF32, "Precision.HIGH, Precision.HIGH)")):
        with computing(ComputeConfig(precision=p)):
            text = str(jax.make_jaxpr(f)(x, x))
        assert want in text, text


def test_resume_refuses_another_precision(sets, tmp_path):
    train, icl, _ = sets
    run = tmp_path / "run"
    args = ["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run), "--steps", "4",
            "--batch-size", "16", "--num-layers", "1", "--emb-dim", "16", "--num-heads", "2", "--eval-every", "4",
            "--checkpoint-every", "2", "--log-every", "2", "--no-progress"]
    r = CliRunner().invoke(main, args + ["--example-encoding", "embedding"])
    assert r.exit_code == 0, r.output
    start = [l for l in r.output.splitlines() if l.startswith("device: ")]
    assert start == ["device: cpu (1 x cpu); precision float32, kernels custom, layer loop unroll, deterministic"], \
        r.output
    # then how long the train program took to compile, and whether a persistent cache served it (a GPU's)
    compiled = [l for l in r.output.splitlines() if l.startswith("compiled: ")]
    assert len(compiled) == 1 and compiled[0].endswith("s (no persistent cache)"), r.output
    assert float(compiled[0].split(" in ")[1].split(" s ")[0]) > 0
    r = CliRunner().invoke(main, ["fit", "--train", str(train), "--run-dir", str(run), "--resume", "--precision",
                                  "bfloat16"])
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "--precision is 'float32'" in lines[0] and "'bfloat16' here" in lines[0]


@pytest.mark.parametrize("kernels,loop", [("custom", "unroll"), ("custom", "scan"), ("xla", "unroll"),
                                          ("xla", "scan")])
def test_both_kernel_paths_and_layer_loops_fit_group_evaluate_and_resume(sets, tmp_path, kernels, loop):
    """The GPU's kernel path (xla) and the scan layer loop through every way a run is trained or read."""
    train, icl, iwl = sets
    base = tiny_config(steps=8, steps_per_dispatch=4, eval_every=8, checkpoint_every=4)
    base = dataclasses.replace(base, optimizer=dataclasses.replace(base.optimizer, eps=GROUP_ADAM_EPS))
    cfg = _with(base, kernels=KernelPath(kernels), layer_loop=LayerLoop(loop))
    whole, part = tmp_path / "whole", tmp_path / "part"
    fit(cfg, train, [icl, iwl], whole, progress=False)
    stored = RunDir(whole).read()["trainer"]["compute"]
    assert (stored["kernels"], stored["layer_loop"]) == (kernels, loop)
    # a bitwise resume
    short = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, steps=4))
    fit(short, train, [icl, iwl], part, progress=False)
    fit(cfg, train, [icl, iwl], part, resume=True, progress=False)
    a, b = (_arrays(d, cfg, 8) for d in (whole, part))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # evaluate gives fit's numbers
    fit_eval = {e.set: e.metrics for e in RunDir(whole).evaluations() if e.step == 8 and e.source == "fit"}
    results = evaluate_run(whole, [icl, iwl], step=8, train_dir=None, max_seqs=cfg.training.eval_seqs,
                           batch_size=cfg.training.eval_batch_size, omniglot_dir=None, cache_dir=None,
                           topo=make_topology(), echo=lambda _: None)
    for name, _, summary in results:
        assert summary["accuracy_query"]["mean"] == fit_eval[name]["accuracy_query"]["mean"]
    # a group trains with this compute too, and its seed-0 run is the run alone up to float32 round-off
    seeds = [dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seed=s)) for s in (0, 1)]
    fit_group(seeds, [train, train], [[icl, iwl], [icl, iwl]], [tmp_path / "g0", tmp_path / "g1"], progress=False)
    assert RunDir(tmp_path / "g0").read()["trainer"]["compute"] == stored
    for x, y in zip(_arrays(tmp_path / "g0", cfg, 8), a):
        np.testing.assert_allclose(x, y, rtol=GROUP_RTOL, atol=GROUP_ATOL)


# ---- the platform, said and refused ------------------------------------------------------------------------
def _trainer(*args, env=None):
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, cwd=ROOT,
                          env=full, timeout=300)


def test_a_gpu_that_cannot_be_had_is_one_line(tmp_path):
    for env, extra in (({"JAX_PLATFORMS": "cuda"}, []), ({}, ["--platform", "gpu"])):
        p = _trainer("fit", "--train", str(tmp_path / "x"), "--run-dir", str(tmp_path / "r"), *extra, env=env)
        lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stdout + p.stderr
        assert lines[0].startswith("error: a GPU was asked for") and '".[cuda12]"' in lines[0]
        assert "--platform cpu" in lines[0] and "Traceback" not in p.stderr


def test_doctor(tmp_path):
    r = CliRunner().invoke(main, ["doctor", "--kernels", "xla", "--precision", "tf32"])
    assert r.exit_code == 0, r.output
    assert f"jax {jax.__version__}" in r.output and "backend: cpu; devices: " in r.output
    assert "precision tf32, kernels xla, layer loop unroll" in r.output and "compilation cache: " in r.output
    p = _trainer("doctor", "--platform", "gpu")
    assert p.returncode == 1 and "backend: cannot start: a GPU was asked for" in p.stdout, p.stdout + p.stderr


def test_deterministic_gpu_ops_by_default_and_opt_out():
    code = ("import os; from trainer.config import ComputeConfig; from trainer.runtime.platform import prepare; "
            "prepare(None, ComputeConfig(deterministic={d})); print(os.environ.get('XLA_FLAGS', ''))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for d, want in ((True, True), (False, False)):
        p = subprocess.run([sys.executable, "-c", code.format(d=d)], capture_output=True, text=True, cwd=ROOT,
                           env=env, timeout=120)
        assert p.returncode == 0, p.stderr
        assert ("--xla_gpu_deterministic_ops=true" in p.stdout) == want, p.stdout


def test_a_gpu_present_but_unused_is_warned_with_the_fix(monkeypatch):
    monkeypatch.setattr(platform, "gpu_visible", lambda: True)
    monkeypatch.setattr(platform, "cuda_plugin", lambda: None)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    warning = platform.gpu_unused_warning()
    assert warning and 'pip install -e ".[cuda12]"' in warning and "runs on the CPU" in warning
    monkeypatch.setattr(platform, "gpu_visible", lambda: False)
    assert platform.gpu_unused_warning() is None


def test_the_compile_line_names_the_cache_that_served_it(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "c"))
        assert platform.compile_line(12.34) == f"compiled: the train program in 12.3 s (persistent cache {tmp_path / 'c'})"
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert platform.compile_line(0.5) == "compiled: the train program in 0.5 s (no persistent cache)"


def test_compile_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(platform.CACHE_ENV, "off")
    assert platform.compile_cache_dir() is None
    monkeypatch.setenv(platform.CACHE_ENV, str(tmp_path / "c"))
    assert platform.compile_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(platform.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert platform.compile_cache_dir() == tmp_path / "xdg" / "emergent-icl" / "jax"


def test_the_compile_cache_is_on_for_a_gpu_and_never_on_the_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv(platform.CACHE_ENV, str(tmp_path / "c"))
    before = jax.config.jax_compilation_cache_dir
    assert platform.enable_compile_cache() is None and jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    try:
        assert platform.enable_compile_cache() == tmp_path / "c" and (tmp_path / "c").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


# ---- the CPU instruction-set cap ----------------------------------------------------------------------------
TINY_CLI = ["--steps", "4", "--batch-size", "8", "--log-every", "2", "--eval-every", "4", "--checkpoint-every", "2",
            "--eval-seqs", "16", "--num-layers", "1", "--num-heads", "2", "--emb-dim", "16",
            "--example-encoding", "embedding", "--no-progress"]


def test_a_cpu_isa_cap_is_set_before_jax_starts_recorded_and_kept_on_resume(sets, tmp_path):
    """XLA reads --xla_cpu_max_isa when JAX starts: `trainer fit --cpu-isa` sets it in its own process and
    records it; a resume that would compute otherwise, or a process already started without it, is refused."""
    train, icl, _ = sets
    run = tmp_path / "run"
    short = [*TINY_CLI[:1], "2", *TINY_CLI[2:]]
    p = _trainer("fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run), "--cpu-isa", "sse4_2", *short)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "CPU code capped at sse4_2" in p.stdout.splitlines()[0]
    stored = RunDir(run).read()
    assert stored["trainer"]["compute"]["cpu_isa"] == "sse4_2" and stored["platform"]["cpu_isa"] == "sse4_2"
    # the resume keeps the cap (the stored config), and asking for another is refused in one line
    p = _trainer("fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run), "--resume", "--steps", "4",
                 "--no-progress")
    assert p.returncode == 0 and "capped at sse4_2" in p.stdout, p.stdout + p.stderr
    p = _trainer("fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run), "--resume", "--steps", "6",
                 "--cpu-isa", "native", "--no-progress")
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "cpu_isa" in lines[0], p.stdout + p.stderr
    # in a process whose JAX started uncapped (this one), a capped run is refused before anything is written
    with pytest.raises(platform.PlatformError, match="cpu_isa avx2 is asked for but this process computes with native"):
        fit(_with(tiny_config(steps=2), cpu_isa=CpuIsa.AVX2), train, [icl], tmp_path / "inproc", progress=False)
    assert not (tmp_path / "inproc").exists()
