"""Alias: `python -m tools.bench_convert` runs `tools.bench.bench_convert` (the module moved there)."""
import sys

from tools.bench.bench_convert import main

if __name__ == "__main__":
    sys.exit(main())
