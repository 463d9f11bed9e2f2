"""Alias: `python -m tools.demo_variants` runs `tools.demo.demo_variants` (the module moved there)."""
import sys

from tools.demo.demo_variants import main

if __name__ == "__main__":
    sys.exit(main())
