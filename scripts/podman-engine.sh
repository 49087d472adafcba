#!/usr/bin/env bash
# A Docker-compatible engine for the tests that build images for real: Debian's podman
# (4.3) serving the Docker API on a unix socket (rootful), and a local base image with a
# Python that pip installs into, made once per machine from the Debian mirror apt uses
# (there is no registry to pull python:3.11-slim from).
#
#   bash scripts/podman-engine.sh start       # install if needed, start the API, make the base image
#   bash scripts/podman-engine.sh stop        # stop the API service (images stay)
#   bash scripts/podman-engine.sh status      # exit 0 when the API answers and the base image exists
#   bash scripts/podman-engine.sh base-image  # make the base image if needed; print its name
#   bash scripts/podman-engine.sh docker-host # print the DOCKER_HOST value of the API
#
# Then: DOCKER_HOST=$(bash scripts/podman-engine.sh docker-host), and
# xm.python_container(..., base_image=$(bash scripts/podman-engine.sh base-image)).
#
# Must run as root. Facts behind the choices (Debian 12 in a VM without CAP_SYS_RESOURCE,
# cgroup v1 with a cgroup2 mount beside it):
# - crun refuses to start containers there ("cgroups in hybrid mode not supported"):
#   runc does, so the engine's runtime is runc;
# - podman asks for 1048576 open files and processes in each container, more than this
#   machine's hard limits (crun/runc: "setrlimit RLIMIT_NOFILE: Operation not permitted"):
#   containers get the hard limit on open files and 32768 processes (the limit podman's
#   own process has).
# Both go in a drop-in of podman's configuration, so the `podman` command agrees with the
# API service. TLS to PyPI may go through an intercepting proxy: the base image trusts the
# extra CAs this machine trusts (/usr/local/share/ca-certificates), and its pip uses the
# system bundle.
set -euo pipefail

SOCK=${PREFECT_XM_PODMAN_SOCK:-/run/podman/podman.sock}
CONF=/etc/containers/containers.conf.d/prefect-xm.conf
PIDFILE=/run/podman/prefect-xm-service.pid
LOG=/var/log/prefect-xm-podman.log
READY_TIMEOUT=${PODMAN_READY_TIMEOUT:-60}

log() { printf 'podman-engine: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Seconds since an $EPOCHREALTIME stamp, to the millisecond.
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2fs", b - a }'; }

codename() { (. /etc/os-release && echo "${VERSION_CODENAME:?}"); }

base_image() { echo "localhost/prefect-xm-base:$(codename)"; }

packages_present() {
    command -v podman >/dev/null 2>&1 && command -v runc >/dev/null 2>&1 &&
        command -v debootstrap >/dev/null 2>&1
}

install_packages() {
    packages_present && return
    local t=$EPOCHREALTIME
    log "installing podman runc debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc debootstrap >/dev/null
    packages_present || die "podman, runc or debootstrap missing after apt-get install"
    log "installed in $(elapsed "$t")"
}

configure() {
    local hard_nofile want
    hard_nofile=$(ulimit -Hn)
    [ "$hard_nofile" = unlimited ] && hard_nofile=1048576
    want=$(printf '# written by prefect-xm scripts/podman-engine.sh (see its header)\n[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n\n[engine]\nruntime = "runc"\n' \
        "$hard_nofile" "$hard_nofile")
    if [ "$(cat "$CONF" 2>/dev/null)" != "$want" ]; then
        log "writing $CONF (runtime runc, ulimits within this machine's)"
        mkdir -p "$(dirname "$CONF")"
        printf '%s\n' "$want" >"$CONF"
    fi
}

answering() { podman --remote --url "unix://$SOCK" version >/dev/null 2>&1; }

service_pid() {
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
    return 0
}

start_service() {
    if answering; then
        log "API answering on unix://$SOCK"
        return
    fi
    local t=$EPOCHREALTIME pid
    log "starting podman system service on unix://$SOCK (log: $LOG)"
    mkdir -p "$(dirname "$SOCK")" "$(dirname "$PIDFILE")"
    # --time=0: it never exits for being idle.
    setsid podman system service --time=0 "unix://$SOCK" >>"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    local deadline=$((SECONDS + READY_TIMEOUT))
    until answering; do
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$LOG" >&2; die "podman system service exited"; }
        [ "$SECONDS" -lt "$deadline" ] || { tail -n 20 "$LOG" >&2; die "no answer on unix://$SOCK after ${READY_TIMEOUT}s"; }
        sleep 0.2
    done
    log "API answering on unix://$SOCK after $(elapsed "$t")"
}

# The first deb mirror apt uses for this release (no host name written here).
mirror() {
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
        awk -v s="$(codename)" '$2 == s && !found { print $1; found = 1 }'
}

make_base_image() {
    local image
    image=$(base_image)
    if podman image exists "$image"; then
        return
    fi
    local t=$EPOCHREALTIME site root
    site=$(mirror)
    if [ -z "$site" ]; then
        apt-get update -qq
        site=$(mirror)
    fi
    [ -n "$site" ] || die "no deb mirror for $(codename) in apt's sources"
    root=$(mktemp -d /var/tmp/prefect-xm-base.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" EXIT
    log "making $image: debootstrap $(codename) from $site (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$(codename)" "$root" "$site" \
        >"$root.log" 2>&1 || { tail -n 20 "$root.log" >&2; die "debootstrap failed (log: $root.log)"; }
    rm -f "$root.log"
    # The CAs this machine adds (an intercepting proxy's among them) are trusted inside.
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null 2>&1
    fi
    # The image's `python` is a venv's: Debian's own python3 refuses `pip install` (PEP 668).
    chroot "$root" python3 -m venv /opt/venv
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/*
    local out
    out=$(tar -C "$root" -c . | podman import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python"]' - "$image" 2>&1) || die "podman import failed: $out"
    rm -rf "$root"
    trap - EXIT
    log "made $image in $(elapsed "$t")"
}

smoke_test() {
    local out
    out=$(podman run --rm --network=none "$(base_image)" python -c 'import sys, venv; print(sys.prefix)' 2>&1) ||
        die "a container of $(base_image) does not run: $out"
    [ "$out" = /opt/venv ] || die "python in $(base_image) is not the venv's: $out"
}

cmd_start() {
    install_packages
    configure
    start_service
    make_base_image
    smoke_test
    log "ready: DOCKER_HOST=unix://$SOCK, base image $(base_image)"
}

cmd_stop() {
    local pid
    pid=$(service_pid)
    if [ -z "$pid" ]; then
        answering && log "the API on unix://$SOCK was not started by this script; left running"
        return 0
    fi
    kill "$pid"
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || die "podman system service ($pid) did not stop"
        sleep 0.2
    done
    rm -f "$PIDFILE"
    log "stopped"
}

cmd_status() {
    packages_present || { log "podman is not installed"; return 1; }
    answering || { log "no API on unix://$SOCK"; return 1; }
    podman image exists "$(base_image)" || { log "no base image $(base_image)"; return 1; }
    log "API on unix://$SOCK, base image $(base_image)"
}

cmd_base_image() {
    install_packages
    configure
    make_base_image
    base_image
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    base-image) cmd_base_image ;;
    docker-host) echo "unix://$SOCK" ;;
    *)
        echo "usage: $0 start|stop|status|base-image|docker-host" >&2
        exit 2
        ;;
esac
