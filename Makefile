# Two-command set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The demos need only the core dependencies: installing the test extra (Ray, transformers, the
# benchmarks' peers, moto) would take minutes of `make demo`'s budget. `make test` adds it.
CORE_STAMP := $(VENV)/.installed-core
OOD_STAMP := $(VENV)/.installed-ood
DEMO_DIR ?= shards/demo

.PHONY: venv test test-fast demo demo-long demo-seeds demo-variants noise-sweep clean

venv: $(STAMP)

$(CORE_STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $(CORE_STAMP)

# `make demo-variants` runs the OOD test: the `ood` extra (imagecorruptions, nlpaug) on top of the core.
$(OOD_STAMP): $(CORE_STAMP)
	$(PY) -m pip install --quiet -e '.[ood]'
	@touch $(OOD_STAMP)

$(STAMP): $(CORE_STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The edit-test loop: everything but the tests marked slow (make test stays the whole suite).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(CORE_STAMP)
	$(PY) -m tools.demo --out $(DEMO_DIR)

# 2,000 steps per mode (README, Demo results).
demo-long: $(CORE_STAMP)
	$(PY) -m tools.demo --out $(DEMO_DIR) --runs runs/demo-long --steps 2000

# The README's results table: every mode for three training seeds, mean ± std.
demo-seeds: $(CORE_STAMP)
	$(PY) -m tools.demo --out $(DEMO_DIR) --runs runs/demo-seeds --seeds 0 1 2

# Mean R@1 against the share of swapped raw texts (README: docs/noise_sweep.png).
noise-sweep: $(CORE_STAMP)
	$(PY) -m tools.demo.noise_sweep --fractions 0 0.3 0.5 0.7 --seeds 0 1 2 --steps 600 --plot docs/noise_sweep.png

# The other seed methods beside their references, on the demo's data (after `make demo`):
# LiT / LilT / evidential fine-tuning of the demo's clip-both model, token pruning from scratch.
demo-variants: $(OOD_STAMP)
	$(PY) -m tools.demo.demo_variants --out $(DEMO_DIR)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
