"""Interrupts around start-up (`trainer.runtime.signals`): none is dropped, whatever the moment or what the
parent did with SIGINT. Small processes without JAX, plus `python -m trainer` up to its imports.

A shell without job control starts `cmd &` with SIGINT ignored, and children inherit that; the trainer
takes SIGINT over anyway (as `GracefulInterrupt` always did), so an interrupt during start-up is not lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux (execve, /proc)")

# install_early_exit, then the huge-pages re-execution with the signal sent just before execve (so it
# arrives while blocked and must stay pending across it), then a line that must never be printed.
REEXEC = """
import os, signal, sys
from trainer.runtime import hugepages
from trainer.runtime.signals import install_early_exit

hugepages.glibc_supports_tunable = lambda *a: True  # re-execute wherever this runs (an unknown tunable is ignored)
hugepages.thp_available = lambda *a: True
real_execve = os.execve

def execve(path, args, env):
    os.kill(os.getpid(), {sig})  # blocked now: pending across execve
    real_execve(path, args, env)

os.execve = execve
install_early_exit()
hugepages.reexec_with_hugepages()
print("ran on: the interrupt was lost", flush=True)
"""

SELF_KILL = """
import os, signal, time
from trainer.runtime.signals import install_early_exit

install_early_exit()
os.kill(os.getpid(), {sig})
time.sleep(3)
print("ran on: the interrupt was lost", flush=True)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    return {**env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


# what `cmd &` in a shell without job control does to the child: SIGINT ignored, then exec (no preexec_fn:
# forking a process that has started JAX threads warns, and warnings are errors here)
IGNORING = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def _python(*args: str, ignored: bool = False) -> list[str]:
    """`python ARGS`, started with SIGINT ignored when `ignored` (same process id after the exec)."""
    return [sys.executable, "-c", IGNORING, *args] if ignored else [sys.executable, *args]


def _assert_one_line_130(proc: subprocess.CompletedProcess, sig: int) -> None:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 130, (proc.returncode, proc.stdout, proc.stderr)
    assert lines == [f"interrupted ({signal.Signals(sig).name}) while starting: nothing new was saved"], proc.stderr
    assert "ran on" not in proc.stdout


@linux_only
@pytest.mark.parametrize("inherited", ["default", "ignored"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_the_reexecution_is_delivered_after_it(inherited, sig):
    proc = subprocess.run(_python("-c", REEXEC.format(sig=int(sig)), ignored=inherited == "ignored"),
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=60)
    _assert_one_line_130(proc, sig)


def test_a_sigint_ignored_by_the_parent_still_stops_the_trainer():
    proc = subprocess.run(_python("-c", SELF_KILL.format(sig=int(signal.SIGINT)), ignored=True), capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=60)
    _assert_one_line_130(proc, signal.SIGINT)


def _catches_sigterm(pid: int) -> bool:
    """The early handler is in place (Python itself catches SIGINT, never SIGTERM)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


@linux_only
def test_sigint_at_several_moments_of_trainer_start_up_is_never_lost(tmp_path):
    """`python -m trainer fit` with SIGINT ignored by its parent, interrupted at several delays after its
    handler is in place (through the re-execution and the imports): always 130 and one line. A lost
    interrupt shows as the fit going on to its error about the missing training set (exit 2)."""
    for delay in (0.0, 0.005, 0.02, 0.05, 0.1, 0.2):
        proc = subprocess.Popen(_python("-m", "trainer", "fit", "--train", str(tmp_path / "none"), "--run-dir",
                                        str(tmp_path / "run"), ignored=True),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)
        end = time.monotonic() + 60
        while not _catches_sigterm(proc.pid) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        _assert_one_line_130(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), signal.SIGINT)
