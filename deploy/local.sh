#!/usr/bin/env bash
# catalog-tagger on a local Prefect: a server on 127.0.0.1, the `catalog-tagger-local` process work pool, the
# deployments of deploy/prefect.yaml and one worker. Stays in the foreground; Ctrl-C / SIGTERM stops what it started.
#
#   deploy/local.sh                 # server on 127.0.0.1:4200 (reused if one already answers there)
#   deploy/local.sh --deploy-only   # pool + deployments against the server at PREFECT_API_URL, then exit
#
# Environment: CATALOG_TAGGER_PREFECT_PORT (4200), PREFECT_HOME (Prefect's database and logs: ~/.prefect), and
# the CATALOG_TAGGER_* variables `prefect deploy` reads (deploy/prefect.yaml's header: HOME defaults to this
# checkout, TZ to UTC; the nightly schedule stays paused until SOURCE, OUTPUT and MODEL are all set), and
# CATALOG_TAGGER_NOTIFY_BLOCK: a notification block on that server; set, the alerts of deploy/automations.yaml are
# installed (or updated) after the deploy. Flow runs emit heartbeats (deploy/prefect.yaml's job env).
# Storage credentials: export them (or AWS_PROFILE) here; the worker hands its environment to every flow run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV_BIN="${VENV_BIN:-$ROOT/.venv/bin}"
PREFECT="$VENV_BIN/prefect"
PY="$VENV_BIN/python"
POOL=catalog-tagger-local
PORT="${CATALOG_TAGGER_PREFECT_PORT:-4200}"
DEPLOY_ONLY=0
[[ "${1:-}" == "--deploy-only" ]] && DEPLOY_ONLY=1

export PATH="$VENV_BIN:$PATH"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export RAY_USAGE_STATS_ENABLED=0
if [[ $DEPLOY_ONLY == 0 || -z "${PREFECT_API_URL:-}" ]]; then
    export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
fi

say() { echo "[deploy-local] $*"; }

healthy() {
    "$PY" - "$PREFECT_API_URL/health" <<'PYEOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PYEOF
}

PIDS=()
cleanup() {
    trap - EXIT INT TERM
    if ((${#PIDS[@]})); then
        say "stopping ${PIDS[*]}"
        kill -TERM "${PIDS[@]}" 2>/dev/null || true
        for _ in $(seq 20); do
            kill -0 "${PIDS[@]}" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "${PIDS[@]}" 2>/dev/null || true  # a worker may ignore SIGTERM once its server is gone
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if healthy; then
    say "using the Prefect server already answering at $PREFECT_API_URL"
elif [[ $DEPLOY_ONLY == 1 ]]; then
    say "no Prefect server answers at $PREFECT_API_URL"; exit 1
else
    say "starting a Prefect server on 127.0.0.1:$PORT (PREFECT_HOME=${PREFECT_HOME:-~/.prefect})"
    "$PREFECT" server start --host 127.0.0.1 --port "$PORT" &
    PIDS+=($!)
    for i in $(seq 180); do
        healthy && break
        kill -0 "${PIDS[0]}" 2>/dev/null || { say "the server exited"; exit 1; }
        ((i == 180)) && { say "the server did not answer $PREFECT_API_URL/health in 90 s"; exit 1; }
        sleep 0.5
    done
    say "server healthy at $PREFECT_API_URL"
fi

"$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1 || "$PREFECT" work-pool create "$POOL" --type process
"$PREFECT" --no-prompt deploy --prefect-file deploy/prefect.yaml --all
say "deployed: nightly-tagging/local (cron 0 2 * * * ${CATALOG_TAGGER_TZ:-UTC}), backfill/local, train-model/local"
if [[ -n "${CATALOG_TAGGER_NOTIFY_BLOCK:-}" ]]; then
    "$PY" -m flows.alerts --block "$CATALOG_TAGGER_NOTIFY_BLOCK"
    say "alerts installed (deploy/automations.yaml) with notification block $CATALOG_TAGGER_NOTIFY_BLOCK"
else
    say "no alerts: set CATALOG_TAGGER_NOTIFY_BLOCK to a notification block's name to install deploy/automations.yaml"
fi

if [[ $DEPLOY_ONLY == 1 ]]; then
    exit 0
fi
"$PREFECT" worker start --pool "$POOL" --type process &
PIDS+=($!)
say "worker started; run one now with:"
say "  PREFECT_API_URL=$PREFECT_API_URL prefect deployment run 'nightly-tagging/local' -p source=... -p output=... -p model=... --watch"
wait -n "${PIDS[@]}"
say "a child exited; stopping"
exit 1
