#!/usr/bin/env bash
# Several machines with `torchrun`: run this on EVERY machine with the same MASTER_ADDR, NNODES and
# NPROC (processes per machine = data-parallel size) and its own NODE_RANK (0..NNODES-1).
# With pipeline.stages = NNODES each machine holds one pipeline stage.
#   MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 NPROC=4 bash launchers/torchrun_multinode.sh --config my.yaml
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launchers/setup.sh"
cd "$ROOT"
: "${MASTER_ADDR:?set MASTER_ADDR to the first machine}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${NPROC:-1}" \
  --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --max-restarts 0 \
  -m resbm_ds.train "$@"
