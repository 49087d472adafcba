#!/usr/bin/env bash
# A Prefect server as the README's production section runs it: on PostgreSQL (Debian's
# packages, its default cluster), with a role and database of its own and password
# authentication; the password is generated once into a root-only file and never
# appears on a command line.
#
#   bash scripts/prefect-server.sh start    # install if needed, create role and db once, start, wait
#   bash scripts/prefect-server.sh stop
#   bash scripts/prefect-server.sh status   # exit 0 when the server answers
#   bash scripts/prefect-server.sh url      # PREFECT_API_URL for workers and launch scripts
#
# PREFECT_XM_SERVER_HOST (127.0.0.1; 0.0.0.0 to serve a cluster's nodes and login nodes)
# and PREFECT_XM_SERVER_PORT (4200). Must run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${PREFECT_XM_SERVER_HOST:-127.0.0.1}
PORT=${PREFECT_XM_SERVER_PORT:-4200}
STATE=/var/lib/prefect-xm/server
SECRET=$STATE/database-password
PIDFILE=$STATE/server.pid
LOG=/var/log/prefect-xm-server.log

log() { printf 'prefect-server: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
api() { printf 'http://%s:%s/api' "$([ "$HOST" = 0.0.0.0 ] && echo 127.0.0.1 || echo "$HOST")" "$PORT"; }
healthy() { .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=5)" "$(api)" 2>/dev/null; }
running() { [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

postgres_up() {
    if ! command -v pg_lsclusters >/dev/null; then
        log "installing Debian's postgresql"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    local version
    version=$(pg_lsclusters -h | awk '$2 == "main" {print $1; exit}')
    [ -n "$version" ] || die "no 'main' PostgreSQL cluster (pg_lsclusters)"
    pg_ctlcluster "$version" main status >/dev/null 2>&1 || pg_ctlcluster "$version" main start >&2
    # its port, from the cluster itself (5432 unless the machine says otherwise)
    pg_lsclusters -h | awk '$2 == "main" {print $3; exit}'
}

role_and_database() {
    install -d -m 0700 "$STATE"
    if [ ! -s "$SECRET" ]; then
        (umask 077; .venv/bin/python -c 'import secrets; print(secrets.token_hex(24))' > "$SECRET")
    fi
    # SQL on stdin, so the password is in no process's argv
    runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 -d postgres >/dev/null <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'prefect') THEN CREATE ROLE prefect LOGIN; END IF;
END \$\$;
ALTER ROLE prefect WITH LOGIN PASSWORD '$(cat "$SECRET")';
SQL
    if ! runuser -u postgres -- psql -tA -d postgres -c "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1; then
        runuser -u postgres -- createdb -O prefect prefect
    fi
}

start() {
    [ -x .venv/bin/python ] || bash scripts/bootstrap.sh
    if running && healthy; then
        log "answering at $(api)"
        return
    fi
    local pg_port
    pg_port=$(postgres_up)
    role_and_database
    log "starting on $HOST:$PORT (database prefect on 127.0.0.1:$pg_port)"
    PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://prefect:$(cat "$SECRET")@127.0.0.1:$pg_port/prefect" \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_UI_API_URL="${PREFECT_XM_SERVER_UI_API_URL:-http://$HOST:$PORT/api}" \
        setsid .venv/bin/prefect server start --host "$HOST" --port "$PORT" >"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 240); do
        healthy && { log "answering at $(api)"; return; }
        running || { tail -n 30 "$LOG" >&2; die "the server exited"; }
        sleep 1
    done
    tail -n 30 "$LOG" >&2
    die "no answer at $(api) after 240 s"
}

stop() {
    running || return 0
    kill "$(cat "$PIDFILE")"
    for _ in $(seq 30); do running || break; sleep 1; done
    running && kill -9 "$(cat "$PIDFILE")"
    rm -f "$PIDFILE"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) running && healthy ;;
    url) api; echo ;;
    *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
