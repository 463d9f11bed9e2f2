"""Alias: `python -m tools.bench_train` runs `tools.bench.bench_train` (the module moved there)."""
import sys

from tools.bench.bench_train import main

if __name__ == "__main__":
    sys.exit(main())
