"""Alias: `python -m tools.noise_sweep` runs `tools.demo.noise_sweep` (the module moved there)."""
import sys

from tools.demo.noise_sweep import main

if __name__ == "__main__":
    sys.exit(main())
