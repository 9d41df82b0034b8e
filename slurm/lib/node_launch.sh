#!/usr/bin/env bash
# One launcher per node: started by resbm_launch (slurm/lib/resbm_job.sh) as an srun step with one
# task per node; it starts this node's ranks. Not meant to be run by hand.
#   node_launch.sh torchrun|deepspeed ARGS...   (ARGS go to python -m $RESBM_ENTRY)
# Reads MASTER_ADDR, MASTER_PORT, RESBM_ENTRY, RESBM_NNODES, RESBM_PER_NODE, RESBM_DIST_TIMEOUT and,
# for deepspeed, RESBM_HOSTFILE; the node rank is this srun task's SLURM_NODEID.
set -euo pipefail
kind="$1"; shift
node_rank="${SLURM_NODEID:?node_launch.sh must run as an srun task}"
# Slurm's --signal=USR1@T (the templates) reaches every process of the step: the launcher must
# survive it (an ignored signal stays ignored across exec) while each rank handles it by saving a
# checkpoint and stopping (resbm_ds/train.py installs its own handler over the inherited one).
trap '' USR1
case "$kind" in
    torchrun)
        # static rendezvous: node 0's agent hosts the store; --max-restarts=0: a failed rank ends
        # this node's ranks and the agent exits non-zero, which makes srun end the other nodes.
        exec python -m torch.distributed.run \
            --nnodes="$RESBM_NNODES" --node-rank="$node_rank" --nproc-per-node="$RESBM_PER_NODE" \
            --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
            --rdzv-conf="timeout=${RESBM_DIST_TIMEOUT:-300}" --max-restarts=0 \
            -m "$RESBM_ENTRY" "$@" ;;
    deepspeed)
        # --no_ssh: this node's launcher only; its launch.py kills the node's other ranks when one fails
        exec python -m deepspeed.launcher.runner \
            --hostfile="$RESBM_HOSTFILE" --no_ssh --node_rank="$node_rank" \
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
            --module "$RESBM_ENTRY" "$@" ;;
    *)
        echo "node_launch.sh: unknown launcher '$kind' (torchrun or deepspeed)" >&2
        exit 2 ;;
esac
