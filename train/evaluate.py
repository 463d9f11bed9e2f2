"""Alias: `python -m train.evaluate` runs `train.eval.cli` (the module moved there)."""
import sys

from train.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
