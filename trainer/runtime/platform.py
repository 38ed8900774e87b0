"""Where a run computes and how: the backend and its devices, the compute settings resolved and applied,
the one line every command prints at start, `trainer doctor`, and the one-line refusals of a platform that
cannot be had.

- `prepare(platform, compute)` runs before JAX's backend starts: it selects the platform (`--platform`,
  else $JAX_PLATFORMS) and adds XLA's deterministic-GPU-ops flag unless `compute.deterministic` is off.
- `start(...)`, how every command starts JAX: `prepare`, the backend, and on a GPU the persistent
  compilation cache (`compile_cache_dir`).
- `backend()` starts the backend or refuses in one line (e.g. JAX_PLATFORMS=cuda where JAX has no CUDA
  backend: JAX itself ends in a bare AssertionError).
- `resolve_compute(cfg)` turns the config's "auto" kernel path and layer loop into the concrete choice, so
  that config.json records what ran (`trainer.config.ComputeConfig`).
- `computing(compute)` is entered while a step is traced: kernel path, layer loop and matmul precision
  then apply to every matmul and convolution of the program, the custom kernels' included.
- `@releases_programs`: `fit`, a group and `evaluate` drop the programs they compiled when they end.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import glob
import importlib.metadata
import os
import platform
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from seqgen.errors import UserError
from trainer.config import ComputeConfig, CpuIsa, KernelPath, LayerLoop, Precision, TrainConfig


class PlatformError(UserError):
    """A platform that cannot be had, or a setting it cannot apply; one-line message."""


PLATFORMS = ("auto", "cpu", "gpu")
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
ISA_FLAG = "--xla_cpu_max_isa"
CACHE_ENV = "EMERGENT_ICL_COMPILE_CACHE"  # a folder, or "off"
GPU_INSTALL = 'pip install -e ".[cuda12]"'

# jax.default_matmul_precision's names of each precision (bfloat16 computes in bfloat16 by casting, with
# the default precision of bfloat16 operands).
_MATMUL_PRECISION = {Precision.FLOAT32: "highest", Precision.TF32: "tensorfloat32", Precision.BFLOAT16: "default"}


# ================================================================ before the backend starts


def compile_cache_dir() -> Path | None:
    """The persistent compilation cache: $EMERGENT_ICL_COMPILE_CACHE ("off": none), else
    $XDG_CACHE_HOME/emergent-icl/jax (default ~/.cache/emergent-icl/jax)."""
    given = os.environ.get(CACHE_ENV, "").strip()
    if given.lower() in ("off", "0", "none", "false"):
        return None
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "emergent-icl" / "jax"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without the probe: assume started (nothing is changed)
        return True


def prepare(platform: str | None = None, compute: ComputeConfig | None = None) -> None:
    """Set what JAX reads when its backend starts: the platform (`platform`: auto, cpu or gpu; None keeps
    $JAX_PLATFORMS) and deterministic GPU ops (unless `compute.deterministic` is False). Once the backend
    has started nothing changes; asking for another platform then is refused."""
    import jax

    started = _backends_started()
    if platform not in (None, "auto"):
        if platform not in PLATFORMS:
            raise PlatformError(f"--platform {platform!r} is not one of {', '.join(PLATFORMS)}")
        want = {"cpu": "cpu", "gpu": "cuda"}[platform]
        if started:
            if jax.default_backend() not in (want, "gpu"):
                raise PlatformError(f"--platform {platform}: JAX already runs on {jax.default_backend()} in this "
                                    "process; start a new process")
        else:
            os.environ["JAX_PLATFORMS"] = want
            jax.config.update("jax_platforms", want)
    if not started:
        flags = os.environ.get("XLA_FLAGS", "")
        deterministic = compute is None or compute.deterministic
        if deterministic and "xla_gpu_deterministic_ops" not in flags:
            flags = f"{flags} {DETERMINISTIC_FLAG}".strip()
        if compute is not None and compute.cpu_isa is not CpuIsa.NATIVE:
            kept = [f for f in flags.split() if not f.startswith(f"{ISA_FLAG}=")]
            flags = " ".join([*kept, f"{ISA_FLAG}={compute.cpu_isa.value.upper()}"])
        os.environ["XLA_FLAGS"] = flags
    if compute is not None:
        check_cpu_isa(compute)


def cpu_isa_in_effect() -> str:
    """The instruction-set cap of XLA's CPU code in this process ("native": none), from XLA_FLAGS."""
    for f in os.environ.get("XLA_FLAGS", "").split():
        if f.startswith(f"{ISA_FLAG}="):
            return f.split("=", 1)[1].lower()
    return CpuIsa.NATIVE.value


def check_cpu_isa(compute: ComputeConfig) -> None:
    """PlatformError (one line) when the run asks for a CPU instruction-set cap other than the one this
    process runs with: XLA reads it once, when JAX's backend starts."""
    want, have = compute.cpu_isa.value, cpu_isa_in_effect()
    if want != have:
        raise PlatformError(f"cpu_isa {want} is asked for but this process computes with {have} (XLA reads "
                            f"{ISA_FLAG} once, when JAX starts); run the command in a new process, or set "
                            f"XLA_FLAGS={ISA_FLAG}={want.upper()} before JAX starts"
                            + (" (or drop it)" if have != "native" else ""))


def enable_compile_cache() -> Path | None:
    """Turn on JAX's persistent compilation cache in `compile_cache_dir()` where it pays: on an accelerator
    (a paper-scale program compiles for tens of seconds there). Never on the CPU, where programs compile in
    seconds and JAX's CPU cache is unreliable (jax-ml/jax#38445: entries rejected on reload). None: off.
    A cache folder that cannot be made is skipped with no error: caching is only a speed-up."""
    import jax

    path = compile_cache_dir()
    if path is None or backend() == "cpu":
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return path


def deterministic_in_effect() -> bool:
    """Whether XLA's deterministic-GPU-ops flag is set for this process."""
    return "xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", "")


@dataclass
class Compilations:
    """What JAX compiled inside a `count_compilations` block: programs lowered (every compilation request,
    whether or not the persistent cache then serves it), backend compilations (cache misses) and their
    seconds."""

    lowered: int = 0
    compiled: int = 0
    compile_s: float = 0.0
    names: list[str] = field(default_factory=list)  # the lowered programs' names (e.g. "jit_step"), in order

    def of(self, name: str) -> int:
        """How many times a program of this name was lowered."""
        return self.names.count(name)


_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations() -> Iterator[Compilations]:
    """Count this process's XLA compilations inside the block (`jax.monitoring`'s compile events)."""
    import jax.monitoring

    seen = Compilations()

    def listen(event: str, duration: float, **kwargs: Any) -> None:
        if event == _LOWER_EVENT:
            seen.lowered += 1
            seen.names.append(str(kwargs.get("fun_name", "")))
        elif event == _COMPILE_EVENT:
            seen.compiled += 1
            seen.compile_s += duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


# ================================================================ the backend and its devices

SIMD_FLAGS = ("avx512f", "avx2", "avx", "sse4_2", "asimd")  # widest first: XLA's CPU code depends on it


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name and its widest SIMD extension, from /proc/cpuinfo (e.g. 'Intel(R) Xeon(R)
    Processor, avx512f'), or `platform.processor()` / `platform.machine()` where that cannot be read.
    Two CPUs of one architecture can round floats differently, so a run records which one it ran on."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    simd = next((f for f in SIMD_FLAGS if f in flags), None)
    return f"{model}, {simd}" if simd else model


def platform_record() -> dict[str, Any]:
    """What config.json records of where a run computes: backend, devices, CPU model, deterministic GPU
    ops in effect (a run's numbers depend on all four; docs/gpu.md)."""
    return {**devices_summary(), "cpu": cpu_model(), "cpu_isa": cpu_isa_in_effect(),
            "deterministic_gpu_ops": deterministic_in_effect()}


def versions() -> dict[str, str]:
    """The library versions and the backend a run computes with (config.json's and provenance's "versions")."""
    import equinox
    import h5py
    import jax
    import numpy
    import optax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "equinox": equinox.__version__,
        "optax": optax.__version__,
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "backend": jax.default_backend(),
    }


def gpu_visible() -> bool:
    """Whether an NVIDIA GPU's driver is visible on this machine (whatever JAX uses)."""
    return bool(shutil.which("nvidia-smi") or os.path.exists("/proc/driver/nvidia/version")
                or glob.glob("/dev/nvidia[0-9]*"))


def cuda_plugin() -> str | None:
    """The version of JAX's CUDA plugin when installed (the `cuda12` extra), else None."""
    for name in ("jax-cuda12-plugin", "jax_cuda12_plugin", "jax-cuda13-plugin"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def backend() -> str:
    """JAX's backend ("cpu", "gpu", ...), started now if it was not; PlatformError (one line) when the
    platform asked for cannot be had."""
    import jax

    try:
        return jax.default_backend()
    except Exception as e:  # JAX ends JAX_PLATFORMS=cuda without CUDA in a bare AssertionError
        asked = os.environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms or "auto"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if any(p in asked for p in ("cuda", "gpu", "rocm")):
            if cuda_plugin() is None:
                why = "JAX's CUDA backend is not installed"
                fix = f"on a machine with an NVIDIA GPU install it with {GPU_INSTALL}"
            elif not gpu_visible():
                why = "no NVIDIA GPU or driver is visible on this machine"
                fix = "run on a machine with one"
            else:
                why = f"JAX could not start it ({first})"
                fix = "check the driver with nvidia-smi and the CUDA install with trainer doctor"
            raise PlatformError(f"a GPU was asked for (--platform gpu or JAX_PLATFORMS={asked}) but {why}; {fix}, "
                                "or unset JAX_PLATFORMS (or --platform cpu) to run on the CPU") from None
        raise PlatformError(f"JAX could not start its backend (JAX_PLATFORMS={asked}): {first}; unset "
                            "JAX_PLATFORMS or fix the install (trainer doctor)") from None


def devices_summary() -> dict[str, Any]:
    """{backend, device_kind, device_count, process_count, memory_bytes (per device, None where JAX does
    not say)}: what a run records of where it ran."""
    import jax

    name = backend()
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    memory = None
    try:
        stats = devices[0].memory_stats()
        memory = int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
    except Exception:  # not every backend reports memory
        memory = None
    return {"backend": name, "device_kind": ", ".join(kinds), "device_count": len(devices),
            "process_count": jax.process_count(), "memory_bytes": memory}


def gpu_unused() -> bool:
    """An NVIDIA GPU is visible but JAX computes on the CPU: the user's first run would be slow, silently."""
    return backend() == "cpu" and gpu_visible() and os.environ.get("JAX_PLATFORMS", "") in ("", "cuda", "gpu")


def gpu_unused_warning() -> str | None:
    if not gpu_unused():
        return None
    if cuda_plugin() is None:
        return (f"warning: an NVIDIA GPU is present but JAX runs on the CPU (no CUDA backend installed); "
                f"install it with {GPU_INSTALL} (trainer doctor shows the details)")
    return ("warning: an NVIDIA GPU is present but JAX runs on the CPU (the CUDA backend did not start); "
            "see trainer doctor")


def start(platform: str | None, compute: ComputeConfig | None, *, warn: Callable[[str], None],
          initialize: Callable[[], None] | None = None) -> str:
    """How every command starts JAX: `prepare` (platform, XLA's flags, the compilation cache), then
    `initialize` (a distributed job joins before the backend starts), then the backend (refused in one
    line when it cannot start); `warn` gets the warning of a GPU present but unused. Returns the backend."""
    prepare(platform, compute)
    if initialize is not None:
        initialize()
    name = backend()
    enable_compile_cache()
    warning = gpu_unused_warning()
    if warning:
        warn(warning)
    return name


# ================================================================ the compute settings


def resolve_compute(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with "auto" kernel path and layer loop made concrete: $EMERGENT_ICL_KERNELS /
    $EMERGENT_ICL_LAYERS (or a `use_kernels` / `use_layer_loop` block), else the platform's default."""
    from trainer.models.kernels import kernel_path, layer_loop

    c = cfg.compute
    kernels = KernelPath(kernel_path()) if c.kernels is KernelPath.AUTO else c.kernels
    loop = LayerLoop(layer_loop()) if c.layer_loop is LayerLoop.AUTO else c.layer_loop
    return replace(cfg, compute=replace(c, kernels=kernels, layer_loop=loop))


@contextlib.contextmanager
def computing(compute: ComputeConfig) -> Iterator[None]:
    """Trace inside this block to compute as `compute` says: its kernel path and layer loop ("auto": as
    outside), and every matmul and convolution at its precision."""
    import jax

    from trainer.models.kernels import use_kernels, use_layer_loop

    with contextlib.ExitStack() as stack:
        if compute.kernels is not KernelPath.AUTO:
            stack.enter_context(use_kernels(compute.kernels.value))
        if compute.layer_loop is not LayerLoop.AUTO:
            stack.enter_context(use_layer_loop(compute.layer_loop.value))
        stack.enter_context(jax.default_matmul_precision(_MATMUL_PRECISION[compute.precision]))
        yield


_F = TypeVar("_F", bound=Callable[..., Any])


def release_programs() -> None:
    """Drop every compiled program JAX and Equinox keep in their caches. Each program XLA compiles for the
    CPU holds ~3 memory mappings of JIT code per kernel for as long as a cache keeps it reachable (through
    its static arguments: our step closures), so runs one after another in one process (a sweep, a
    notebook, the test suite) added ~770 mappings each, up to Linux's limit of 65,530 per process
    (vm.max_map_count), where the next compilation died in a segmentation fault inside XLA. Anything else
    the process compiled is compiled again when next called."""
    import equinox as eqx

    eqx.clear_caches()  # Equinox's own caches, then JAX's (its order: equinox.clear_caches' docstring)
    import jax

    jax.clear_caches()
    gc.collect()


def releases_programs(fn: _F) -> _F:
    """Decorate a command's entry point (fit, a group, evaluate) to `release_programs()` when it ends."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            release_programs()

    return wrapper  # type: ignore[return-value]


def compute_dtype(compute: ComputeConfig) -> Any:
    import jax.numpy as jnp

    return jnp.bfloat16 if compute.precision is Precision.BFLOAT16 else jnp.float32


# ================================================================ what is said


def compile_line(seconds: float) -> str:
    """The line `fit` prints after its first dispatch: how long the train program took to trace and compile
    (or to load from the persistent compilation cache, on a GPU: a rerun's shorter time shows the cache works)."""
    import jax

    cache = jax.config.jax_compilation_cache_dir
    where = f"persistent cache {cache}" if cache else "no persistent cache"
    return f"compiled: the train program in {seconds:.1f} s ({where})"


def start_line(cfg: TrainConfig, num_devices: int | None = None) -> str:
    """The one line `fit`, `evaluate` and `sweep` print at start: where and how the run computes."""
    d = devices_summary()
    c = resolve_compute(cfg).compute
    n = d["device_count"] if num_devices is None else num_devices
    det = "deterministic" if deterministic_in_effect() else "non-deterministic"
    if d["backend"] == "cpu":
        det = "deterministic"  # XLA's CPU ops are
    hosts = f" on {d['process_count']} processes" if d["process_count"] > 1 else ""
    isa = f", CPU code capped at {c.cpu_isa.value}" if c.cpu_isa is not CpuIsa.NATIVE else ""
    return (f"device: {d['backend']} ({n} x {d['device_kind']}{hosts}); precision {c.precision.value}, "
            f"kernels {c.kernels.value}, layer loop {c.layer_loop.value}, {det}{isa}")


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def doctor_lines(cfg: TrainConfig) -> tuple[list[str], bool]:
    """`trainer doctor`'s lines (versions, backend, devices, GPU present but unused, compute settings, cache)
    and whether the backend starts."""
    import jax
    import jaxlib

    lines = [f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, CUDA plugin: {cuda_plugin() or 'not installed'}",
             f"JAX_PLATFORMS: {os.environ.get('JAX_PLATFORMS') or '(unset: JAX picks)'}"]
    try:
        d = devices_summary()
    except PlatformError as e:
        lines.append(f"backend: cannot start: {e}")
        return lines, False
    lines.append(f"backend: {d['backend']}; devices: {d['device_count']} x {d['device_kind']} "
                 f"(memory per device {_gib(d['memory_bytes'])}); processes: {d['process_count']}")
    lines.append(f"NVIDIA GPU visible: {'yes' if gpu_visible() else 'no'}")
    warning = gpu_unused_warning()
    if warning:
        lines.append(warning)
    c = resolve_compute(cfg).compute
    lines.append(f"a run would use: precision {c.precision.value}, kernels {c.kernels.value}, layer loop "
                 f"{c.layer_loop.value}, deterministic GPU ops {'on' if c.deterministic else 'off'}")
    cache = compile_cache_dir()
    where = "off on the CPU" if d["backend"] == "cpu" else (cache if cache is not None else "off")
    lines.append(f"compilation cache: {where} (${CACHE_ENV} sets the folder used on a GPU; off disables)")
    xla_flags = os.environ.get("XLA_FLAGS", "")
    lines.append(f"XLA_FLAGS: {xla_flags or '(none)'}")
    return lines, True
