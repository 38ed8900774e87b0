"""Shared pytest fixtures: the real Omniglot image table, built once per session when the data is there."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest


def shared_omniglot_dir() -> Path | None:
    """The complete Omniglot: `$OMNIGLOT_DIR`, else `../shared/omniglot` beside the repository; None if absent."""
    env = os.environ.get("OMNIGLOT_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "omniglot")
    for c in candidates:
        if (c / "images_background.zip").is_file() or (c / "images_background").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def omniglot_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's image-table cache directory (the real table is cached here by `omniglot_table`)."""
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="session")
def omniglot_table(omniglot_cache_dir: Path):
    """The real 1623x20x105x105 image table (seqgen.omniglot.ImageTable); skips when Omniglot is absent."""
    src = shared_omniglot_dir()
    if src is None:
        pytest.skip("complete Omniglot not found (set OMNIGLOT_DIR or provide ../shared/omniglot)")
    from seqgen.omniglot import load_image_table

    return load_image_table(src, cache_dir=omniglot_cache_dir, progress=False)


@pytest.fixture(scope="session")
def warm_kernels() -> None:
    """Compile (or load from numba's cache) every sequence-sampling kernel once per session."""
    from seqgen.sampling import warmup

    warmup()


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """After each test module, drop JAX's caches of compiled programs. Each program XLA compiles for the
    CPU holds ~3 memory mappings of JIT code for as long as a cache keeps it, and the whole suite in one
    process used to pass Linux's limit of 65,530 mappings per process (vm.max_map_count): the next
    compilation then died in a segmentation fault inside XLA (tests/test_memory_maps.py)."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
