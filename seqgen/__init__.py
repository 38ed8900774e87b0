"""seqgen: builds every sequence type of Chan et al. 2022 into sharded, self-describing HDF5 files.

The command line is `seqgen` (`seqgen.cli`). The Python API (docs/api.md) is `open_shards(path)`, a finished
shard set as a `SequenceSet` to index and iterate (`seqgen.api`). The names are imported on first use, so
`import seqgen` stays cheap.
"""

__all__ = ["SequenceSet", "open_shards"]


def __getattr__(name: str):
    if name in __all__:
        from seqgen import api

        return getattr(api, name)
    raise AttributeError(f"module 'seqgen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
