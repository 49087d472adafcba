#!/usr/bin/env bash
# A PostgreSQL server for the test suite's Prefect servers (Debian's postgresql), in a
# data directory and on a port of its own, so a machine's own PostgreSQL is untouched.
#
#   bash scripts/postgres-cluster.sh start    # install if needed, initdb once, start, wait
#   bash scripts/postgres-cluster.sh stop
#   bash scripts/postgres-cluster.sh status   # exit 0 when it answers
#   bash scripts/postgres-cluster.sh url      # the SQLAlchemy URL of its server (no database)
#
# Why: the suite runs its end-to-end tests side by side, each pytest-xdist process with
# its own Prefect server. On SQLite, a server whose worker submits while the test creates
# runs answers `503 database is locked` (WAL snapshot conflicts that busy_timeout cannot
# wait out) and clients back off for seconds; each server gets a database of its own here.
# Test-only settings: trust authentication on 127.0.0.1 only, and fsync off (a crash
# loses a throwaway test database, nothing else).
# Must run as root.
set -euo pipefail

PORT=${PREFECT_XM_PG_PORT:-55432}
DATA=/var/lib/prefect-xm/postgres
LOG=/var/log/prefect-xm-postgres.log

log() { printf 'postgres-cluster: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

bin_dir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }

install_packages() {
    [ -n "$(bin_dir)" ] && return
    log "installing Debian's postgresql"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    [ -n "$(bin_dir)" ] || die "postgresql installed, but no /usr/lib/postgresql/*/bin"
}

as_postgres() { runuser -u postgres -- "$@"; }

answering() { as_postgres "$(bin_dir)/pg_isready" -q -h 127.0.0.1 -p "$PORT"; }

start() {
    install_packages
    if answering; then
        log "answering on 127.0.0.1:$PORT"
        return
    fi
    local bin
    bin=$(bin_dir)
    if [ ! -f "$DATA/PG_VERSION" ]; then
        log "initdb $DATA"
        install -d -o postgres -g postgres -m 0700 "$DATA"
        as_postgres "$bin/initdb" -D "$DATA" -U postgres -A trust --no-sync -E UTF8 >/dev/null
    fi
    touch "$LOG" && chown postgres:postgres "$LOG"
    log "starting on 127.0.0.1:$PORT"
    # -w waits until it accepts connections (60 s by default).
    as_postgres "$bin/pg_ctl" -D "$DATA" -l "$LOG" -w -t 120 start -o \
        "-p $PORT -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400" \
        >/dev/null || { tail -n 20 "$LOG" >&2; die "postgres did not start"; }
    answering || die "postgres started but does not answer on 127.0.0.1:$PORT"
    log "answering on 127.0.0.1:$PORT"
}

stop() {
    [ -f "$DATA/PG_VERSION" ] || return 0
    as_postgres "$(bin_dir)/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null 2>&1 || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) [ -n "$(bin_dir)" ] && answering ;;
    url) echo "postgresql+asyncpg://postgres@127.0.0.1:$PORT" ;;
    *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
