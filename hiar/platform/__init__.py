"""The platform layer: what jobs and serving share on top of the maths (Ray start-up, MLflow tracking, the model
registry).

Every import points down: ``hiar.core`` / ``methods`` / ``eval`` / ``tiny`` / ``io`` (no Ray, no MLflow) <-
``hiar.platform`` <- ``hiar.jobs`` and ``hiar.serving`` <- ``hiar.pipeline`` (tests/unit/test_layers.py reads
the import graph).

No telemetry, no hub access. These variables are read when ray, mlflow and transformers are first imported, and a
platform module is the first thing every job, the Serve app and the orchestrator import, so they are set here, once
(``setdefault``: a user's own value wins).
"""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow's artifact download bars: redrawn as log lines (a job's log, `ray job submit`'s output) they were 24 lines
# of `make run`'s deploy, one per file of the model it resolves
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
