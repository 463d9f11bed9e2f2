"""Alias: `python -m tools.make_shards` runs `tools.convert.make_shards` (the module moved there)."""
import sys

from tools.convert.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
