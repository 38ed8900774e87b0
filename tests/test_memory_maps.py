"""Runs one after another in one process keep no compiled programs: each program XLA compiles for the CPU
holds memory mappings of JIT code while a cache keeps it, and the process's mappings are capped (Linux's
vm.max_map_count, 65,530). Before `trainer.runtime.platform.releases_programs` each `fit` left ~770 of
them behind, and the test suite, run in one process, died in a segmentation fault inside XLA."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.evaluate import evaluate_run
from trainer.fit import fit
from trainer.group import fit_group
from trainer.runtime.distributed import make_topology

from tests.trainkit import paper_like_sets, tiny_config

MAPS = Path("/proc/self/maps")
pytestmark = pytest.mark.skipif(not MAPS.is_file(), reason="counts memory mappings in /proc/self/maps (Linux)")

# a tiny fit compiles a handful of programs: before the fix each left ~770 mappings behind; this slack
# covers what the first calls create for good (numba's and h5py's state, Python's allocator arenas)
SLACK = 150


def _mappings() -> int:
    with MAPS.open() as f:
        return sum(1 for _ in f)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return paper_like_sets(tmp_path_factory.mktemp("sets"), 512)[:2]


def test_repeated_fits_evaluations_and_groups_leave_no_compiled_programs(sets, tmp_path):
    train, icl = sets
    cfg = tiny_config(steps=4, eval_every=4, checkpoint_every=4, log_every=2)

    def evaluate(run):
        evaluate_run(run, [icl], step=4, train_dir=None, max_seqs=32, batch_size=32, omniglot_dir=None,
                     cache_dir=None, topo=make_topology(), echo=lambda _: None)

    fit(cfg, train, [icl], tmp_path / "r0", progress=False)
    evaluate(tmp_path / "r0")
    fit_group([cfg, cfg], [train, train], [[icl], [icl]], [tmp_path / "g0", tmp_path / "g1"], progress=False)
    before = _mappings()
    for i in (1, 2):
        fit(cfg, train, [icl], tmp_path / f"r{i}", progress=False)
    evaluate(tmp_path / "r1")
    fit_group([cfg, cfg], [train, train], [[icl], [icl]], [tmp_path / "g2", tmp_path / "g3"], progress=False)
    grown = _mappings() - before
    assert grown < SLACK, f"{grown} memory mappings more after 2 fits, an evaluation and a group"
