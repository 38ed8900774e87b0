"""bench/gpu_check.sh (issue 28): the GPU check's dry run on the CPU, every section at tiny sizes, through
the wrapper, so that the script a GPU session runs cannot rot; and its full sizes are the ones asked for."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    """bench/gpu_check.py as a module (registered first: its dataclasses look their module up)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def test_the_full_check_measures_the_paper_scale():
    g = _module()
    full = g.FULL
    assert full.image_sizes == (28, 105) and full.model.num_layers == 12 and full.batch == 32
    assert full.group == 8 and full.big == 105
    assert (full.curve_steps, full.curve_size) == (2000, 28) and full.train_seqs >= full.curve_steps * full.batch
    assert [p.value for p in g.Precision] == ["float32", "tf32", "bfloat16"]
    assert g.SECTIONS == ("doctor", "data", "speed", "group", "determinism", "compile", "curve")


@pytest.mark.slow
def test_the_dry_run_exercises_every_section(omniglot_table, omniglot_cache_dir, tmp_path):
    from tests.conftest import shared_omniglot_dir

    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "also"))
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--omniglot",
                        str(shared_omniglot_dir()), "--cache-dir", str(omniglot_cache_dir), "--out",
                        str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-cpu-dry-run.json").read_text())
    assert (tmp_path / "also" / "gpu-cpu-dry-run.json").read_text() == (tmp_path / "out" / "gpu-cpu-dry-run.json").read_text()
    s = report["sections"]
    assert list(s) == list(_module().SECTIONS)
    assert not [n for n, v in s.items() if "error" in v or "skipped" in v], s
    assert any(line.startswith("backend: cpu") for line in s["doctor"]["lines"])
    assert [r["precision"] for r in s["speed"]["rows"]] == ["float32", "tf32", "bfloat16"]
    assert all(r["ms_per_step"] > 0 and r["compilations"] == 1 for r in s["speed"]["rows"])
    assert s["group"]["runs"] == 2 and s["group"]["group"]["ms_per_step"] > 0
    assert s["group"]["first"]["single"]["compilations"] == 0  # the speed section's program, reused
    det, nondet = s["determinism"]["deterministic"], s["determinism"]["non_deterministic"]
    assert det["xla_deterministic_flag"] and not nondet["xla_deterministic_flag"]
    assert det["bitwise_same_twice"] and nondet["bitwise_same_twice"]  # the CPU's ops are deterministic
    for name in ("cold", "cached"):
        r = s["compile"][name]
        assert r["cache"] is None and r["train_programs"] == 1 and r["eval_programs"] == 1  # no cache on the CPU
    points = s["curve"]["points"]
    assert [p["step"] for p in points if "icl" in p and "iwl" in p] == [6, 12]
    assert all(0 <= p["icl"] <= 1 for p in points if "icl" in p)
    md = (tmp_path / "out" / "gpu-cpu-dry-run.md").read_text()
    for heading in ("## trainer doctor", "## ms/step", "## A group of 2 seeds", "## Deterministic GPU ops",
                    "## Compilation", "## ICL curve", "## Seconds per section"):
        assert heading in md
