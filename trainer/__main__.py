"""The `trainer` console command and `python -m trainer ...`.

`entry` first makes Ctrl+C / SIGTERM exit 130 with one line (`trainer.runtime.signals`), re-executes the process
once with huge-page-backed malloc (`trainer.runtime.hugepages`; this module imports nothing heavy, so the
re-execution happens before JAX is loaded), then runs `trainer.cli.main`.
"""

from trainer.runtime.signals import install_early_exit  # light: os, signal, sys, threading

from trainer.runtime.hugepages import reexec_with_hugepages


def entry() -> None:
    install_early_exit()  # Ctrl+C from here on: one line, exit 130 (trainer.runtime.signals)
    reexec_with_hugepages()
    from trainer.cli import main

    main()


if __name__ == "__main__":  # guarded: `spawn` worker processes re-import the main module
    entry()
