#!/usr/bin/env bash
# Slurm's own Torque-compatible qsub/qstat/qdel (Debian `slurm-wlm-torque`, Perl
# wrappers over the running Slurm), unpacked into a project-owned folder instead of
# being installed: the package's /usr/bin/qsub conflicts with gridengine-client's.
#
#   bash scripts/torque-wrappers.sh          # install if needed (idempotent), print the bin dir
#   bash scripts/torque-wrappers.sh status   # exit 0 if the wrappers answer
#
# The wrappers need Slurm's Perl bindings (libslurm-perl, libslurmdb-perl) and
# libswitch-perl: separate packages, installed with apt (they conflict with nothing).
# Must run as root. Used by tests/test_pbs_worker_e2e.py (TestTorqueWorker).
set -euo pipefail

PREFIX=${TORQUE_WRAPPERS_DIR:-/opt/prefect-xm/slurm-torque}
BIN=$PREFIX/usr/bin
log() { printf 'torque-wrappers: %s\n' "$*" >&2; }

wrappers_work() {
    [ -x "$BIN/qstat" ] && perl -e 'use Slurm; use Slurmdb; use Switch;' 2>/dev/null
}

if [ "${1:-install}" = status ]; then
    wrappers_work && "$BIN/qstat" -u "$(id -un)" >/dev/null 2>&1
    exit $?
fi

if ! perl -e 'use Slurm; use Slurmdb; use Switch;' 2>/dev/null; then
    log "installing Slurm's Perl bindings (libslurm-perl libslurmdb-perl libswitch-perl)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq libslurm-perl libslurmdb-perl libswitch-perl >/dev/null \
        || { apt-get update -qq >/dev/null && apt-get install -y -qq libslurm-perl libslurmdb-perl libswitch-perl >/dev/null; }
fi

if [ ! -x "$BIN/qstat" ]; then
    log "unpacking slurm-wlm-torque into $PREFIX (not installed: it conflicts with gridengine-client)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    chmod 755 "$tmp"  # apt's _apt user writes the download here
    (cd "$tmp" && { apt-get download slurm-wlm-torque >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get download slurm-wlm-torque >/dev/null; }; })
    mkdir -p "$PREFIX"
    dpkg -x "$tmp"/slurm-wlm-torque_*.deb "$PREFIX"
fi

# The wrappers call "${FindBin::Bin}/sbatch" (their own folder): point it at Slurm's.
for tool in sbatch salloc srun; do
    real=$(command -v "$tool" || true)
    [ -n "$real" ] && [ ! -e "$BIN/$tool" ] && ln -s "$real" "$BIN/$tool"
done

wrappers_work || { log "ERROR: the wrappers in $BIN do not load"; exit 1; }
echo "$BIN"
