"""`python -m trainer ...` runs the trainer command line."""

from trainer.cli import main

if __name__ == "__main__":  # guarded: `spawn` worker processes re-import the main module
    main()
