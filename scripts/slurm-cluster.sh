#!/usr/bin/env bash
# A two-node Slurm 22.05 (Debian slurm-wlm + munge) on this one machine, for tests, on
# machines where systemd is not PID 1, so the daemons are started by hand. Two nodes
# (two slurmd, ports 6818 and 6819): Slurm gives each component of a heterogeneous job
# nodes of its own, so a two-member gang needs two.
#
#   bash scripts/slurm-cluster.sh start    # install if needed, start, wait for idle, smoke test
#   bash scripts/slurm-cluster.sh stop     # stop slurmd + slurmctld (munged keeps running;
#                                          # running jobs' processes too, as with any slurmd stop)
#   bash scripts/slurm-cluster.sh status   # exit 0 and print sinfo if the node is up
#
# Must run as root. Facts behind the choices: /work/shared/SCHEDULERS.md.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
CTLD_SPOOL=/var/spool/slurmctld
# one spool dir, pid file and log per node (%n: the node's name)
SLURMD_SPOOL=/var/spool/slurmd
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
MUNGE_KEY=/etc/munge/munge.key
# Kept inside the state dir so that it describes exactly the state it sits beside:
# if anything wipes the state, the stamp goes with it.
CONF_STAMP=$CTLD_SPOOL/prefect-xm-slurm.conf.sha256
READY_TIMEOUT=${SLURM_READY_TIMEOUT:-60}
SMOKE_TIMEOUT=${SLURM_SMOKE_TIMEOUT:-60}
NODE=$(hostname)
# the first node is named after the host; the others after it (`-2`, ...)
NODES=("$NODE")
for ((i = 2; i <= ${SLURM_NODES:-2}; i++)); do NODES+=("$NODE-$i"); done
slurmd_pidfile() { echo "/run/slurmd-$1.pid"; }

# Seconds since an $EPOCHREALTIME stamp, to the millisecond.
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2fs", b - a }'; }

log() { printf 'slurm-cluster: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Node states in which the node takes jobs. A trailing '*' (not responding), '~'
# (powered off), '#', '!', '%' or '@' means it is not usable, so these are exact matches.
state_is_up() {
    case "$1" in
        idle | mixed | allocated | completing | planned) return 0 ;;
        *) return 1 ;;
    esac
}

# `timeout` because a client can hang for MessageTimeout when the controller is half up.
node_state() {
    timeout 15 sinfo -h -n "${1:-$NODE}" -o %T 2>/dev/null | head -n1 || true
}

cluster_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    [ -f "$CONF" ] || return 1
    # Look at the processes first: with no controller, sinfo retries for ~9 s before
    # it gives up, which would make `status` and `start` slow exactly when stopped.
    # Without munged every client call hangs until its timeout instead of failing.
    munge_works || return 1
    [ -n "$(daemon_pid slurmctld "$CTLD_PID")" ] || return 1
    slurmds_running || return 1
    local node
    for node in "${NODES[@]}"; do
        # Kept for the caller's messages, so they need not ask the controller again.
        NODE_STATE=$(node_state "$node")
        NODE_DOWN=$node
        state_is_up "$NODE_STATE" || return 1
    done
}

# nproc honours OMP_NUM_THREADS; a caller's environment must not change the node's size.
ncpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

# One line per node, all on this host (NodeHostname), each slurmd on a port of its own;
# the host's memory is shared out between them.
node_lines() {
    local addr=$1 real_mb=$2 i=0 node
    for node in "${NODES[@]}"; do
        echo "NodeName=$node NodeHostname=$NODE$addr Port=$((6818 + i)) CPUs=${SLURM_NODE_CPUS:-$(($(ncpus) * 4))} RealMemory=$((real_mb / ${#NODES[@]})) State=UNKNOWN"
        i=$((i + 1))
    done
}

render_conf() {
    local mem_kb real_mb
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    # 80 %: slurmd drains a node whose RealMemory exceeds what it measures, and the
    # kernel and daemons need headroom anyway.
    real_mb=$((mem_kb * 8 / 10 / 1024))
    # Daemons and clients find each other by name; where the host name does not
    # resolve, give them the loopback address (the whole cluster is this machine).
    local ctld=$NODE addr=""
    if ! getent hosts "$NODE" >/dev/null 2>&1; then
        ctld="$NODE(127.0.0.1)"
        addr=" NodeAddr=127.0.0.1"
    fi
    cat <<EOF
# Written by prefect-xm scripts/slurm-cluster.sh; rewritten on every start.
ClusterName=prefectxm
SlurmctldHost=$ctld
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups: the machines we test on have no systemd to delegate a cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# batch_sched_delay (3 s by default) holds back the scheduling of new batch jobs, so a
# trivial job waited 2-3 s to start; a short backfill interval picks up jobs that
# were pending behind others soon after resources free up.
SchedulerParameters=batch_sched_delay=0,bf_interval=5
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without it a job that asks for no memory gets the whole node, so jobs run one at a time.
DefMemPerCPU=512
# A node that comes back with a valid config returns to service by itself.
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=120
MessageTimeout=10
# Short scancel grace, so cancel tests do not wait 30 s for SIGKILL.
KillWait=5
InactiveLimit=0
# Finished jobs stay visible in scontrol show job for 5 minutes (no slurmdbd here).
MinJobAge=300
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818

# The test suite runs its end-to-end classes side by side and their jobs mostly sleep:
# the node offers SLURM_NODE_CPUS (4 per real CPU by default) so that they do not queue
# behind each other; config_overrides lets slurmd run a node larger than its hardware.
SlurmdParameters=config_overrides
$(node_lines "$addr" "$real_mb")
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

packages_present() {
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 &&
        command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1
}

install_packages() {
    if packages_present; then
        return
    fi
    log "installing slurm-wlm and munge"
    # The packages' postinst scripts start their services through invoke-rc.d and fail
    # the install if that fails (slurmd cannot start before slurm.conf exists); we
    # start the daemons ourselves, so forbid that for the duration of the install, as
    # container images usually already do.
    local policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        trap "rm -f '$policy'" EXIT
    else
        policy=""
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2
    if [ -n "$policy" ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    packages_present || die "slurm-wlm/munge installed but daemons not found on PATH"
}

munge_works() {
    # The pid check first: with no munged, the munge client retries for ~4 s.
    local pid
    pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
    pid_alive "$pid" || return 1
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1
}

ensure_munge() {
    if [ ! -s "$MUNGE_KEY" ]; then
        log "creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
        chown munge:munge "$MUNGE_KEY"
        chmod 0400 "$MUNGE_KEY"
    fi
    if munge_works; then
        return
    fi
    # /run is a tmpfs: the directory vanishes on every boot and munged will not create it.
    install -d -o munge -g munge -m 0755 /run/munge
    log "starting munged"
    # --force: a munged that died leaves its socket behind, and munged refuses to start
    # over a socket it cannot prove is stale.
    runuser -u munge -- /usr/sbin/munged --force 9>&- </dev/null >/dev/null 2>&1 ||
        die "munged did not start (see /var/log/munge/munged.log)"
    local deadline=$((SECONDS + 15))
    until munge_works; do
        [ "$SECONDS" -lt "$deadline" ] || die "munged is running but credentials do not verify"
        sleep 0.2
    done
}

pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Pid from the daemon's pidfile, or from the process table when the pidfile is gone
# (e.g. a daemon started by hand); only an exact program name is matched.
daemon_pid() {
    local name=$1 pidfile=$2 pid=""
    if [ -s "$pidfile" ]; then
        pid=$(head -n1 "$pidfile")
        if pid_alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
            echo "$pid"
            return
        fi
    fi
    pgrep -x "$name" | head -n1 || true
}

slurmds_running() {
    local node
    for node in "${NODES[@]}"; do
        [ -n "$(slurmd_pid "$node")" ] || return 1
    done
}

# A node's slurmd: from its pid file, or the process started for that node by hand.
slurmd_pid() {
    local node=$1 pidfile pid
    pidfile=$(slurmd_pidfile "$node")
    if [ -s "$pidfile" ]; then
        pid=$(head -n1 "$pidfile")
        if pid_alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ]; then
            echo "$pid"
            return
        fi
    fi
    pgrep -x -f "slurmd -N $node" | head -n1 || true
}

wait_gone() {
    local deadline=$(($SECONDS + $1)) pid
    shift
    for pid in "$@"; do
        while pid_alive "$pid"; do
            [ "$SECONDS" -lt "$deadline" ] || return 1
            sleep 0.1
        done
    done
}

stop_daemons() {
    local node pid pids=()
    # slurmd of an earlier single-node conf (one pid file for the host), then each node's
    for pid in $(daemon_pid slurmd /run/slurmd.pid) $(for node in "${NODES[@]}"; do slurmd_pid "$node"; done) \
        $(daemon_pid slurmctld "$CTLD_PID"); do
        log "stopping $(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid)"
        # SIGTERM lets slurmctld save its state, so queued jobs survive a restart;
        # slurmd leaves running job steps alone and picks them up when it returns.
        # All at once: each takes 1-2 s to shut down.
        kill -TERM "$pid" 2>/dev/null || true
        pids+=("$pid")
    done
    rm -f "$CTLD_PID" /run/slurmd.pid
    for node in "${NODES[@]}"; do rm -f "$(slurmd_pidfile "$node")"; done
    [ "${#pids[@]}" -gt 0 ] || return 0
    if ! wait_gone 30 "${pids[@]}"; then
        log "slurm daemons ignored SIGTERM for 30 s; sending SIGKILL"
        kill -KILL "${pids[@]}" 2>/dev/null || true
        wait_gone 10 "${pids[@]}" || die "slurm daemons (pids ${pids[*]}) do not exit"
    fi
}

# The controller's saved state (jobs, node states, cluster name) only makes sense for
# the conf it was written under. A plain restart must keep it, or queued jobs are lost;
# state from another conf is discarded, since slurmctld may refuse it (cluster name
# mismatch) or resurrect jobs for nodes that no longer exist.
reset_state_if_conf_changed() {
    local want have=""
    want=$(sha256sum "$CONF" | cut -d' ' -f1)
    [ -f "$CONF_STAMP" ] && have=$(cat "$CONF_STAMP")
    if [ "$want" = "$have" ]; then
        return
    fi
    if [ -n "$(ls -A "$CTLD_SPOOL" 2>/dev/null)" ]; then
        log "slurm.conf differs from the one the saved state was written under: discarding $CTLD_SPOOL state"
        find "$CTLD_SPOOL" -mindepth 1 -delete
        # Job ids restart at 1 with a fresh controller, and slurmd refuses credentials of
        # job ids it remembers as revoked, so its memory of old jobs goes too.
        rm -f "$SLURMD_SPOOL"/cred_state* "$SLURMD_SPOOL"/*/cred_state*
    fi
    echo "$want" >"$CONF_STAMP"
    chown slurm:slurm "$CONF_STAMP"
}

make_dirs() {
    install -d -m 0755 "$CONF_DIR"
    install -d -o slurm -g slurm -m 0755 "$CTLD_SPOOL" "$LOG_DIR"
    # slurmd always runs as root.
    local node
    for node in "${NODES[@]}"; do
        install -d -o root -g root -m 0755 "$SLURMD_SPOOL/$node"
    done
}

write_conf() {
    local new=$1
    if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then
        return
    fi
    log "writing $CONF"
    # Atomic, so a client reading the conf meanwhile never sees half a file.
    printf '%s\n' "$new" >"$CONF.tmp"
    chmod 0644 "$CONF.tmp"
    mv -f "$CONF.tmp" "$CONF"
}

start_daemons() {
    # Both daemons fork into the background themselves; their own output goes to the
    # log files, the redirects only keep a failing start's message for the error.
    log "starting slurmctld"
    if ! slurmctld 9>&- </dev/null >>"$LOG_DIR/slurmctld.start.log" 2>&1; then
        tail -n 20 "$LOG_DIR/slurmctld.start.log" "$LOG_DIR/slurmctld.log" >&2 || true
        die "slurmctld failed to start"
    fi
    SLURMD_STARTED=$(date +%s)
    local node
    for node in "${NODES[@]}"; do
        log "starting slurmd for node $node"
        # -N: which node this slurmd is (each on its own port, all on this host)
        if ! slurmd -N "$node" 9>&- </dev/null >>"$LOG_DIR/slurmd.start.log" 2>&1; then
            tail -n 20 "$LOG_DIR/slurmd.start.log" "$LOG_DIR/slurmd-$node.log" >&2 || true
            die "slurmd for node $node failed to start"
        fi
    done
}

# The controller restores a node as idle from its saved state before its slurmd has said
# a word, so "idle" alone does not prove this slurmd registered: its start time must
# be the one we just started.
slurmd_registered() {
    local started
    started=$(timeout 15 scontrol show node "$1" 2>/dev/null |
        grep -o 'SlurmdStartTime=[0-9T:-]*' | cut -d= -f2 || true)
    [ -n "$started" ] || return 1
    started=$(date -d "$started" +%s 2>/dev/null) || return 1
    [ "$started" -ge "$SLURMD_STARTED" ]
}

wait_until_idle() {
    local node
    for node in "${NODES[@]}"; do
        wait_until_node_idle "$node"
    done
}

wait_until_node_idle() {
    local node=$1 deadline=$((SECONDS + READY_TIMEOUT)) state last="" next_resume=0
    while :; do
        state=$(node_state "$node")
        if [ "$state" != "$last" ]; then
            log "node $node: ${state:-<no answer yet>}"
            last=$state
        fi
        if state_is_up "$state" && slurmd_registered "$node"; then
            return
        fi
        # A node that registered but is down/drained (e.g. left over from an earlier
        # run) needs an explicit resume; a trailing '*' means slurmd has not
        # registered yet, so resuming then would not help.
        case "$state" in
            *'*') ;;
            down* | drain* | fail*)
                # Again every few seconds: a resume sent while the controller was
                # still sorting out the node can be refused or undone.
                if [ "$SECONDS" -ge "$next_resume" ]; then
                    log "node $node is $state: resuming it"
                    timeout 15 scontrol update nodename="$node" state=resume || true
                    next_resume=$((SECONDS + 5))
                fi
                ;;
        esac
        if [ -z "$(daemon_pid slurmctld "$CTLD_PID")" ]; then
            tail -n 20 "$LOG_DIR/slurmctld.log" >&2 || true
            die "slurmctld exited during startup (log: $LOG_DIR/slurmctld.log)"
        fi
        if [ -z "$(slurmd_pid "$node")" ]; then
            tail -n 20 "$LOG_DIR/slurmd-$node.log" >&2 || true
            die "slurmd for node $node exited during startup (log: $LOG_DIR/slurmd-$node.log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            timeout 15 scontrol show node "$node" >&2 || true
            die "node $node not idle after ${READY_TIMEOUT}s (state: ${state:-unknown}); logs in $LOG_DIR"
        fi
        sleep 0.2
    done
}

smoke_test() {
    local dir out jobid state="" t0 deadline
    dir=$(mktemp -d)
    out=$dir/smoke.out
    t0=$EPOCHREALTIME
    jobid=$(sbatch --parsable --job-name=slurm-cluster-smoke --chdir="$dir" --output="$out" \
        --time=1 --wrap 'echo hello')
    jobid=${jobid%%;*}
    deadline=$((SECONDS + SMOKE_TIMEOUT))
    while :; do
        state=$(scontrol show job "$jobid" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true)
        case "$state" in
            COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
                break ;;
        esac
        if [ "$SECONDS" -ge "$deadline" ]; then
            scancel "$jobid" 2>/dev/null || true
            rm -rf "$dir"
            die "smoke job $jobid not finished after ${SMOKE_TIMEOUT}s (state: ${state:-unknown})"
        fi
        sleep 0.2
    done
    if [ "$state" != COMPLETED ] || [ "$(cat "$out" 2>/dev/null)" != hello ]; then
        cat "$out" >&2 2>/dev/null || true
        rm -rf "$dir"
        die "smoke job $jobid ended $state, output: $(cat "$out" 2>/dev/null || echo none)"
    fi
    rm -rf "$dir"
    log "smoke job $jobid: $state, $(elapsed "$t0") from sbatch to done"
}

# Test sessions may call start/stop at the same time; one at a time, and a second
# start then finds the cluster up and returns at once.
# Every daemon is started with fd 9 closed: one that inherited it would hold the lock
# for as long as it runs, and every later start would wait on it in vain.
take_lock() {
    exec 9>/run/slurm-cluster.lock
    if ! flock -w 180 9; then
        die "another slurm-cluster.sh start/stop holds /run/slurm-cluster.lock for 180 s"
    fi
}

cmd_start() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    take_lock
    local conf
    # The fast path also requires the conf on disk to be the one this script would
    # write now, so an edited script (or a changed machine) takes effect on the next start.
    if packages_present && [ -f "$CONF" ]; then
        conf=$(render_conf)
        if [ "$(cat "$CONF")" = "$conf" ] && cluster_up; then
            log "already up: nodes ${NODES[*]} $NODE_STATE"
            return 0
        fi
    fi
    local t0=$EPOCHREALTIME
    install_packages
    conf=$(render_conf)
    ensure_munge
    make_dirs
    # Restart rather than reconfigure: node and select changes need a restart anyway,
    # and a half-up cluster is easiest to bring back from nothing.
    stop_daemons
    write_conf "$conf"
    reset_state_if_conf_changed
    start_daemons
    wait_until_idle
    log "nodes ${NODES[*]} idle $(elapsed "$t0") after start began"
    smoke_test
}

cmd_stop() {
    [ "$(id -u)" -eq 0 ] || die "must run as root"
    take_lock
    stop_daemons
    log "stopped (munged left running)"
}

cmd_status() {
    if cluster_up; then
        timeout 15 sinfo
        return 0
    fi
    local why
    if ! command -v sinfo >/dev/null 2>&1; then
        why="slurm is not installed"
    elif [ ! -f "$CONF" ]; then
        why="$CONF is missing"
    elif ! munge_works; then
        why="munged is not running (or its credentials do not verify)"
    elif [ -z "$(daemon_pid slurmctld "$CTLD_PID")" ]; then
        why="slurmctld is not running"
    elif ! slurmds_running; then
        why="slurmd is not running for every node (${NODES[*]})"
    else
        why="node $NODE_DOWN is ${NODE_STATE:-not answering}"
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
