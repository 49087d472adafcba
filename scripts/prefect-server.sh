#!/usr/bin/env bash
# A Prefect server as the production docs (docs/production.md) run it: on PostgreSQL (Debian's
# packages, its default cluster), with a role and database of its own and password
# authentication; the password is generated once into a root-only file and never
# appears on a command line.
#
#   bash scripts/prefect-server.sh start    # install if needed, create role and db once, start, wait
#   bash scripts/prefect-server.sh start --workers 2   # the multi-process topology (below)
#   bash scripts/prefect-server.sh stop     # every process it started
#   bash scripts/prefect-server.sh status   # exit 0 when every process runs and the API answers
#   bash scripts/prefect-server.sh url      # PREFECT_API_URL for workers and launch scripts
#
# PREFECT_XM_SERVER_HOST (127.0.0.1; 0.0.0.0 to serve a cluster's nodes and login nodes)
# and PREFECT_XM_SERVER_PORT (4200). Must run as root.
#
# The multi-process topology (`--workers N` or PREFECT_XM_SERVER_WORKERS=N, N > 1) is
# Prefect's "scale self-hosted Prefect": N API server processes sharing one port (what
# `prefect server start --workers N` runs: uvicorn's supervisor and N workers, the API
# only), the background services in a process of their own (`prefect server services
# start`), and Redis (Debian's redis-server, installed if missing) as messaging broker and
# cache, event ordering, lease storage and Docket's store, on 127.0.0.1 only, with a
# password (a root-only file, like the database's). Migrations and block types are done
# once before the API processes start: N processes each doing them at once race (block
# registration fails on duplicate keys). The server's Python needs prefect-redis
# (`pip install 'prefect-xm[redis]'`).
#
# Also read: PREFECT_XM_REDIS_PORT (6380: Debian's own redis-server service, where it
# runs, has 6379), PREFECT_XM_SERVER_WORKER_HEALTHCHECK (120: seconds an API process may
# not answer its supervisor before it is replaced; why, in start_topology),
# PREFECT_XM_SERVER_STATE (/var/lib/prefect-xm/server: pid files and passwords),
# PREFECT_XM_SERVER_LOGS (/var/log), PREFECT_XM_SERVER_VENV (.venv: the Python that runs
# the server). PREFECT_SERVER_DATABASE_CONNECTION_URL, when set (in the environment: never
# on a command line), is the database to use instead of this machine's PostgreSQL (a
# managed one; the tests' own).
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${PREFECT_XM_SERVER_HOST:-127.0.0.1}
PORT=${PREFECT_XM_SERVER_PORT:-4200}
WORKERS=${PREFECT_XM_SERVER_WORKERS:-1}
REDIS_PORT=${PREFECT_XM_REDIS_PORT:-6380}
VENV=${PREFECT_XM_SERVER_VENV:-.venv}
STATE=${PREFECT_XM_SERVER_STATE:-/var/lib/prefect-xm/server}
LOGS=${PREFECT_XM_SERVER_LOGS:-/var/log}
SECRET=$STATE/database-password
REDIS_SECRET=$STATE/redis-password
PIDFILE=$STATE/server.pid
SERVICES_PIDFILE=$STATE/services.pid
REDIS_PIDFILE=$STATE/redis.pid
LOG=$LOGS/prefect-xm-server.log
SERVICES_LOG=$LOGS/prefect-xm-services.log
REDIS_LOG=$LOGS/prefect-xm-redis.log
PY=$VENV/bin/python

log() { printf 'prefect-server: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
api() { printf 'http://%s:%s/api' "$([ "$HOST" = 0.0.0.0 ] && echo 127.0.0.1 || echo "$HOST")" "$PORT"; }
healthy() { "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=5)" "$(api)" 2>/dev/null; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running() { alive "$PIDFILE"; }

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
        (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(24))' > "$SECRET")
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

# Sets DB_URL and DB_WHERE: the database the server uses.
prepare_database() {
    if [ -n "${PREFECT_SERVER_DATABASE_CONNECTION_URL:-}" ]; then
        DB_URL=$PREFECT_SERVER_DATABASE_CONNECTION_URL
        DB_WHERE="the database PREFECT_SERVER_DATABASE_CONNECTION_URL names"
        return
    fi
    local pg_port
    pg_port=$(postgres_up)
    role_and_database
    DB_URL="postgresql+asyncpg://prefect:$(cat "$SECRET")@127.0.0.1:$pg_port/prefect"
    DB_WHERE="database prefect on 127.0.0.1:$pg_port"
}

ensure_python() {
    if [ ! -x "$PY" ]; then
        [ "$VENV" = .venv ] || die "no $PY (PREFECT_XM_SERVER_VENV)"
        bash scripts/bootstrap.sh
    fi
}

start() {
    if [ "$WORKERS" -gt 1 ]; then
        start_topology
        return
    fi
    ensure_python
    if running && healthy; then
        log "answering at $(api)"
        return
    fi
    prepare_database
    log "starting on $HOST:$PORT ($DB_WHERE)"
    PREFECT_SERVER_DATABASE_CONNECTION_URL="$DB_URL" \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_UI_API_URL="${PREFECT_XM_SERVER_UI_API_URL:-http://$HOST:$PORT/api}" \
        setsid "$VENV/bin/prefect" server start --host "$HOST" --port "$PORT" >"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    for _ in $(seq 240); do
        healthy && { log "answering at $(api)"; return; }
        running || { tail -n 30 "$LOG" >&2; die "the server exited"; }
        sleep 1
    done
    tail -n 30 "$LOG" >&2
    die "no answer at $(api) after 240 s"
}

# -- the multi-process topology ----------------------------------------------------------

redis_answers() {
    [ -s "$REDIS_SECRET" ] &&
        REDISCLI_AUTH=$(cat "$REDIS_SECRET") redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG
}

redis_up() {
    if ! command -v redis-server >/dev/null; then
        log "installing Debian's redis-server"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    fi
    if [ ! -s "$REDIS_SECRET" ]; then
        (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(24))' > "$REDIS_SECRET")
    fi
    if alive "$REDIS_PIDFILE" && redis_answers; then
        return
    fi
    # The configuration, password included, on stdin (`redis-server -`): in no argv. Nothing
    # is saved to disk: Prefect's state is in PostgreSQL; Redis carries what is in flight.
    setsid redis-server - >"$REDIS_LOG" 2>&1 <<CONF &
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
requirepass $(cat "$REDIS_SECRET")
dir $STATE
save ""
appendonly no
daemonize no
CONF
    echo $! > "$REDIS_PIDFILE"
    for _ in $(seq 60); do
        redis_answers && return
        alive "$REDIS_PIDFILE" || { tail -n 20 "$REDIS_LOG" >&2; die "redis-server exited"; }
        sleep 1
    done
    tail -n 20 "$REDIS_LOG" >&2
    die "redis-server does not answer on 127.0.0.1:$REDIS_PORT after 60 s"
}

# Exports the topology's settings: call it only in a subshell, so that the passwords are in
# the environment of the server's processes alone (and never in an argv).
server_env() {
    local redis="redis://:$(cat "$REDIS_SECRET")@127.0.0.1:$REDIS_PORT"
    unset PREFECT_API_URL  # the server's processes talk to no other server
    export PREFECT_SERVER_DATABASE_CONNECTION_URL="$DB_URL"
    export PREFECT_SERVER_ANALYTICS_ENABLED=false
    export PREFECT_SERVER_UI_API_URL="${PREFECT_XM_SERVER_UI_API_URL:-http://$HOST:$PORT/api}"
    export PREFECT_MESSAGING_BROKER=prefect_redis.messaging
    export PREFECT_MESSAGING_CACHE=prefect_redis.messaging
    export PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=prefect_redis.ordering
    export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage
    export PREFECT_REDIS_MESSAGING_URL="$redis/0"
    # Docket (the services' task queue): the processes share one, not one in memory each
    export PREFECT_SERVER_DOCKET_URL="$redis/1"
    # done once, below, before the API processes start
    export PREFECT_API_DATABASE_MIGRATE_ON_START=false
    export PREFECT_API_BLOCKS_REGISTER_ON_START=false
}

start_topology() {
    ensure_python
    "$PY" -c 'import prefect_redis' 2>/dev/null ||
        die "$PY has no prefect-redis: pip install 'prefect-xm[redis]' (or prefect-redis) there"
    if running && healthy && alive "$SERVICES_PIDFILE" && redis_answers; then
        log "answering at $(api)"
        return
    fi
    if running && [ ! -f "$STATE/workers" ]; then
        die "a single-process server runs already (pid $(cat "$PIDFILE")): stop it first"
    fi
    if running || alive "$SERVICES_PIDFILE" || alive "$REDIS_PIDFILE"; then
        log "not every process of the topology runs: restarting them all"
        stop
    fi
    install -d -m 0700 "$STATE"
    local started=$SECONDS
    prepare_database
    redis_up
    log "redis-server answering on 127.0.0.1:$REDIS_PORT"
    : > "$LOG"
    (server_env; exec "$PY" -m prefect server database upgrade -y) >>"$LOG" 2>&1 < /dev/null ||
        { tail -n 30 "$LOG" >&2; die "the database migrations failed"; }
    # What each API process's start would do (prefect.server.api.server's lifespan), once.
    (server_env; exec "$PY" -) >>"$LOG" 2>&1 <<'PY' || { tail -n 30 "$LOG" >&2; die "registering block types failed"; }
import asyncio

from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration


async def register() -> None:
    async with await provide_database_interface().session() as session:
        await run_block_auto_registration(session=session)


asyncio.run(register())
print("block types registered")
PY
    log "starting $WORKERS API processes on $HOST:$PORT and the services ($DB_WHERE)"
    echo "$WORKERS" > "$STATE/workers"
    # `prefect server start --workers N` runs uvicorn's process supervisor with its default
    # worker healthcheck: a worker that does not answer a ping within 5 s is killed and
    # replaced. On a busy 2-core machine a worker still importing Prefect misses it, and
    # its replacement does too: measured here, the second API process was replaced every
    # few seconds and the API took 402 s to answer. So this runs the command `prefect
    # server start --workers N --background` runs (uvicorn, Prefect's app factory, the API
    # only) in the foreground, with a longer healthcheck.
    (server_env; export PREFECT__SERVER_FINAL=1 PREFECT__SERVER_WEBSERVER_ONLY=1
     exec setsid "$PY" -m uvicorn --factory prefect.server.api.server:create_app --host "$HOST" --port "$PORT" \
        --workers "$WORKERS" --timeout-worker-healthcheck "${PREFECT_XM_SERVER_WORKER_HEALTHCHECK:-120}") \
        >>"$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
    (server_env; exec setsid "$VENV/bin/prefect" server services start) >"$SERVICES_LOG" 2>&1 < /dev/null &
    echo $! > "$SERVICES_PIDFILE"
    for _ in $(seq 240); do
        alive "$SERVICES_PIDFILE" || { tail -n 30 "$SERVICES_LOG" >&2; die "the services process exited"; }
        running || { tail -n 30 "$LOG" >&2; die "the server exited"; }
        if healthy; then
            log "answering at $(api) ($WORKERS API processes, services, redis; $((SECONDS - started)) s)"
            return
        fi
        sleep 1
    done
    tail -n 30 "$LOG" >&2
    die "no answer at $(api) after 240 s"
}

# Stops the process a pid file names and its process group (each was started by setsid,
# so the group is its own: the API's worker processes are in it).
stop_group() {
    local pidfile=$1 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 -- "-$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop() {
    stop_group "$SERVICES_PIDFILE"
    stop_group "$PIDFILE"
    stop_group "$REDIS_PIDFILE"
    rm -f "$STATE/workers"
}

status() {
    running && healthy || return 1
    if [ -f "$STATE/workers" ]; then
        alive "$SERVICES_PIDFILE" && redis_answers
    fi
}

case "${1:-}" in
    start)
        if [ "${2:-}" = --workers ] && [ -n "${3:-}" ]; then
            WORKERS=$3
        elif [ -n "${2:-}" ]; then
            echo "usage: $0 start [--workers N]" >&2; exit 2
        fi
        [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers / PREFECT_XM_SERVER_WORKERS: a whole number >= 1, not '$WORKERS'"
        start ;;
    stop) stop ;;
    status) status ;;
    url) api; echo ;;
    *) echo "usage: $0 start [--workers N]|stop|status|url" >&2; exit 2 ;;
esac
