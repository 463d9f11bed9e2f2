"""Alias: `python -m tools.make_synthetic` runs `tools.demo.make_synthetic` (the module moved there)."""
import sys

from tools.demo.make_synthetic import main

if __name__ == "__main__":
    sys.exit(main())
