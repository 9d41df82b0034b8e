#!/usr/bin/env bash
# One machine, `torchrun`: NPROC processes (default 2). Same arguments as python -m resbm_ds.train.
#   NPROC=2 bash launchers/torchrun_local.sh --config cpu-demo train.steps=20
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launchers/setup.sh"
cd "$ROOT"
exec torchrun --nproc_per_node "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" --max-restarts 0 \
  -m resbm_ds.train "$@"
