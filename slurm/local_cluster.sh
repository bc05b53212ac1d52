#!/usr/bin/env bash
# A one-node Slurm cluster on loopback, for tests and for trying the sbatch scripts on a laptop.
#
#   slurm/local_cluster.sh start|stop|status [STATE_DIR]      (default STATE_DIR: /tmp/maepipe-slurm)
#   export SLURM_CONF=STATE_DIR/slurm.conf                     then sbatch/srun/squeue/scontrol use it
#
# Everything lives under STATE_DIR: slurm.conf, a private munge key and socket, the controller's
# state, spool, logs and pid files. Nothing in /etc is read or written, the ports are picked free at
# start, so it runs beside a system Slurm and two copies (two STATE_DIRs) run beside each other.
# Needs the Debian/Ubuntu packages `slurmctld slurmd slurm-client munge` (Slurm 22.05+), or the same
# binaries on PATH. Run it as root (as in CI), or as yourself: then the daemons run as you and only
# your own jobs can run. `start` is idempotent and returns once the node is idle; `stop` waits until
# the daemons are gone.
set -euo pipefail

ACTION=${1:-}
STATE_DIR=${2:-${MAEPIPE_SLURM_DIR:-/tmp/maepipe-slurm}}
CONF=$STATE_DIR/slurm.conf
MUNGE_DIR=$STATE_DIR/munge
SOCKET=$MUNGE_DIR/munge.socket
NODE=localhost   # the node's name must resolve on every machine: localhost always does
export SLURM_CONF=$CONF

sbin() {  # daemons live in /usr/sbin on Debian, which is not on every user's PATH
    command -v "$1" 2>/dev/null || { [[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1"; } || {
        echo "local_cluster.sh: $1 not found: install the packages slurmctld slurmd slurm-client munge" >&2
        exit 3
    }
}

alive() {  # alive PIDFILE: the process it names runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

free_port() {
    "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

loopback_addr() {
    # srun and slurmd call back to the address the host's name resolves to; with NoInAddrAny they
    # bind only there, so the node's address must be that one when it is loopback
    local addr
    addr=$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk 'NR == 1 { print $1 }')
    if [[ $addr == 127.* ]]; then echo "$addr"; else echo 127.0.0.1; fi
}

node_line() {
    # what slurmd detects, renamed; RealMemory above the detected value drains the node, so 90% of it
    "$(sbin slurmd)" -C | awk -v node="$NODE" -v addr="$1" 'NR == 1 {
        for (i = 1; i <= NF; i++) {
            split($i, kv, "=")
            if (kv[1] == "NodeName") $i = "NodeName=" node " NodeAddr=" addr
            if (kv[1] == "RealMemory") $i = "RealMemory=" int(kv[2] * 0.9)
        }
        print }'
}

write_munge_key() {
    # munged insists: key readable by its user only, socket directory traversable by everyone
    mkdir -p "$MUNGE_DIR"
    chmod 755 "$STATE_DIR" "$MUNGE_DIR"
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        (umask 077 && head -c 1024 /dev/urandom > "$MUNGE_DIR/munge.key")
        chmod 400 "$MUNGE_DIR/munge.key"
    fi
}

write_conf() {
    local user addr ctld_port slurmd_port
    user=$(id -un)
    addr=$(loopback_addr)
    ctld_port=${SLURMCTLD_PORT:-$(free_port)}
    slurmd_port=${SLURMD_PORT:-$(free_port)}
    mkdir -p "$STATE_DIR"/{ctld,spool,log}
    # Settings, and why:
    #  NoCtldInAddrAny/NoInAddrAny: listen on loopback only (a sandbox or a laptop on a shared network).
    #  proctrack/linuxproc + task/none: no cgroups or systemd needed (containers, CI machines).
    #  cons_tres CR_CPU: tasks get CPUs; memory is not a consumable, so jobs need not ask for it.
    #  cred_expire=10, bf_interval=1, sched_interval=1: a requeued job starts again within seconds
    #    (defaults make it wait ~2.5 min). KillWait=5: a job that ignores SIGTERM dies 5 s later.
    #  MinJobAge=3600: finished jobs stay visible to `scontrol show job` (no accounting database here).
    cat > "$CONF.tmp" <<EOF
# written by slurm/local_cluster.sh; rewritten at every start
ClusterName=maepipe
SlurmctldHost=$NODE($addr)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET,cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
MinJobAge=3600
InactiveLimit=0
$(node_line "$addr")
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

wait_idle() {
    local state i
    for i in $(seq 1 120); do
        state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)
        case $state in
            idle|mixed|allocated|completing) return 0 ;;
            *drain*|down*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    echo "local_cluster.sh: node $NODE not idle after 60 s (state '${state:-none}'); see $STATE_DIR/log/" >&2
    return 1
}

start() {
    if alive "$MUNGE_DIR/munged.pid" && alive "$STATE_DIR/slurmctld.pid" && alive "$STATE_DIR/slurmd.pid"; then
        wait_idle
        echo "running: export SLURM_CONF=$CONF"
        return 0
    fi
    stop_daemons  # a half-started cluster (one daemon died) is restarted whole
    write_munge_key
    write_conf
    "$(sbin munged)" --key-file="$MUNGE_DIR/munge.key" --socket="$SOCKET" --pid-file="$MUNGE_DIR/munged.pid" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" || {
        echo "local_cluster.sh: munged did not start (log: $MUNGE_DIR/munged.log); it needs every folder" \
             "above $MUNGE_DIR to be searchable by all users (chmod o+x), so pick a STATE_DIR such as /tmp/NAME" >&2
        exit 1
    }
    "$(sbin slurmctld)" -f "$CONF"
    "$(sbin slurmd)" -f "$CONF" -N "$NODE"
    wait_idle
    echo "started: export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid PIDFILE: SIGTERM, then wait up to 20 s, then SIGKILL
    local pid i
    alive "$1" || { rm -f "$1"; return 0; }
    pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
}

stop_daemons() {
    # job processes outlive slurmd (slurmstepd is on its own): cancel the jobs and let them end first
    local i
    if alive "$STATE_DIR/slurmctld.pid" && alive "$STATE_DIR/slurmd.pid"; then
        scancel --user="$(id -un)" 2>/dev/null || true
        for i in $(seq 1 40); do
            [[ -z $(squeue -h -t running,completing -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_pid "$STATE_DIR/slurmd.pid"
    stop_pid "$STATE_DIR/slurmctld.pid"
    stop_pid "$MUNGE_DIR/munged.pid"
}

status() {
    local name pidfile rc=0
    for name in munged slurmctld slurmd; do
        pidfile=$STATE_DIR/$name.pid
        [[ $name == munged ]] && pidfile=$MUNGE_DIR/munged.pid
        if alive "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: stopped"; rc=1; fi
    done
    if (( rc == 0 )); then
        sinfo -N -o "%N %T %c %m"
        echo "export SLURM_CONF=$CONF"
    fi
    return $rc
}

case $ACTION in
    start) start ;;
    stop) stop_daemons; echo "stopped ($STATE_DIR kept)" ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status [STATE_DIR]   (default STATE_DIR /tmp/maepipe-slurm)" >&2; exit 2 ;;
esac
