#!/usr/bin/env bash
# Start a real, local Slurm cluster (munged + slurmctld + N x slurmd) on this machine, for tests.
#
# N emulated nodes n1..nN all run on this one host (Debian's slurmd supports `slurmd -N <node>`).
# Needs root. Idempotent: if the cluster is already up, healthy and configured the same, it does
# nothing. See slurm/cluster/README.md and shared/design/slurm.md.
#
# Environment (defaults in brackets):
#   SLURM_TEST_STATE  state/log/spool directory               [/run/resbm-slurm]
#   NODES             number of emulated nodes n1..nN         [2]
#   CPUS_PER_NODE     CPUs each node claims (config_overrides) [4]
#   MEM_PER_NODE_MB   RealMemory of each node (not enforced)  [4000]
#   PARTITION         name of the (default) partition         [debug]
#   CTLD_PORT         slurmctld port                          [6817]
#   SLURMD_BASE_PORT  slurmd of node k listens on BASE+k-1    [17001]
#   START_TIMEOUT     seconds to wait for each daemon / nodes [30]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SLURM_TEST_STATE:-/run/resbm-slurm}"
NODES="${NODES:-2}"
CPUS_PER_NODE="${CPUS_PER_NODE:-4}"
MEM_PER_NODE_MB="${MEM_PER_NODE_MB:-4000}"
PARTITION="${PARTITION:-debug}"
CTLD_PORT="${CTLD_PORT:-6817}"
SLURMD_BASE_PORT="${SLURMD_BASE_PORT:-17001}"
START_TIMEOUT="${START_TIMEOUT:-30}"
CONF=/etc/slurm/slurm.conf
MUNGE_PID=/run/munge/munged.pid
# Root-only places: this runs as root and deletes and moves files in the state directory, so no
# path may sit where another user can plant a symlink or a directory of their own (/tmp).
LOCK=/run/resbm-slurm.lock
T0=$(date +%s.%N)

log() { echo "start.sh: $*" >&2; }
tail_log() {  # tail_log FILE...: show the end of each existing log
    local f
    for f in "$@"; do
        if [[ -s "$f" ]]; then
            echo "----- last lines of $f -----" >&2
            tail -n 25 "$f" >&2
        fi
    done
}
fail() {  # fail MESSAGE [LOG...]
    local msg="$1"; shift
    echo "start.sh: ERROR: $msg" >&2
    tail_log "$@"
    exit 1
}

[[ "$(id -u)" == 0 ]] || fail "must run as root (it installs packages and starts daemons)"
for v in NODES CPUS_PER_NODE MEM_PER_NODE_MB CTLD_PORT SLURMD_BASE_PORT START_TIMEOUT; do
    [[ "${!v}" =~ ^[0-9]+$ && "${!v}" -gt 0 ]] || fail "$v must be a positive integer, got '${!v}'"
done
[[ "$PARTITION" =~ ^[A-Za-z0-9_-]+$ ]] || fail "PARTITION must be [A-Za-z0-9_-]+, got '$PARTITION'"
[[ -n "$STATE" && "$STATE" == /* && "$STATE" != / ]] || fail "SLURM_TEST_STATE must be an absolute path other than /"

root_only() {  # root_only PATH: PATH and every directory above it are root's and not a symlink,
    # and none is writable by others unless sticky (/tmp), where others cannot rename our entries
    local p="$1" mode
    while [[ -n "$p" ]]; do
        if [[ -e "$p" || -L "$p" ]]; then
            [[ ! -L "$p" ]] || fail "$p is a symlink; refusing to use it as root (remove it, or set SLURM_TEST_STATE)"
            [[ "$(stat -c %u "$p")" == 0 ]] || fail "$p is owned by uid $(stat -c %u "$p"), not root; refusing to use it"
            mode=$((8#$(stat -c %a "$p")))
            if [[ "$p" == "$1" ]]; then
                (( (mode & 8#022) == 0 )) || fail "$p is writable by group or others; refusing to use it"
            else
                (( (mode & 8#022) == 0 || (mode & 8#1000) )) || fail "$p is writable by others (and not sticky); refusing to use a path below it"
            fi
        fi
        [[ "$p" == / ]] && break
        p="$(dirname "$p")"
    done
}
private_dir() {  # private_dir DIR: create it (root, 0755) or check an existing one
    root_only "$1"
    mkdir -p -m 0755 "$1" || fail "cannot create $1"
    root_only "$1"
}

# One start/stop at a time on this machine (/etc/slurm/slurm.conf and the ports are global).
# The daemons are started with fd 9 closed, else they would hold the lock for their lifetime.
root_only "$(dirname "$LOCK")"
[[ ! -L "$LOCK" ]] || fail "$LOCK is a symlink; refusing to use it"
exec 9>"$LOCK"
flock -w 120 9 || fail "could not get the lock $LOCK within 120 s (another start.sh/stop.sh running?)"
export RESBM_SLURM_LOCKED=1   # lets our own call of stop.sh skip the lock
private_dir "$STATE"
private_dir "$STATE/log"

NODE_NAMES=()
for ((k = 1; k <= NODES; k++)); do NODE_NAMES+=("n$k"); done
if ((NODES == 1)); then
    NODE_SPEC=n1; PORT_SPEC="$SLURMD_BASE_PORT"
else
    NODE_SPEC="n[1-$NODES]"; PORT_SPEC="$SLURMD_BASE_PORT-$((SLURMD_BASE_PORT + NODES - 1))"
fi

# ---------------------------------------------------------------- the config we want
# The first line is a marker: stop.sh reads the state directory from it.
desired_conf() {
    cat <<EOF
# resbm-slurm-test-cluster state=$STATE
# Written by slurm/cluster/start.sh: a local test cluster, $NODES emulated node(s) on one host.
ClusterName=resbm
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
ReturnToService=2
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
MailProg=/bin/true
MinJobAge=600
KillWait=15
InactiveLimit=0
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/d/%n
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
NodeName=$NODE_SPEC NodeHostname=localhost NodeAddr=127.0.0.1 Port=$PORT_SPEC CPUs=$CPUS_PER_NODE Sockets=1 CoresPerSocket=$CPUS_PER_NODE ThreadsPerCore=1 RealMemory=$MEM_PER_NODE_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() {  # alive PID: a live process, not a zombie (pid 1 here may reap late)
    local st
    st="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" || return 1
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}
pid_alive() {  # pid_alive PIDFILE: true if the file names a live process
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc 0-9 <"$1")"
    [[ -n "$pid" ]] && alive "$pid"
}
munge_ok() { command -v munge >/dev/null && timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }
ctld_up() { timeout "${1:-10}" scontrol ping 2>/dev/null | grep -q 'is UP'; }
# node_states: "n1 idle" lines (state suffixes like * ~ # stripped)
node_states() { timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sed 's/[*~#!%$@^-]*$//' | sort -u; }
nodes_in() {  # nodes_in REGEX: true if all our nodes' states match REGEX
    local states n
    states="$(node_states)" || return 1
    [[ "$(wc -l <<<"$states")" == "$NODES" ]] || return 1
    for n in "${NODE_NAMES[@]}"; do
        grep -Eq "^$n ($1)\$" <<<"$states" || return 1
    done
}

# ---------------------------------------------------------------- already running?
any_ours_running() {
    local f
    pid_alive "$STATE/run/slurmctld.pid" && return 0
    for f in "$STATE"/run/slurmd-*.pid; do pid_alive "$f" && return 0; done
    return 1
}
healthy() {
    local n
    [[ -f "$CONF" ]] && cmp -s "$CONF" <(desired_conf) || return 1
    munge_ok || return 1
    pid_alive "$STATE/run/slurmctld.pid" || return 1
    for n in "${NODE_NAMES[@]}"; do pid_alive "$STATE/run/slurmd-$n.pid" || return 1; done
    ctld_up || return 1
    nodes_in 'idle|alloc|mix|comp'
}

# a cluster started with another state directory (e.g. an older default) holds the ports: stop it
prev_state="$(head -n1 "$CONF" 2>/dev/null | sed -n 's/^# resbm-slurm-test-cluster state=//p' || true)"
if [[ -n "$prev_state" && "$prev_state" != "$STATE" ]] && command -v scontrol >/dev/null; then
    log "the running configuration names state=$prev_state; stopping that cluster first"
    SLURM_TEST_STATE="$prev_state" "$HERE/stop.sh" >&2 || fail "stop.sh failed for the cluster in $prev_state"
fi

if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && any_ours_running; then
    if healthy; then
        echo "slurm test cluster already running and healthy: nodes=${NODE_NAMES[*]} cpus/node=$CPUS_PER_NODE partition=$PARTITION ctld_port=$CTLD_PORT state=$STATE (nothing to do)"
        exit 0
    fi
    if [[ -f "$CONF" ]] && ! cmp -s "$CONF" <(desired_conf); then
        log "a cluster is running with a different configuration; restarting it"
    else
        log "a cluster is partly running or unhealthy; restarting it"
    fi
    "$HERE/stop.sh" >&2 || fail "stop.sh failed while restarting the cluster"
fi

# ---------------------------------------------------------------- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(slurmctld slurmd slurm-client munge)
    if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >"$STATE/log/apt.log" 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update >>"$STATE/log/apt.log" 2>&1 || true
        apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$STATE/log/apt.log" 2>&1 \
            || fail "apt-get install ${pkgs[*]} failed" $STATE/log/apt.log
    fi
    for b in slurmctld slurmd sbatch srun sinfo scontrol munged; do
        command -v "$b" >/dev/null || fail "$b is still missing after apt-get install" $STATE/log/apt.log
    done
fi

# ---------------------------------------------------------------- munge
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
chown munge:munge /var/lib/munge /var/log/munge /run/munge
chmod 0700 /var/lib/munge /var/log/munge
chmod 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating munge key"
    mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 || fail "mungekey --create failed"
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge_ok; then
    if pid_alive "$MUNGE_PID"; then
        fail "munged (pid $(cat "$MUNGE_PID")) runs but munge -n | unmunge fails" /var/log/munge/munged.log
    fi
    rm -f "$MUNGE_PID"
    # --force: start even if a stale socket exists (e.g. after a crash)
    runuser -u munge -- /usr/sbin/munged --force >$STATE/log/munged.out 2>&1 9>&- \
        || fail "munged failed to start: $(cat $STATE/log/munged.out)" /var/log/munge/munged.log
    deadline=$(($(date +%s) + START_TIMEOUT))
    until munge_ok || (($(date +%s) >= deadline)); do sleep 0.1; done
    munge_ok || fail "munged started but munge -n | unmunge still fails after ${START_TIMEOUT}s" /var/log/munge/munged.log
fi

# ---------------------------------------------------------------- /etc/hosts: emulated node names
# rewrite in place (cat >), never sed -i: /etc/hosts may be a bind mount
need_hosts=0
for n in "${NODE_NAMES[@]}"; do getent hosts "$n" >/dev/null || need_hosts=1; done
if ((need_hosts)); then
    hosts_new="$(grep -v '# resbm-slurm emulated nodes$' /etc/hosts || true)"
    printf '%s\n%s\n' "$hosts_new" "127.0.0.1 ${NODE_NAMES[*]} # resbm-slurm emulated nodes" | cat >/etc/hosts \
        || fail "could not update /etc/hosts"
    for n in "${NODE_NAMES[@]}"; do
        getent hosts "$n" >/dev/null || fail "node name $n does not resolve even after editing /etc/hosts"
    done
fi

# ---------------------------------------------------------------- fresh state + config
# nothing of ours runs now: start from clean state (previous logs are kept as *.prev)
rm -rf "$STATE/ctld" "$STATE/d" "$STATE/run"
mkdir -p "$STATE/ctld" "$STATE/run" "$STATE/log"
for n in "${NODE_NAMES[@]}"; do mkdir -p "$STATE/d/$n"; done
for f in "$STATE"/log/*.log; do
    if [[ -e "$f" ]]; then mv -f "$f" "$f.prev"; fi
done
mkdir -p /etc/slurm
desired_conf >"$CONF.tmp.$$" && mv -f "$CONF.tmp.$$" "$CONF"

# ---------------------------------------------------------------- daemons
CTLD_LOG="$STATE/log/slurmctld.log"
SLURMD_LOGS=()
for n in "${NODE_NAMES[@]}"; do SLURMD_LOGS+=("$STATE/log/slurmd-$n.log"); done
# check_fatal LOG...: fail at once if a daemon logged a fatal error (e.g. its port is in use)
FATAL_RE='\] fatal: |Unable to bind listen port'
check_fatal() {
    local f
    for f in "$@"; do
        if grep -Eq "$FATAL_RE" "$f" 2>/dev/null; then fail "$(basename "$f" .log) died: $(grep -Em1 "$FATAL_RE" "$f")" "$f"; fi
    done
}

slurmctld -c >"$STATE/log/slurmctld.out" 2>&1 9>&- \
    || fail "slurmctld -c failed: $(cat "$STATE/log/slurmctld.out")" "$CTLD_LOG"
deadline=$(($(date +%s) + START_TIMEOUT))
sleep 0.2
until check_fatal "$CTLD_LOG"; ctld_up 3; do
    (($(date +%s) < deadline)) || fail "slurmctld is not UP after ${START_TIMEOUT}s" "$CTLD_LOG"
    sleep 0.1
done

for n in "${NODE_NAMES[@]}"; do
    slurmd -N "$n" >"$STATE/log/slurmd-$n.out" 2>&1 9>&- \
        || fail "slurmd -N $n failed: $(cat "$STATE/log/slurmd-$n.out")" "$STATE/log/slurmd-$n.log"
done
# slurmd forks and writes its pid file a little later; then wait for all nodes to be idle
deadline=$(($(date +%s) + START_TIMEOUT))
until nodes_in idle; do
    check_fatal "$CTLD_LOG" "${SLURMD_LOGS[@]}"
    if (($(date +%s) >= deadline)); then
        for n in "${NODE_NAMES[@]}"; do
            pid_alive "$STATE/run/slurmd-$n.pid" \
                || fail "slurmd -N $n is not running (no live pid in $STATE/run/slurmd-$n.pid)" "$STATE/log/slurmd-$n.log"
        done
        timeout 10 sinfo -N -l >&2 || true
        fail "nodes ${NODE_NAMES[*]} not all idle after ${START_TIMEOUT}s: $(node_states | tr '\n' ' ')" \
            "$CTLD_LOG" "${SLURMD_LOGS[@]}"
    fi
    sleep 0.1
done
for n in "${NODE_NAMES[@]}"; do   # normally already there
    for ((i = 0; i < 50; i++)); do pid_alive "$STATE/run/slurmd-$n.pid" && break; sleep 0.1; done
    pid_alive "$STATE/run/slurmd-$n.pid" || fail "no live pid in $STATE/run/slurmd-$n.pid" "$STATE/log/slurmd-$n.log"
done

dt=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "slurm test cluster up in ${dt}s: nodes=${NODE_NAMES[*]} (idle) cpus/node=$CPUS_PER_NODE partition=$PARTITION ctld_port=$CTLD_PORT slurmd_ports=$PORT_SPEC state=$STATE"
