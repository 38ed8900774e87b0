"""`python -m seqgen ...` runs the seqgen command line."""

from seqgen.cli import main

if __name__ == "__main__":  # guarded: `spawn` worker processes re-import the main module
    main()
