"""The `trainer` console command and `python -m trainer ...`.

`entry` first re-executes the process once with huge-page-backed malloc (`trainer.hugepages`; this module
imports nothing heavy, so the re-execution happens before JAX is loaded), then runs `trainer.cli.main`.
"""

from trainer.hugepages import reexec_with_hugepages


def entry() -> None:
    reexec_with_hugepages()
    from trainer.cli import main

    main()


if __name__ == "__main__":  # guarded: `spawn` worker processes re-import the main module
    entry()
