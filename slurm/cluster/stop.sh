#!/usr/bin/env bash
# Tear down the local Slurm test cluster started by slurm/cluster/start.sh.
#
# Order matters: slurmstepd outlives slurmd, so first cancel all jobs and wait (bounded) for their
# steps to end (the <node>_<job>.<step> sockets in the spool directories disappear), then stop
# slurmd(s), slurmctld and munged by the pids in their pid files. Idempotent: safe when nothing runs.
#
# Environment (defaults in brackets):
#   SLURM_TEST_STATE  state directory; else read from /etc/slurm/slurm.conf's marker [/run/resbm-slurm]
#   STOP_TIMEOUT      seconds to wait for jobs/steps to end                          [30]
#   KEEP_MUNGE=1      leave munged running
# Exit status: 0 when everything stopped; 1 if job steps or daemons were still alive at the end.
set -uo pipefail

CONF=/etc/slurm/slurm.conf
MUNGE_PID=/run/munge/munged.pid
LOCK=/run/resbm-slurm.lock   # root-only /run, as in start.sh
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"
T0=$(date +%s.%N)
log() { echo "stop.sh: $*" >&2; }

if [[ "$(id -u)" != 0 ]]; then log "ERROR: must run as root"; exit 1; fi
[[ "$STOP_TIMEOUT" =~ ^[0-9]+$ ]] || { log "ERROR: STOP_TIMEOUT must be an integer"; exit 1; }

if [[ -n "${SLURM_TEST_STATE:-}" ]]; then
    STATE="$SLURM_TEST_STATE"
elif [[ -f "$CONF" ]] && head -n1 "$CONF" | grep -q '^# resbm-slurm-test-cluster state=/'; then
    STATE="$(head -n1 "$CONF" | sed 's/^# resbm-slurm-test-cluster state=//')"
else
    STATE=/run/resbm-slurm
fi
# the pid files it signals must be root's: a planted state directory could name any process
if [[ -e "$STATE" || -L "$STATE" ]] && { [[ -L "$STATE" ]] || [[ "$(stat -c %u "$STATE")" != 0 ]]; }; then
    log "ERROR: $STATE is a symlink or not owned by root; refusing to act on its pid files"
    exit 1
fi

if [[ -z "${RESBM_SLURM_LOCKED:-}" ]]; then
    [[ ! -L "$LOCK" ]] || { log "ERROR: $LOCK is a symlink; refusing to use it"; exit 1; }
    exec 9>"$LOCK"
    flock -w 120 9 || { log "ERROR: could not get the lock $LOCK within 120 s"; exit 1; }
fi

alive() {  # alive PID: a live process, not a zombie (pid 1 here may reap late)
    local st
    st="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" || return 1
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}
pid_of() {  # pid_of PIDFILE: print the pid if the file names a live process
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc 0-9 <"$1")"
    [[ -n "$pid" ]] && alive "$pid" && echo "$pid"
}
step_sockets() { compgen -G "$STATE/d/*/*_[0-9]*.*" || true; }
active_jobs() { timeout 10 squeue -h -o %A 2>/dev/null; }

problems=0

# ---------------------------------------------------------------- jobs
ctld_pid="$(pid_of "$STATE/run/slurmctld.pid")"
if [[ -n "$ctld_pid" ]] && command -v squeue >/dev/null; then
    jobs="$(active_jobs | tr '\n' ' ')"
    if [[ -n "${jobs// /}" ]]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 30 scancel $jobs 2>/dev/null || true
    fi
fi
# wait for the jobs to leave squeue and for their steps' sockets to disappear
if [[ -n "$ctld_pid" || -n "$(step_sockets)" ]]; then
    deadline=$(($(date +%s) + STOP_TIMEOUT))
    while :; do
        left_jobs=""
        [[ -n "$ctld_pid" ]] && left_jobs="$(active_jobs | tr '\n' ' ')"
        left_steps="$(step_sockets | tr '\n' ' ')"
        [[ -z "${left_jobs// /}" && -z "${left_steps// /}" ]] && break
        if (($(date +%s) >= deadline)); then
            log "WARNING: after ${STOP_TIMEOUT}s still active: jobs [${left_jobs}] step sockets [${left_steps}]"
            pgrep -a slurmstepd >&2 || true
            problems=1
            break
        fi
        sleep 0.2
    done
fi

# ---------------------------------------------------------------- daemons
stop_pidfile() {  # stop_pidfile PIDFILE NAME: TERM, wait up to 10 s, then KILL
    local pf="$1" name="$2" pid i
    pid="$(pid_of "$pf")" || { rm -f "$pf"; return 0; }
    # guard against a recycled pid: the process must be the daemon we expect
    if ! grep -q "$name" "/proc/$pid/comm" 2>/dev/null; then
        log "pid file $pf names pid $pid, which is not $name ($(cat "/proc/$pid/comm" 2>/dev/null)); leaving it"
        rm -f "$pf"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
        log "WARNING: $name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        sleep 0.2
    fi
    if alive "$pid"; then
        log "ERROR: $name (pid $pid) is still alive"
        problems=1
    else
        stopped+=("$name")
        rm -f "$pf"
    fi
}

stopped=()
for pf in "$STATE"/run/slurmd-*.pid; do
    [[ -e "$pf" ]] || continue
    stop_pidfile "$pf" slurmd
done
stop_pidfile "$STATE/run/slurmctld.pid" slurmctld
if [[ -z "${KEEP_MUNGE:-}" ]]; then
    stop_pidfile "$MUNGE_PID" munged
fi

dt=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
if ((${#stopped[@]} == 0)); then
    echo "slurm test cluster: nothing was running (state=$STATE)"
else
    echo "slurm test cluster stopped in ${dt}s: ${stopped[*]} (state=$STATE; logs in $STATE/log)"
fi
exit "$problems"
