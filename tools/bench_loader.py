"""Alias: `python -m tools.bench_loader` runs `tools.bench.bench_loader` (the module moved there)."""
import sys

from tools.bench.bench_loader import main

if __name__ == "__main__":
    sys.exit(main())
