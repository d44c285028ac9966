# `make run` and `make test` work on a fresh machine: they create .venv and install what they need first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
# a local head listens on 127.0.0.1 only; `ray start` would turn token auth on if ~/.ray/auth_token exists
export RAY_AUTH_MODE := disabled

# The local Ray head `make run` starts when none answers at DASHBOARD_PORT (own temp dir, stopped by `make stop`).
RAY_TMP ?= /tmp/hiar-ray-head
RAY_PORT ?= 6390
DASHBOARD_PORT ?= 8265
RAY_CPUS ?= $(shell nproc)
# Ray's fixed default ports (job agent 52365, client server 10001) may be taken by another Ray on a shared box:
# free ones are picked instead (the rest are random already).
FREE_PORT = $(shell $(PY) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DASHBOARD := http://127.0.0.1:$(DASHBOARD_PORT)
# Where the pipeline writes (datasets, checkpoints, model bundles, MLflow SQLite store).
RUN_DIR ?= $(CURDIR)/runs/tiny
PRESET ?= tiny
ARGS ?=
# The working_dir upload leaves out what the cluster does not need (runs, the venv, git objects).
# Progress stays plain (a line per stage at most every 30 s): `ray job submit` reads the driver's log as text lines,
# so a live line's carriage returns would arrive as one new line per update.
# HIAR_RAY_LOGS_DIR tells the run's summary where Ray's own logs are: the session of the head `make ray-up` started
# (resolved now, so a later restart of the head does not move it), or empty on a cluster make did not start.
# Recursive (=): expanded when `submit` runs, after `ray-up`.
HEAD_LOGS = $(shell [ -f $(RAY_TMP)/head.pid ] && kill -0 $$(cat $(RAY_TMP)/head.pid) 2>/dev/null \
	&& [ -e $(RAY_TMP)/session_latest ] && echo $$(readlink -f $(RAY_TMP)/session_latest)/logs)
RUNTIME_ENV = {"excludes": [".venv", ".git", "runs", "mlruns", ".pytest_cache", ".hypothesis", "**/__pycache__", "*.egg-info"], "env_vars": {"HIAR_PROGRESS": "plain", "HIAR_RAY_LOGS_DIR": "$(HEAD_LOGS)"}}

.PHONY: setup run ray-up stop submit test test-slow bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, on its own: the pinned CPU build; then the project and its test tools.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# The whole tiny pipeline as a Ray job, ending with the Serve app up (it stays up; `make stop` ends it).
run: setup ray-up submit
	@echo "Serve app: http://127.0.0.1:8000  (POST /v1/videos, docs at /docs); Ray dashboard: $(DASHBOARD)"
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(RUN_DIR)/mlflow.db"
	@echo "Stop the Ray head and the Serve app: make stop"

submit:
	$(BIN)/ray job submit --address $(DASHBOARD) --working-dir . --runtime-env-json '$(RUNTIME_ENV)' \
		-- python -m hiar.pipeline.full --preset $(PRESET) --deploy --run-dir $(RUN_DIR) $(ARGS)

# Start a head on 127.0.0.1 unless a cluster already answers at DASHBOARD_PORT. `--block` under setsid: its PID
# is the process group `make stop` ends (never `ray stop`, which stops every Ray cluster on the machine). Ready
# when `ray start` has started every process ("block forever"): the dashboard answers earlier than the job agent.
ray-up: setup
	@if $(BIN)/python -c "import urllib.request as u; u.urlopen('$(DASHBOARD)/api/version', timeout=2)" 2>/dev/null; then \
		echo "using the Ray cluster at $(DASHBOARD)"; \
	else \
		mkdir -p $(RAY_TMP); rm -f $(RAY_TMP)/head.log; \
		echo "starting a local Ray head (dashboard $(DASHBOARD), temp dir $(RAY_TMP), log $(RAY_TMP)/head.log)"; \
		PATH="$(CURDIR)/$(BIN):$$PATH" setsid nohup $(BIN)/ray start --head --block --node-ip-address=127.0.0.1 \
			--port=$(RAY_PORT) --num-cpus=$(RAY_CPUS) --dashboard-host=127.0.0.1 --dashboard-port=$(DASHBOARD_PORT) \
			--dashboard-agent-listen-port=$(FREE_PORT) --ray-client-server-port=$(FREE_PORT) \
			--temp-dir=$(RAY_TMP) --disable-usage-stats > $(RAY_TMP)/head.log 2>&1 < /dev/null & \
		echo $$! > $(RAY_TMP)/head.pid; \
		for i in $$(seq 120); do \
			grep -q "block forever" $(RAY_TMP)/head.log 2>/dev/null && break; \
			kill -0 $$(cat $(RAY_TMP)/head.pid) 2>/dev/null || { cat $(RAY_TMP)/head.log; echo "the Ray head did not start"; exit 1; }; \
			sleep 1; \
		done; \
		sleep 3; \
		echo "Ray head up (pid $$(cat $(RAY_TMP)/head.pid))"; \
	fi

# Serve first: `serve shutdown` deletes its apps (replicas stop gracefully) and its proxies and controller; a no-op
# when Serve is not running. Then SIGTERM to the head's `ray start` alone, which drains the node and stops the
# processes it started (not the whole group at once: the GCS would die with it and the drain would wait 30 s for it
# in vain); SIGKILL to what is left of its process group after 60 s.
stop:
	@if [ -f $(RAY_TMP)/head.pid ]; then \
		pid=$$(cat $(RAY_TMP)/head.pid); \
		if kill -0 $$pid 2>/dev/null; then \
			echo "stopping the Serve app and the Ray head $$pid"; \
			$(BIN)/serve shutdown --address $(DASHBOARD) --yes > $(RAY_TMP)/serve-shutdown.log 2>&1 \
				|| echo "serve shutdown failed (see $(RAY_TMP)/serve-shutdown.log); stopping the head anyway"; \
			kill -TERM $$pid; \
			for i in $$(seq 60); do kill -0 $$pid 2>/dev/null || break; sleep 1; done; \
			kill -KILL -$$pid 2>/dev/null || true; echo "stopped"; \
		else echo "the Ray head $$pid was not running"; fi; \
		rm -f $(RAY_TMP)/head.pid; \
	else echo "no Ray head started by make (nothing to stop)"; fi

# Two pytest workers, whole files each (module fixtures such as the deployed Serve app stay one per file): much of
# a test's time is spent waiting on process start-ups, so two files overlap on two cores.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/rollout.py --preset tiny --blocks 8

clean:
	rm -rf $(VENV) .pytest_cache
