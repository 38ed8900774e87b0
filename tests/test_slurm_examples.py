"""examples/slurm/ run as Slurm would run them, simulated by concurrent local processes.

- build_shards.sbatch as a 2-task array, both tasks at once on one shared folder, then
  finalize_shards.sbatch: byte-identical to one `seqgen build` of the same options.
- Sweeps on Slurm are `trainer sweep FILE --executor slurm` (tests/test_sweep_cluster.py), which replaced
  the hand-written sweep_array.sbatch.
- fit_2nodes.sbatch runs in tests/test_multiprocess.py (two local tasks through tests/fake_srun.sh).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"
SYMBOLIC = ("--type bursty --example-type symbolic --symbolic-size 40 --n-rare-classes 30 --n-common-classes 5 "
            "--n-holdout-classes 5 --seed 3")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), SEQGEN=f"{sys.executable} -m seqgen", **extra)


def test_array_build_then_finalize_is_byte_identical_to_one_build(tmp_path, warm_kernels):
    from seqgen.cli import main

    one = tmp_path / "one"
    res = CliRunner().invoke(main, ["build", "--out", str(one), "--num-seqs", "600", "--shard-size", "100", "--quiet",
                                    *SYMBOLIC.split()])
    assert res.exit_code == 0, res.output
    shared = tmp_path / "shared"
    env = _env(OUT=str(shared), NUM_SEQS="600", SHARD_SIZE="100", SEQGEN_ARGS=SYMBOLIC, SLURM_ARRAY_TASK_COUNT="2")
    tasks = [subprocess.Popen(["bash", str(SLURM / "build_shards.sbatch")], env=dict(env, SLURM_ARRAY_TASK_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [t.communicate(timeout=300) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], [o[1][-2000:] for o in outs]
    assert "built 3 shard(s)" in outs[0][0] and "built 3 shard(s)" in outs[1][0]  # ranges 0:3 and 3:6
    assert not (shared / "manifest.json").exists()  # not a usable set before finalize
    fin = subprocess.run(["bash", str(SLURM / "finalize_shards.sbatch")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert fin.returncode == 0, fin.stderr[-2000:]
    assert "built 0 shard(s), 6 already done" in fin.stdout and "ok, 600 bursty sequences" in fin.stdout
    assert _digests(shared) == _digests(one)


def test_array_build_refuses_a_missing_setting(tmp_path):
    out = subprocess.run(["bash", str(SLURM / "build_shards.sbatch")], env=_env(OUT=str(tmp_path), NUM_SEQS="10"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "run as a job array" in out.stderr

