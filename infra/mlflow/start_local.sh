#!/usr/bin/env bash
# A local MLflow tracking server of the same shape as infra/mlflow/k8s.yaml, for tests and laptops:
#   * MLflow bound to 127.0.0.1 with --serve-artifacts: clients talk HTTP only and need no S3 credentials;
#   * artifacts proxied to S3, here a local moto S3 server (python -m moto.server) with its bucket created;
#   * the backend store is SQLite, not PostgreSQL (no PostgreSQL server is available on this machine;
#     the Kubernetes and docker-compose recipes use PostgreSQL).
#
#   infra/mlflow/start_local.sh            # prints `export MLFLOW_TRACKING_URI=...`, then runs until Ctrl-C
#
# Settings (environment): PYTHON (default .venv/bin/python of this repository), MLFLOW_PORT (default 5000),
# S3_PORT (default 9000; either port 0 = pick a free one), MLFLOW_BUCKET (default hiar-mlflow),
# MLFLOW_STATE_DIR (SQLite file and logs; default runs/mlflow-local).
# Ctrl-C / SIGTERM / SIGHUP stop everything this script started: each server runs in its own process group
# and the whole group is terminated (MLflow's server spawns uvicorn worker processes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
HOST=127.0.0.1
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
S3_PORT="${S3_PORT:-9000}"
BUCKET="${MLFLOW_BUCKET:-hiar-mlflow}"
STATE_DIR="${MLFLOW_STATE_DIR:-$ROOT/runs/mlflow-local}"

log() { echo "start_local: $*" >&2; }

[ -x "$PYTHON" ] || command -v "$PYTHON" >/dev/null || { log "no Python at $PYTHON (set PYTHON=...)"; exit 2; }
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
[ "$MLFLOW_PORT" = 0 ] && MLFLOW_PORT="$(free_port)"
[ "$S3_PORT" = 0 ] && S3_PORT="$(free_port)"
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"

export MLFLOW_DISABLE_TELEMETRY=true
# MLflow 3's server-side job runner (GenAI scorers; a pool of huey consumer processes) is not used by this
# platform: off by default here, to keep a laptop/test server light. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true
# turns it back on.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
# Credentials for the local moto S3 only: moto accepts any key; these are not secrets.
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export MLFLOW_S3_ENDPOINT_URL="http://$HOST:$S3_PORT"
unset AWS_SESSION_TOKEN AWS_PROFILE AWS_ENDPOINT_URL
PATH="$(dirname "$PYTHON"):$PATH"  # the servers' helper executables (uvicorn) from the same environment

PIDS=()
STOPPING=0
stop_all() {
    [ "$STOPPING" = 1 ] && return
    STOPPING=1
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do  # up to 10 s for a clean shutdown, then SIGKILL what is left
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.2
    done
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    log "stopped"
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM
trap 'stop_all; exit 129' HUP
trap 'stop_all' EXIT

# Job control: every background job below gets a process group of its own (pgid = its pid), so stop_all can
# signal a server together with all its children, and a terminal's Ctrl-C reaches only this script.
set -m

"$PYTHON" -m moto.server -H "$HOST" -p "$S3_PORT" </dev/null >"$STATE_DIR/moto.log" 2>&1 &
PIDS+=("$!")
log "moto S3 on http://$HOST:$S3_PORT (pid $!, log $STATE_DIR/moto.log)"

"$PYTHON" - "$MLFLOW_S3_ENDPOINT_URL" "$BUCKET" <<'PY'
import sys, time
import boto3
from botocore.exceptions import EndpointConnectionError

endpoint, bucket = sys.argv[1], sys.argv[2]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
deadline = time.monotonic() + 60
while True:
    try:
        if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket=bucket)
        break
    except EndpointConnectionError:
        if time.monotonic() > deadline:
            sys.exit(f"moto S3 did not come up at {endpoint}")
        time.sleep(0.3)
PY
log "bucket s3://$BUCKET ready"

"$PYTHON" -m mlflow server \
    --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$STATE_DIR/mlflow.db" \
    --serve-artifacts --artifacts-destination "s3://$BUCKET/artifacts" \
    </dev/null >"$STATE_DIR/mlflow.log" 2>&1 &
PIDS+=("$!")
MLFLOW_PID=$!
log "mlflow server starting (pid $MLFLOW_PID, log $STATE_DIR/mlflow.log)"

URI="http://$HOST:$MLFLOW_PORT"
for _ in $(seq 1 600); do  # up to 120 s: the first start migrates the SQLite schema
    if ! kill -0 "$MLFLOW_PID" 2>/dev/null; then
        log "mlflow server exited; last lines of its log:"; tail -n 20 "$STATE_DIR/mlflow.log" >&2; exit 1
    fi
    if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=1)' "$URI" 2>/dev/null; then
        break
    fi
    sleep 0.2
done
"$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' "$URI" 2>/dev/null \
    || { log "mlflow server did not answer on $URI"; exit 1; }

echo "MLflow is up (backend sqlite:///$STATE_DIR/mlflow.db, artifacts s3://$BUCKET/artifacts via $MLFLOW_S3_ENDPOINT_URL)."
echo "export MLFLOW_TRACKING_URI=$URI"

# Run until a signal arrives (the traps stop everything) or a server dies (then stop the other one too).
while true; do
    for pid in "${PIDS[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then log "a server (pid $pid) exited; stopping"; exit 1; fi
    done
    wait -n 2>/dev/null || true
done
