"""`python -m tools.demo` (make demo): runs tools/demo/demo.py."""
import sys

from tools.demo.demo import main

sys.exit(main())
