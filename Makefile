# The two commands of the README. Both create the environment first if it is missing.
PY := .venv/bin/python
PARAMS ?= params/embedded.yaml

.PHONY: setup report test test-fast

setup:
	@bash scripts/setup.sh

# All notebooks on the embedded default -> reports/<run_name>/index.html
report: setup
	$(PY) -m medcomp run $(PARAMS)

# Whole suite, slow end-to-end checks included (CI runs this).
test: setup
	$(PY) -m pytest tests --durations=10

# Unit tests only (a couple of minutes).
test-fast: setup
	$(PY) -m pytest tests -m "not slow"
