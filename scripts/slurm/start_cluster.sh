#!/usr/bin/env bash
# Start a single-node Slurm cluster (munged + slurmctld + slurmd) on this machine, for tests.
#
#   sudo scripts/slurm/start_cluster.sh            # install if needed, configure, start, wait for the node
#   scripts/slurm/start_cluster.sh --stop          # stop the daemons this script started
#
# Installs `slurm-wlm` and `munge` from the distribution's packages (apt-get, non-interactive,
# skipped when already installed), writes /etc/slurm/slurm.conf for one node with this
# machine's real CPU count and memory (from `slurmd -C`), no cgroups (proctrack/linuxproc,
# task/none), requeue allowed, state under /var/spool. Safe to run twice: running daemons
# are kept when the config is unchanged, restarted when it changed.
#
# Environment: SLURM_PARTITION (default "debug"), SLURM_CLUSTER_NAME (default "caption-mixing"),
# SLURM_START_TIMEOUT (seconds to wait for the node to become idle, default 60).
set -euo pipefail

PARTITION="${SLURM_PARTITION:-debug}"
CLUSTER="${SLURM_CLUSTER_NAME:-caption-mixing}"
TIMEOUT="${SLURM_START_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
SPOOL=/var/spool
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm

log() { printf '[start_cluster] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (installs packages and starts daemons)"

stop_daemons() {
    local name pidfile pid
    for name in slurmd slurmctld; do
        pidfile="$RUN_DIR/$name.pid"
        pid="$(cat "$pidfile" 2>/dev/null || true)"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            log "stopping $name (pid $pid)"
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

if [ "${1:-}" = "--stop" ]; then
    stop_daemons
    exit 0
fi

# --- 1. packages -----------------------------------------------------------------------------
need=()
for pkg in slurm-wlm munge; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d: packages must not try to start services through init scripts in a container.
    had_policy=0
    [ -e /usr/sbin/policy-rc.d ] && had_policy=1
    [ "$had_policy" -eq 1 ] || printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${need[@]}" >/dev/null
    [ "$had_policy" -eq 1 ] || rm -f /usr/sbin/policy-rc.d
fi
for bin in munged slurmctld slurmd sinfo sbatch srun scontrol; do
    command -v "$bin" >/dev/null || die "$bin is not on PATH after installing slurm-wlm and munge"
done

# --- 2. munge --------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
fi
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- 3. slurm.conf ---------------------------------------------------------------------------
NODE="$(hostname -s)"
# slurmd -C prints this machine's real hardware, e.g.
# "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24033"
hw="$(slurmd -C | head -n1)"
hw="${hw#NodeName=* }"
[[ "$hw" == *CPUs=* && "$hw" == *RealMemory=* ]] || die "could not read the hardware from 'slurmd -C': $hw"

mkdir -p "$CONF_DIR" "$SPOOL/slurmctld" "$SPOOL/slurmd" "$LOG_DIR" "$RUN_DIR"
new_conf="$(mktemp)"
cat >"$new_conf" <<EOF
# Written by scripts/slurm/start_cluster.sh: a single-node test cluster without cgroups.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
SchedulerParameters=batch_sched_delay=0
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

restart=0
if ! cmp -s "$new_conf" "$CONF"; then
    log "writing $CONF"
    install -m 0644 "$new_conf" "$CONF"
    restart=1
fi
rm -f "$new_conf"
# Slurm 22.05 has no CgroupPlugin=disabled; with no cgroup.conf it autodetects and, with
# proctrack/linuxproc + task/none, never creates cgroups.

# --- 4. daemons ------------------------------------------------------------------------------
running() { [ -s "$RUN_DIR/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }
if [ "$restart" -eq 1 ]; then
    stop_daemons
fi
if ! running slurmctld; then
    log "starting slurmctld"
    slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
fi
if ! running slurmd; then
    log "starting slurmd (node $NODE)"
    slurmd -N "$NODE" || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
fi

log "waiting up to ${TIMEOUT}s for node $NODE to be idle"
deadline=$((SECONDS + TIMEOUT))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle | mixed | allocated) break ;;
        down* | drain* | fail* | unknown*)
            # ReturnToService=2 brings a node back once it registers; nudge it after a restart.
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
case "$state" in
    idle | mixed | allocated) ;;
    *) die "node $NODE is '${state:-not reported}' after ${TIMEOUT}s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log" ;;
esac
sinfo
log "Slurm cluster '$CLUSTER' is up: partition $PARTITION, node $NODE ($hw)"
