"""Alias: `python -m tools.bench_scale` runs `tools.bench.bench_scale` (the module moved there)."""
import sys

from tools.bench.bench_scale import main

if __name__ == "__main__":
    sys.exit(main())
