#!/usr/bin/env bash
# One machine, `deepspeed` launcher: NPROC processes (default: the pipeline needs at least
# pipeline.stages; 2 for the presets). On CPU this sets DS_ACCELERATOR=cpu / OMP_NUM_THREADS=1
# (launchers/setup.sh) and passes --num_gpus, without which deepspeed starts ONE process on CPU.
#   NPROC=4 bash launchers/deepspeed_local.sh --config cpu-demo deepspeed.zero_optimization.stage=1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launchers/setup.sh"
cd "$ROOT"
exec deepspeed --num_gpus "${NPROC:-2}" --master_port "${MASTER_PORT:-29500}" --module resbm_ds.train "$@"
