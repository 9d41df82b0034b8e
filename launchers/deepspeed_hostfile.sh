#!/usr/bin/env bash
# Several machines with the `deepspeed` launcher and a hostfile (run on the first host; it reaches
# the others over passwordless ssh). HOSTFILE lines look like `node1 slots=8`. Put one pipeline
# stage per host: slots per host = data-parallel size, pipeline.stages = number of hosts, so that
# only the compressed codes cross hosts (rank = stage * dp + dp_rank).
# The environment reaches remote hosts through ./.deepspeed_env (DeepSpeed reads it); this script
# writes the variables DeepSpeed needs on CPU into it.
#   HOSTFILE=hosts bash launchers/deepspeed_hostfile.sh --config my.yaml pipeline.stages=2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launchers/setup.sh"
cd "$ROOT"
: "${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile (lines: 'host slots=N')}"
{
  [ -n "${DS_ACCELERATOR:-}" ] && echo "DS_ACCELERATOR=$DS_ACCELERATOR"
  [ -n "${OMP_NUM_THREADS:-}" ] && echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"
  echo "TORCH_EXTENSIONS_DIR=$TORCH_EXTENSIONS_DIR"
  echo "PYTHONPATH=$ROOT"
} > .deepspeed_env
MASTER_ADDR="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module resbm_ds.train "$@"
