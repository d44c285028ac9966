# `make run` and `make test` work on a fresh machine: they create .venv and install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1

.PHONY: setup run test test-slow bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, on its own: the pinned CPU build; then the project and its test tools.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python -m hiar.demo --preset tiny --blocks 8

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/rollout.py --preset tiny --blocks 8

clean:
	rm -rf $(VENV) .pytest_cache
