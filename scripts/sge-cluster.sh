#!/usr/bin/env bash
# Single-node Son of Grid Engine 8.1.9 (Debian gridengine-master/-exec/-client) for
# tests, on machines where systemd is not PID 1, so the daemons are started by hand.
#
#   bash scripts/sge-cluster.sh start    # install if needed, start, configure, smoke test
#   bash scripts/sge-cluster.sh stop     # stop sge_execd + sge_qmaster
#   bash scripts/sge-cluster.sh status   # exit 0 and print `qstat -f` if the queue is up
#
# Must run as root. It coexists with scripts/slurm-cluster.sh: SGE listens on 6444/6445
# (sge_qmaster/sge_execd), Slurm on 6817/6818. Facts behind the choices:
# /work/shared/SCHEDULERS.md ("Single-node SGE without systemd").
set -euo pipefail

export SGE_ROOT=/var/lib/gridengine
export SGE_CELL=default
COMMON=$SGE_ROOT/$SGE_CELL/common
RUN_DIR=/var/run/gridengine
QMASTER_SPOOL=/var/spool/gridengine/qmaster
EXECD_SPOOL=/var/spool/gridengine/execd
QUEUE=all.q
PE=smp
# The test suite's classes run side by side and their jobs mostly sleep: 4 slots per CPU.
SLOTS=${SGE_SLOTS:-$(($(nproc) * 4))}
READY_TIMEOUT=${SGE_READY_TIMEOUT:-60}
SMOKE_TIMEOUT=${SGE_SMOKE_TIMEOUT:-60}
NODE=$(hostname)

# Seconds since an $EPOCHREALTIME stamp, to the millisecond.
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2fs", b - a }'; }

log() { printf 'sge-cluster: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Only exact program names are matched (never a pattern over command lines).
daemon_pid() { pgrep -x "$1" | head -n1 || true; }

packages_present() {
    [ -x /usr/sbin/sge_qmaster ] && [ -x /usr/sbin/sge_execd ] &&
        command -v qsub >/dev/null 2>&1 && command -v qconf >/dev/null 2>&1 &&
        [ -f "$COMMON/bootstrap" ]
}

install_packages() {
    if packages_present; then
        return
    fi
    # /usr/bin/qsub of Slurm's torque wrappers would collide with gridengine-client's.
    if dpkg-query -W -f='${Status}' slurm-wlm-torque 2>/dev/null | grep -q '^install ok installed'; then
        die "slurm-wlm-torque is installed system-wide; its /usr/bin/qsub conflicts with gridengine-client (unpack it with dpkg -x into its own folder instead)"
    fi
    log "installing gridengine-master gridengine-exec gridengine-client"
    # The postinst creates the cell (spool, bootstrap, act_qmaster) from these answers.
    debconf-set-selections <<EOF
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string $SGE_CELL
gridengine-common shared/gridenginemaster string $NODE
gridengine-client shared/gridengineconfig boolean true
gridengine-client shared/gridenginecell string $SGE_CELL
gridengine-client shared/gridenginemaster string $NODE
EOF
    # The postinst scripts try to start the daemons through invoke-rc.d; we start them
    # ourselves, so forbid that for the duration of the install (as slurm-cluster.sh does).
    local policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        trap "rm -f '$policy'" EXIT
    else
        policy=""
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        gridengine-master gridengine-exec gridengine-client >&2
    if [ -n "$policy" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    packages_present || die "gridengine installed but sge_qmaster/sge_execd/qsub or $COMMON/bootstrap missing"
}

# `timeout`: a client can hang when qmaster is half up.
qstat_works() { timeout 10 qstat >/dev/null 2>&1; }

queue_up() {
    # Looks at the processes first: with no qmaster, clients retry for a while.
    [ -n "$(daemon_pid sge_qmaster)" ] || return 1
    [ -n "$(daemon_pid sge_execd)" ] || return 1
    qstat_works || return 1
    # The queue instance exists and is not in an unusable state (a = alarm or
    # unknown load, u = execd unheard, E = error, d = disabled, s/S/C = suspended).
    local line
    line=$(timeout 10 qstat -f -q "$QUEUE" 2>/dev/null | awk -v q="$QUEUE@" 'index($1, q) == 1 { print; exit }')
    [ -n "$line" ] || return 1
    QUEUE_STATE=$(echo "$line" | awk '{ print $6 }')
    case "$QUEUE_STATE" in
        *[auEdsSCD]*) return 1 ;;
    esac
    # The config this script applies (the scheduler interval is its cheapest marker,
    # and the queue's slots, which changed since).
    timeout 10 qconf -ssconf 2>/dev/null | grep -Eq '^schedule_interval +0:0:1$' || return 1
    timeout 10 qconf -sq "$QUEUE" 2>/dev/null | grep -Eq "^slots +$SLOTS\$"
}

wait_gone() {
    local deadline=$((SECONDS + $1)) pid
    shift
    for pid in "$@"; do
        while pid_alive "$pid"; do
            [ "$SECONDS" -lt "$deadline" ] || return 1
            sleep 0.1
        done
    done
}

stop_daemons() {
    local pid pids=()
    pid=$(daemon_pid sge_execd)
    if [ -n "$pid" ]; then
        log "stopping sge_execd (pid $pid)"
        # SIGTERM: execd shuts down and leaves running jobs' shepherds alone.
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    fi
    pid=$(daemon_pid sge_qmaster)
    if [ -n "$pid" ]; then
        log "stopping sge_qmaster (pid $pid)"
        # Like `qconf -km`, qmaster takes ~9 s to exit after SIGTERM; it must be gone
        # before a new one starts (the new one would find the port taken).
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    fi
    [ "${#pids[@]}" -gt 0 ] || return 0
    if ! wait_gone 30 "${pids[@]}"; then
        log "SGE daemons ignored SIGTERM for 30 s; sending SIGKILL"
        kill -KILL "${pids[@]}" 2>/dev/null || true
        wait_gone 10 "${pids[@]}" || die "SGE daemons (pids ${pids[*]}) do not exit"
    fi
}

prepare_host() {
    # /etc/hosts may map 127.0.0.1 to `localhost` first; qmaster then refuses every
    # client ("client IP resolved to host name localhost"). The alias makes both the same host.
    local aliases="$NODE localhost"
    if [ "$(cat "$COMMON/host_aliases" 2>/dev/null)" != "$aliases" ]; then
        printf '%s\n' "$aliases" >"$COMMON/host_aliases"
        chmod 0644 "$COMMON/host_aliases"
    fi
    # A package installed under another host name points at that master.
    if [ "$(cat "$COMMON/act_qmaster" 2>/dev/null)" != "$NODE" ]; then
        printf '%s\n' "$NODE" >"$COMMON/act_qmaster"
        chown sgeadmin:sgeadmin "$COMMON/act_qmaster"
    fi
    install -d -o sgeadmin -g sgeadmin -m 0755 "$RUN_DIR"
}

start_qmaster() {
    log "starting sge_qmaster"
    # Daemonizes itself; its messages go to $QMASTER_SPOOL/messages.
    /usr/sbin/sge_qmaster 9>&- </dev/null >/dev/null 2>&1 || {
        tail -n 20 "$QMASTER_SPOOL/messages" >&2 || true
        die "sge_qmaster failed to start"
    }
    local deadline=$((SECONDS + READY_TIMEOUT))
    until qstat_works; do
        if [ -z "$(daemon_pid sge_qmaster)" ]; then
            tail -n 20 "$QMASTER_SPOOL/messages" >&2 || true
            die "sge_qmaster exited during startup (log: $QMASTER_SPOOL/messages)"
        fi
        [ "$SECONDS" -lt "$deadline" ] || die "qstat does not answer ${READY_TIMEOUT}s after sge_qmaster started"
        sleep 0.2
    done
}

# qconf -M* reads a file whose base name is the object's name (`global`, `all.q`...).
CONF_TMP=""
make_conf_dir() {
    [ -n "$CONF_TMP" ] && return
    CONF_TMP=$(mktemp -d)
    trap "rm -rf '$CONF_TMP'" EXIT
}
conf_file() { echo "$CONF_TMP/$1"; }

configure() {
    local f
    # Jobs may be submitted from this host; root may run jobs (min_uid/min_gid 0);
    # accounting is flushed every second (qacct lags by flush_time otherwise, 15 s).
    timeout 10 qconf -ss 2>/dev/null | grep -qx "$NODE" || qconf -as "$NODE" >/dev/null
    f=$(conf_file global)
    qconf -sconf global >"$f"
    sed -i -e 's/^min_uid .*/min_uid                      0/' \
        -e 's/^min_gid .*/min_gid                      0/' \
        -e 's/flush_time=[0-9:]*/flush_time=00:00:01/' "$f"
    qconf -Mconf "$f" >/dev/null
    # The scheduler runs every second (15 s by default), so queued jobs start at once.
    f=$(conf_file scheduler)
    qconf -ssconf >"$f"
    sed -i -e 's/^schedule_interval .*/schedule_interval                 0:0:1/' "$f"
    qconf -Msconf "$f" >/dev/null
    # A parallel environment for multi-slot jobs (`-pe smp N`).
    f=$(conf_file "$PE")
    cat >"$f" <<EOF
pe_name            $PE
slots              999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    \$pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
EOF
    if timeout 10 qconf -spl 2>/dev/null | grep -qx "$PE"; then
        qconf -Mp "$f" >/dev/null
    else
        qconf -Ap "$f" >/dev/null
    fi
}

write_queue() {
    local f
    f=$(conf_file "$QUEUE")
    # The full queue record (qconf -Aq wants every attribute). No load thresholds: on a
    # busy 2-CPU test machine the default np_load_avg=1.75 would put the queue in alarm.
    cat >"$f" <<EOF
qname                 $QUEUE
hostlist              $NODE
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               $PE
rerun                 FALSE
slots                 $SLOTS
tmpdir                /tmp
shell                 /bin/bash
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
    if timeout 10 qconf -sql 2>/dev/null | grep -qx "$QUEUE"; then
        qconf -Mq "$f" >/dev/null
    else
        qconf -Aq "$f" >/dev/null
    fi
}

start_execd() {
    # A machine reused after a reboot or a killed run keeps the execd spool's job records;
    # with no shepherd left to own them they are dead, and an execd that starts on them
    # can keep new jobs from reporting their end. Cleared only when no job runs.
    local spool
    if [ -z "$(daemon_pid sge_shepherd)" ]; then
        for spool in "$EXECD_SPOOL"/*/; do
            [ -d "$spool/active_jobs" ] || continue
            if [ -n "$(find "$spool/active_jobs" "$spool/jobs" "$spool/job_scripts" -mindepth 1 -maxdepth 1 2>/dev/null | head -n1)" ]; then
                log "clearing stale job records in ${spool%/}"
                rm -rf "$spool/active_jobs/"* "$spool/jobs/"* "$spool/job_scripts/"*
            fi
        done
    fi
    log "starting sge_execd"
    /usr/sbin/sge_execd 9>&- </dev/null >/dev/null 2>&1 || die "sge_execd failed to start"
}

wait_queue_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT)) state last="<none>"
    while :; do
        state=$(timeout 10 qstat -f -q "$QUEUE" 2>/dev/null | awk -v q="$QUEUE@" 'index($1, q) == 1 { print $1 " " $4 " " $6; exit }')
        if [ "$state" != "$last" ]; then
            log "queue: ${state:-<no instance yet>}"
            last=$state
        fi
        # name, load average, states: up once the load is reported and no state flag is set
        if [ -n "$state" ] && [ "$(echo "$state" | awk '{print $2}')" != "-NA-" ] &&
            [ -z "$(echo "$state" | awk '{print $3}')" ]; then
            return
        fi
        # A queue left in error state by an earlier run is cleared.
        case "$state" in *E*) qmod -c "$QUEUE" >/dev/null 2>&1 || true ;; esac
        [ -n "$(daemon_pid sge_execd)" ] || die "sge_execd exited during startup (log: $EXECD_SPOOL/*/messages)"
        [ "$SECONDS" -lt "$deadline" ] || die "queue $QUEUE not ready after ${READY_TIMEOUT}s (state: ${state:-none})"
        sleep 0.2
    done
}

# What a stuck smoke job leaves to read: the job, the daemons' last messages.
smoke_diagnostics() {
    qstat -j "$1" >&2 2>&1 || true
    log "sge_shepherd processes: $(pgrep -x sge_shepherd | tr '\n' ' ')"
    log "last execd messages:"
    tail -n 15 "$EXECD_SPOOL"/*/messages >&2 2>/dev/null || true
    log "last qmaster messages:"
    tail -n 15 "$QMASTER_SPOOL/messages" >&2 2>/dev/null || true
}

# One job through the queue; done once accounting has it (qacct lags the end by
# flush_time). Returns 2 when the job did not end in time (the caller may retry).
smoke_job() {
    local dir jobid t0 deadline record=""
    dir=$(mktemp -d)
    t0=$EPOCHREALTIME
    jobid=$(qsub -terse -b y -N sge-cluster-smoke -o "$dir/smoke.out" -e "$dir/smoke.err" -q "$QUEUE" echo hello)
    deadline=$((SECONDS + SMOKE_TIMEOUT))
    until record=$(qacct -j "$jobid" 2>/dev/null); do
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "smoke job $jobid not in qacct after ${SMOKE_TIMEOUT}s"
            smoke_diagnostics "$jobid"
            qdel -f "$jobid" >/dev/null 2>&1 || true
            rm -rf "$dir"
            return 2
        fi
        sleep 0.2
    done
    if ! echo "$record" | grep -Eq '^exit_status +0( |$)' || [ "$(cat "$dir/smoke.out" 2>/dev/null)" != hello ]; then
        echo "$record" | grep -E '^(failed|exit_status)' >&2 || true
        cat "$dir/smoke.err" >&2 2>/dev/null || true
        rm -rf "$dir"
        die "smoke job $jobid failed"
    fi
    rm -rf "$dir"
    log "smoke job $jobid: done, $(elapsed "$t0") from qsub to its accounting record"
}

smoke_test() {
    local rc=0
    smoke_job || rc=$?
    [ "$rc" = 2 ] || return "$rc"
    # Seen once on a reused machine: the job started and never reported its end. A new
    # execd (with the stale records cleared) gets one more try before the start fails.
    log "restarting sge_execd for a second smoke job"
    local pid
    pid=$(daemon_pid sge_execd)
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone 30 "$pid" || { kill -KILL "$pid" 2>/dev/null || true; wait_gone 10 "$pid" || die "sge_execd (pid $pid) does not exit"; }
    fi
    start_execd
    wait_queue_ready
    rc=0
    smoke_job || rc=$?
    [ "$rc" = 2 ] && die "smoke job not in qacct after ${SMOKE_TIMEOUT}s, twice (diagnostics above)"
    return "$rc"
}

# Test sessions may call start/stop at the same time; one at a time.
# Every daemon is started with fd 9 closed: one that inherited it would hold the lock
# for as long as it runs, and every later start would wait on it in vain.
take_lock() {
    exec 9>/run/sge-cluster.lock
    if ! flock -w 180 9; then
        die "another sge-cluster.sh start/stop holds /run/sge-cluster.lock for 180 s"
    fi
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    take_lock
    if packages_present && queue_up; then
        log "already up: $QUEUE@$NODE"
        return 0
    fi
    local t0=$EPOCHREALTIME
    install_packages
    prepare_host
    if [ -z "$(daemon_pid sge_qmaster)" ] || ! qstat_works; then
        stop_daemons
        start_qmaster
    fi
    make_conf_dir
    configure
    write_queue
    [ -n "$(daemon_pid sge_execd)" ] || start_execd
    wait_queue_ready
    log "queue $QUEUE@$NODE up $(elapsed "$t0") after start began"
    smoke_test
}

cmd_stop() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    take_lock
    stop_daemons
    log "stopped"
}

cmd_status() {
    if packages_present && queue_up; then
        timeout 10 qstat -f
        return 0
    fi
    local why
    if ! packages_present; then
        why="gridengine is not installed"
    elif [ -z "$(daemon_pid sge_qmaster)" ]; then
        why="sge_qmaster is not running"
    elif [ -z "$(daemon_pid sge_execd)" ]; then
        why="sge_execd is not running"
    elif ! qstat_works; then
        why="qstat does not answer"
    else
        why="queue $QUEUE is ${QUEUE_STATE:-missing} (or not configured by this script)"
    fi
    log "not up: $why"
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
