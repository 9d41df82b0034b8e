# shellcheck shell=bash
# Shared body of the slurm/*.sbatch templates. Sourced, never run: the templates call
#
#   resbm_setup cpu|gpu "$@"     checks, environment, run directory, rendezvous, the argument list
#   resbm_launch srun|torchrun|deepspeed
#                                runs the job step, prints one verdict line, returns the step's code
#
# Every line it prints starts with "resbm: ". Settings (environment variables; sbatch passes the
# submitting shell's environment to the job, so `RESBM_RUN_DIR=... sbatch ...` works):
#
#   RESBM_HOME          repository root                    [found from the submitted script's path]
#   RESBM_VENV          virtualenv to activate             [$RESBM_HOME/.venv]
#   RESBM_RUN_DIR       run directory (train.out_dir)      [$SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME]
#                       A `train.out_dir=...` argument wins over it.
#   RESBM_STAGES        pipeline stages: "nodes" = one stage per node, a number, or "config" to
#                       keep the config's value. A `pipeline.stages=...` argument wins.   [nodes]
#   RESBM_ENTRY         Python module each rank runs                         [resbm_ds.train]
#   RESBM_MASTER_ADDR   rendezvous host       [first node; its NodeAddr if the name does not resolve]
#   RESBM_MASTER_PORT   rendezvous port                              [20000 + job id % 10000]
#   RESBM_DIST_TIMEOUT  seconds a rank waits for its peers (rendezvous, collectives): overrides
#                       the config's runtime.dist_timeout_s                                [config: 300]
#   RESBM_SRUN_WAIT     seconds srun lets the other tasks run after the first one ended   [60]
#   RESBM_SRUN_ARGS     extra options for the job step's srun (split on whitespace, never
#                       glob-expanded; an option cannot hold a space)                     []
#   RESBM_STRICT_LAYOUT 1 = a node holding several stages / a stage spanning nodes is an error
#                       (overrides runtime.strict_layout)                                [config: 0]
#   TORCH_EXTENSIONS_DIR  DeepSpeed's JIT-built ops   [$HOME/.cache/resbm_ds/torch_extensions]

resbm_log() { echo "resbm: $*"; }
# resbm_job_field NAME: a field of this job. The multi-line `scontrol show job` puts Command=,
# WorkDir=, StdErr= and StdOut= each on a line of its own, so a path with spaces stays whole
# (the one-line -o form separates fields by spaces too).
resbm_job_field() { scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n "s/^ *$1=//p" | head -n1; }
resbm_warn() { echo "resbm: WARNING: $*" >&2; }
resbm_die() {   # resbm_die MESSAGE: a problem found before any rank started; ends the job
    echo "resbm: ERROR: $*" >&2
    echo "resbm: job aborted before launch (job ${SLURM_JOB_ID:-?})" >&2
    exit 2
}

# "2(x3),1" -> "2 2 2 1": the ranks each node of the allocation holds
_resbm_expand_tasks() {
    local part k parts out=()
    IFS=, read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ "$part" =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            for ((k = 0; k < BASH_REMATCH[2]; k++)); do out+=("${BASH_REMATCH[1]}"); done
        elif [[ "$part" =~ ^[0-9]+$ ]]; then
            out+=("$part")
        fi
    done
    echo "${out[*]}"
}

# _resbm_ranges "0 1 2 5" -> "0-2,5"
_resbm_ranges() {
    local res="" start="" prev="" r
    for r in $1; do
        if [[ -n "$prev" && "$r" == "$((prev + 1))" ]]; then prev=$r; continue; fi
        [[ -n "$start" ]] && res+="${res:+,}$start$([[ "$prev" != "$start" ]] && echo "-$prev")"
        start=$r; prev=$r
    done
    [[ -n "$start" ]] && res+="${res:+,}$start$([[ "$prev" != "$start" ]] && echo "-$prev")"
    echo "$res"
}

resbm_setup() {
    local device="$1"; shift
    RESBM_T0=$(date +%s)
    export RESBM_DEVICE="$device"
    [[ -n "${SLURM_JOB_ID:-}" ]] || resbm_die "not inside a Slurm job: submit this template with sbatch"
    [[ "$device" == cpu || "$device" == gpu ]] || resbm_die "resbm_setup: device must be cpu or gpu, got '$device'"

    # ---- the code and its virtualenv
    RESBM_VENV="${RESBM_VENV:-$RESBM_HOME/.venv}"
    [[ -f "$RESBM_VENV/bin/activate" ]] \
        || resbm_die "no virtualenv at RESBM_VENV=$RESBM_VENV: create it once on a login node with 'bash launchers/setup.sh' (on a shared filesystem), or set RESBM_VENV"
    # shellcheck disable=SC1091
    . "$RESBM_VENV/bin/activate"
    export PYTHONPATH="$RESBM_HOME${PYTHONPATH:+:$PYTHONPATH}"   # run this checkout's code
    python -c 'import resbm_ds' 2>/dev/null \
        || resbm_die "python in $RESBM_VENV cannot import resbm_ds (RESBM_HOME=$RESBM_HOME)"
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/resbm_ds/torch_extensions}"
    # A launcher variable inherited from the submitting shell would give every rank the same rank.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK NODE_RANK MASTER_ADDR MASTER_PORT

    # ---- the allocation: N nodes x P ranks, the same P on every node
    read -ra RESBM_NODES <<<"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')"
    RESBM_NNODES=${#RESBM_NODES[@]}
    ((RESBM_NNODES == ${SLURM_JOB_NUM_NODES:-$RESBM_NNODES})) \
        || resbm_die "scontrol lists $RESBM_NNODES nodes in $SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES=$SLURM_JOB_NUM_NODES"
    local per_node
    read -ra per_node <<<"$(_resbm_expand_tasks "${SLURM_TASKS_PER_NODE:-}")"
    [[ ${#per_node[@]} -eq $RESBM_NNODES ]] \
        || resbm_die "cannot read ranks per node from SLURM_TASKS_PER_NODE='${SLURM_TASKS_PER_NODE:-}': give --nodes and --ntasks-per-node"
    RESBM_PER_NODE=${per_node[0]}
    local n
    for n in "${per_node[@]}"; do
        [[ "$n" == "$RESBM_PER_NODE" ]] \
            || resbm_die "uneven ranks per node (SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE): use --ntasks-per-node (= data-parallel size) so every node holds whole pipeline stages"
    done
    RESBM_NTASKS=$((RESBM_NNODES * RESBM_PER_NODE))
    RESBM_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"

    # ---- device
    if [[ "$device" == cpu ]]; then
        export DS_ACCELERATOR=cpu
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$RESBM_CPUS_PER_TASK}"
    else
        # setup.sh on a GPU-less login node exports DS_ACCELERATOR=cpu; sbatch would carry it here
        [[ "${DS_ACCELERATOR:-cuda}" == cuda ]] || resbm_log "DS_ACCELERATOR=$DS_ACCELERATOR from the submitting shell replaced by cuda"
        export DS_ACCELERATOR=cuda
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$RESBM_CPUS_PER_TASK}"
        export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a dead peer ends NCCL waits
        local gpus smi=0 where="${SLURMD_NODENAME:-this node}"
        gpus=$(python -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)
        command -v nvidia-smi >/dev/null 2>&1 && smi=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
        if ((${gpus:-0} == 0 && smi > 0)); then
            resbm_die "nvidia-smi lists $smi GPU(s) on $where but torch in $RESBM_VENV cannot use them ($(python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n1)): build the virtualenv on a GPU node (launchers/setup.sh installs the CPU build where nvidia-smi is missing)"
        fi
        ((${gpus:-0} > 0)) || resbm_die "this is a GPU template but no GPU is visible on $where (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES:-}'): request GPUs (--gpus-per-node) or use the cpu_* template"
        ((gpus >= RESBM_PER_NODE)) || resbm_die "$RESBM_PER_NODE ranks per node but only $gpus GPU(s) visible on $where: --ntasks-per-node must equal --gpus-per-node"
    fi

    # ---- arguments for the entry point: "$@" plus the run directory and the stage count
    local -a added=()
    local a out_dir="" stages_arg="" resume=0
    for a in "$@"; do
        case "$a" in
            train.out_dir=*) out_dir="${a#train.out_dir=}" ;;
            pipeline.stages=*) stages_arg="${a#pipeline.stages=}" ;;
            --resume) resume=1 ;;
        esac
    done
    if [[ -n "$out_dir" ]]; then
        RESBM_RUN_DIR="$out_dir"
    else
        RESBM_RUN_DIR="${RESBM_RUN_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/runs/$SLURM_JOB_NAME}"
        added+=("train.out_dir=$RESBM_RUN_DIR")
    fi
    [[ "$RESBM_RUN_DIR" == /* ]] || RESBM_RUN_DIR="$PWD/$RESBM_RUN_DIR"
    RESBM_STAGES_NOTE=""
    if [[ -n "$stages_arg" ]]; then
        RESBM_STAGE_COUNT="$stages_arg"
    else
        case "${RESBM_STAGES:-nodes}" in
            nodes) RESBM_STAGE_COUNT=$RESBM_NNODES; RESBM_STAGES_NOTE=" (one per node)" ;;
            config) RESBM_STAGE_COUNT="" ;;
            *[!0-9]* | "") resbm_die "RESBM_STAGES must be 'nodes', 'config' or a number, got '${RESBM_STAGES}'" ;;
            *) RESBM_STAGE_COUNT=$RESBM_STAGES ;;
        esac
        [[ -n "$RESBM_STAGE_COUNT" ]] && added+=("pipeline.stages=$RESBM_STAGE_COUNT")
    fi
    # the entry point takes its key=value overrides as one group: add ours right after the last one
    local i last=-1 args=("$@")
    for ((i = 0; i < ${#args[@]}; i++)); do
        [[ "${args[i]}" =~ ^[^-][^=]*= ]] && last=$i
    done
    if ((last < 0)); then
        RESBM_ARGS=("${args[@]}" "${added[@]}")
    else
        RESBM_ARGS=("${args[@]:0:last+1}" "${added[@]}" "${args[@]:last+1}")
    fi
    if ((${SLURM_RESTART_COUNT:-0} > 0 && resume == 0)); then
        RESBM_ARGS+=("--resume")
        resbm_log "requeued job (restart ${SLURM_RESTART_COUNT}): adding --resume, continuing from $RESBM_RUN_DIR/checkpoints/latest"
    fi
    mkdir -p "$RESBM_RUN_DIR/logs" || resbm_die "cannot create the run directory $RESBM_RUN_DIR"
    # keep a pointer to this job's Slurm log next to the run's outputs
    local stdout_path
    stdout_path=$(resbm_job_field StdOut)
    if [[ -n "$stdout_path" && -e "$stdout_path" ]]; then
        ln -sfn "$stdout_path" "$RESBM_RUN_DIR/logs/slurm-$SLURM_JOB_ID.out" 2>/dev/null || true
    fi

    # ---- rendezvous: the first node of the allocation, a port derived from the job id
    local first="${RESBM_NODES[0]}"
    if [[ -n "${RESBM_MASTER_ADDR:-}" ]]; then
        MASTER_ADDR="$RESBM_MASTER_ADDR"
    elif getent hosts "$first" >/dev/null 2>&1; then
        MASTER_ADDR="$first"
    else   # node names that are not host names: use the address Slurm talks to
        MASTER_ADDR=$(scontrol show node -o "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
        [[ -n "$MASTER_ADDR" ]] || resbm_die "node name $first does not resolve and scontrol shows no NodeAddr for it; set RESBM_MASTER_ADDR"
    fi
    MASTER_PORT="${RESBM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"
    export MASTER_ADDR MASTER_PORT
    # RESBM_DIST_TIMEOUT and RESBM_STRICT_LAYOUT reach the ranks only when set: unset, the config's
    # runtime.dist_timeout_s / runtime.strict_layout apply (config.yaml records what ran)
    RESBM_SRUN_WAIT="${RESBM_SRUN_WAIT:-60}"
    RESBM_ENTRY="${RESBM_ENTRY:-resbm_ds.train}"

    # ---- say what will happen
    resbm_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) on ${SLURM_JOB_NODELIST}: $RESBM_NNODES node(s) x $RESBM_PER_NODE rank(s) = $RESBM_NTASKS ranks, $device; run dir $RESBM_RUN_DIR"
    resbm_log "rendezvous $MASTER_ADDR:$MASTER_PORT; peers wait at most ${RESBM_DIST_TIMEOUT:-runtime.dist_timeout_s of the config, default 300}s (RESBM_DIST_TIMEOUT); time limit $(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null || echo '?')"
    _resbm_layout_plan
}

# The placement the allocation implies: ranks are laid out in blocks (node k holds ranks
# k*P .. k*P+P-1) and DeepSpeed numbers rank = stage*dp + dp_id, so with dp == P each node holds
# exactly one stage and only the compressed boundary tensors cross nodes. The ranks confirm
# the real placement in the "[resbm] rank R node N stage S dp D" lines.
_resbm_layout_plan() {
    local S="${RESBM_STAGE_COUNT:-}" P=$RESBM_PER_NODE N=$RESBM_NNODES k plan=""
    for ((k = 0; k < N; k++)); do
        plan+="${plan:+, }${RESBM_NODES[k]}: ranks $(_resbm_ranges "$(seq -s ' ' $((k * P)) $((k * P + P - 1)))")"
    done
    if [[ -z "$S" ]]; then
        resbm_log "layout: $plan; pipeline.stages from the config (RESBM_STAGES=config), the ranks report the placement"
        return
    fi
    if [[ ! "$S" =~ ^[0-9]+$ ]] || ((S < 1 || RESBM_NTASKS % S)); then
        resbm_die "pipeline.stages=$S must divide the number of ranks ($RESBM_NTASKS = $N nodes x $P)"
    fi
    local dp=$((RESBM_NTASKS / S))
    if ((dp == P)); then
        resbm_log "layout: $plan -> pipeline.stages=$S$RESBM_STAGES_NOTE x data-parallel $dp: one pipeline stage per node, only compressed activations cross nodes"
    elif ((dp < P)); then
        local msg="pipeline.stages=$S x data-parallel $dp: each node holds $((P / dp)) stages (${plan})"
        if ((N > 1)); then resbm_warn "layout: $msg; not one stage per node (give --nodes=$S or pipeline.stages=$N)"
        else resbm_log "layout: $msg (single node)"; fi
    else
        resbm_warn "layout: pipeline.stages=$S x data-parallel $dp on $N nodes x $P ranks: each stage spans $((dp / P)) nodes, so its full-size gradient all-reduce crosses nodes ($plan)"
    fi
}

_resbm_on_signal() { RESBM_SIGNALLED="$1"; }

# resbm_launch PATTERN: run the ranks as one job step and report how it ended.
resbm_launch() {
    local pattern="$1" step=()
    local common=(--nodes="$RESBM_NNODES" --kill-on-bad-exit=1 --wait="$RESBM_SRUN_WAIT")
    local extra=()
    read -ra extra <<<"${RESBM_SRUN_ARGS:-}"   # words, not globs: '*' stays '*'
    export RESBM_ENTRY RESBM_NNODES RESBM_PER_NODE
    case "$pattern" in
        srun)   # one task per rank; resbm_ds maps SLURM_PROCID/NTASKS/LOCALID to RANK/WORLD_SIZE/LOCAL_RANK
            step=(srun "${common[@]}" --ntasks="$RESBM_NTASKS" --ntasks-per-node="$RESBM_PER_NODE"
                  --distribution=block --cpus-per-task="$RESBM_CPUS_PER_TASK" "${extra[@]}"
                  python -u -m "$RESBM_ENTRY" "${RESBM_ARGS[@]}")
            RESBM_TASK_KIND=rank ;;
        torchrun|deepspeed)   # one launcher per node, each starts the node's ranks
            if [[ "$pattern" == deepspeed ]]; then
                export RESBM_HOSTFILE="$RESBM_RUN_DIR/logs/hostfile-$SLURM_JOB_ID"
                local h
                for h in "${RESBM_NODES[@]}"; do echo "$h slots=$RESBM_PER_NODE"; done >"$RESBM_HOSTFILE"
            fi
            step=(srun "${common[@]}" --ntasks="$RESBM_NNODES" --ntasks-per-node=1
                  --cpus-per-task="$((RESBM_PER_NODE * RESBM_CPUS_PER_TASK))" "${extra[@]}"
                  bash "$RESBM_HOME/slurm/lib/node_launch.sh" "$pattern" "${RESBM_ARGS[@]}")
            RESBM_TASK_KIND=node ;;
        *) resbm_die "resbm_launch: unknown pattern '$pattern' (srun, torchrun or deepspeed)" ;;
    esac
    resbm_log "launch ($pattern): ${step[*]}"
    resbm_log "fail-fast: srun --kill-on-bad-exit=1 ends every rank as soon as one fails"

    RESBM_SIGNALLED=""
    trap '_resbm_on_signal TERM' TERM
    trap '_resbm_on_signal INT' INT
    trap '_resbm_on_signal USR1' USR1
    # A copy of everything the ranks print (both streams): the failure report below reads it,
    # srun names the failing task ("srun: error: n2: task 3: Killed"), the launchers the rank.
    local steplog="$RESBM_RUN_DIR/logs/step-$SLURM_JOB_ID.log" rc outfd errfd outpid errpid
    echo "----- resbm: job $SLURM_JOB_ID step started $(date '+%F %T') -----" >>"$steplog"
    exec {outfd}> >(tee -a "$steplog")
    outpid=$!
    exec {errfd}> >(tee -a "$steplog" >&2)
    errpid=$!
    "${step[@]}" 1>&"$outfd" 2>&"$errfd"
    rc=$?
    exec {outfd}>&- {errfd}>&-
    wait "$outpid" "$errpid" 2>/dev/null   # let the copies reach the file
    trap - TERM INT USR1
    # this attempt's part of the log (a requeued job appends to the same file)
    awk -v mark="----- resbm: job $SLURM_JOB_ID step started" \
        'index($0, mark) == 1 {n = 0} {l[++n] = $0} END {for (i = 1; i <= n; i++) print l[i]}' \
        "$steplog" >"$steplog.last"
    _resbm_verdict "$rc" "$steplog.last" "$pattern" "$steplog"
    rm -f "$steplog.last"
    return "$rc"
}

# _resbm_code -9 -> "killed by SIGKILL"; 1 -> "exited with code 1" (Python's negative = signal)
_resbm_code() {
    if [[ "$1" =~ ^-([0-9]+)$ ]]; then echo "killed by SIG$(kill -l "${BASH_REMATCH[1]}" 2>/dev/null || echo "${BASH_REMATCH[1]}")"
    else echo "exited with code $1"; fi
}

# _resbm_failed_rank ERRLOG torchrun|deepspeed NODE_RANK -> "GLOBAL_RANK exit code X" of the rank
# that failed first, read from the launcher's own report (torchrun: "Root Cause"; DeepSpeed's
# launch.py: "[... '--local_rank=L', ...] exits with return code = X")
_resbm_failed_rank() {
    local errlog="$1" pattern="$2" k="$3" rank code
    if [[ "$pattern" == torchrun ]]; then   # torchrun reports the global rank
        read -r rank code < <(awk '/Root Cause/ {f = 1} f && /^ *rank *:/ {r = $3}
            f && /^ *exitcode *:/ {print r, $3; exit}' "$errlog" 2>/dev/null)
        [[ "$rank" =~ ^[0-9]+$ ]] && echo "$rank $(_resbm_code "$code")"
    else
        local line
        line=$(grep -Em1 "'--local_rank=[0-9]+'.* exits with return code = -?[0-9]+" "$errlog" 2>/dev/null)
        if [[ "$line" =~ --local_rank=([0-9]+).*exits\ with\ return\ code\ =\ (-?[0-9]+) ]]; then
            echo "$((k * RESBM_PER_NODE + BASH_REMATCH[1])) $(_resbm_code "${BASH_REMATCH[2]}")"
        fi
    fi
}

_resbm_verdict() {
    local rc="$1" errlog="$2" pattern="$3" logpath="$4" dt=$(($(date +%s) - RESBM_T0)) line who what
    if ((rc == 0)); then
        local latest=""
        [[ -f "$RESBM_RUN_DIR/checkpoints/latest" ]] && latest=" (latest: $(cat "$RESBM_RUN_DIR/checkpoints/latest"))"
        resbm_log "job finished OK after ${dt}s: metrics $RESBM_RUN_DIR/metrics.jsonl, checkpoints $RESBM_RUN_DIR/checkpoints$latest"
        return
    fi
    line=$(grep -Em1 '^\[resbm\] stopped by SIG[A-Z0-9]+ after step [0-9]+' "$errlog" 2>/dev/null)
    if [[ -n "$line" ]]; then   # the trainer's own stop: every rank saved (train.py, StopSignals)
        echo "resbm: ${line#\[resbm\] } (after ${dt}s; a requeued job resumes by itself)" >&2
        return
    fi
    if [[ -n "$RESBM_SIGNALLED" ]]; then
        # srun stops relaying the ranks' output once it is signalled, so the trainer's own stop line
        # may not reach this log: say what the run directory holds (the ranks save on SIGTERM)
        local saved="no checkpoint yet"
        [[ -f "$RESBM_RUN_DIR/checkpoints/latest" ]] && saved="checkpoints/latest: $(cat "$RESBM_RUN_DIR/checkpoints/latest")"
        echo "resbm: job stopped by SIG$RESBM_SIGNALLED from Slurm (scancel, time limit or preemption) after ${dt}s, $saved; continue with --resume from $RESBM_RUN_DIR/checkpoints/latest (a requeued job does this by itself)" >&2
        return
    fi
    # the first task srun reports is the one that failed; the others were ended by srun
    line=$(grep -Em1 '^srun: error: [^:]+: tasks? [0-9]' "$errlog" 2>/dev/null)
    if [[ "$line" =~ ^srun:\ error:\ ([^:]+):\ tasks?\ ([0-9,-]+):\ (.*)$ ]]; then
        what="${BASH_REMATCH[3]}"
        [[ "$what" == Killed ]] && what="killed by a signal (SIGKILL: OOM killer, scancel or a crash)"
        if [[ "$RESBM_TASK_KIND" == rank ]]; then
            who="rank ${BASH_REMATCH[2]} on node ${BASH_REMATCH[1]}"
        else
            local node="${BASH_REMATCH[1]}" k="${BASH_REMATCH[2]%%[-,]*}" r
            r=$(_resbm_failed_rank "$errlog" "$pattern" "$k")
            if [[ -n "$r" ]]; then
                who="rank ${r%% *} on node $node"; what="${r#* } (its $pattern launcher: $what)"
            else
                who="the $pattern launcher on node $node (ranks $((k * RESBM_PER_NODE))-$((k * RESBM_PER_NODE + RESBM_PER_NODE - 1)))"
            fi
        fi
        local cause
        cause=$(grep -Em1 'trying to connect to|DistNetworkError|DistStoreError|^error( \(rank [0-9]+\))?: ' "$errlog" 2>/dev/null | cut -c1-300)
        [[ -n "$cause" ]] && what+="; first error: $cause"
        echo "resbm: rank failure, job aborted: $who: $what; srun ended the other ranks (exit code $rc, after ${dt}s). Rank output: $logpath" >&2
    else
        echo "resbm: rank failure, job aborted: the job step exited with code $rc after ${dt}s (no rank ran to the end). Rank output: $logpath" >&2
    fi
}
