"""trainer: trains and evaluates the model of Chan et al. 2022 on seqgen shard sets.

The command line is `trainer` (`trainer.cli`). The Python API (docs/api.md) is `load_run(path)`, a run
directory as a `Run` (config, metrics as arrays, checkpoints, `model(step)`, `evaluate(paths)`), in
`trainer.api`. The names are imported on first use, so `import trainer` stays cheap (no JAX).
"""

__all__ = ["Curve", "Metrics", "Run", "Series", "TrainedModel", "load_run"]


def __getattr__(name: str):
    if name in __all__:
        from trainer import api

        return getattr(api, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
