"""`trainer.runtime.hugepages`: when the trainer re-executes itself with `glibc.malloc.hugetlb=1`, and that it does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trainer.runtime.hugepages import TUNABLE, environ_with_hugepages, glibc_supports_tunable, thp_available


def test_tunable_added_to_an_empty_environment():
    env = environ_with_hugepages({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1"}


def test_other_tunables_are_kept():
    env = environ_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"


@pytest.mark.parametrize("value", [f"{TUNABLE}=1", f"{TUNABLE}=0", f"glibc.malloc.arena_max=2:{TUNABLE}=0"])
def test_a_value_already_there_is_respected(value):
    assert environ_with_hugepages({"GLIBC_TUNABLES": value}) is None


def test_a_similar_name_is_not_mistaken_for_the_tunable():
    env = environ_with_hugepages({"GLIBC_TUNABLES": f"{TUNABLE}x=0"})
    assert env["GLIBC_TUNABLES"] == f"{TUNABLE}x=0:{TUNABLE}=1"


@pytest.mark.parametrize(("libc", "ok"), [
    (("glibc", "2.36"), True), (("glibc", "2.35"), True), (("glibc", "2.34"), False), (("glibc", "3.0"), True),
    (("", ""), False), (("musl", "1.2"), False), (("glibc", "weird"), False),
])
def test_glibc_version_gate(libc, ok):
    assert glibc_supports_tunable(libc) is ok


@pytest.mark.parametrize(("setting", "ok"), [
    ("always [madvise] never\n", True), ("[always] madvise never\n", True), ("always madvise [never]\n", False),
    ("", False),
])
def test_thp_setting_gate(setting, ok):
    assert thp_available(setting) is ok


_CHILD = ("import os, sys; from trainer.runtime.hugepages import reexec_with_hugepages; "
          "print('start', flush=True); reexec_with_hugepages(); "
          "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


def _run_child(env_extra):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), env.get("PYTHONPATH", "")] if p)
    out = subprocess.run([sys.executable, "-c", _CHILD, "a", "--b"], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout.splitlines()


needs_thp = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and glibc_supports_tunable() and thp_available()),
    reason="needs Linux, glibc >= 2.35 and transparent huge pages")


@needs_thp
def test_reexecutes_once_with_the_same_arguments():
    lines = _run_child({})
    # the first process printed 'start', then became the second, which printed 'start' again and went on
    assert lines == ["start", "start", f"{TUNABLE}=1 ['a', '--b']"]


@needs_thp
def test_user_choice_means_no_reexecution():
    assert _run_child({"GLIBC_TUNABLES": f"{TUNABLE}=0"}) == ["start", f"{TUNABLE}=0 ['a', '--b']"]


def test_console_entry_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0 and "fit" in out.stdout and "evaluate" in out.stdout
