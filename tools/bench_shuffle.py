"""Alias: `python -m tools.bench_shuffle` runs `tools.bench.bench_shuffle` (the module moved there)."""
import sys

from tools.bench.bench_shuffle import main

if __name__ == "__main__":
    sys.exit(main())
