#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install resbm-ds with its test extras.
# Sourced by the other launchers; safe to run again. On a CPU-only machine it installs the CPU build
# of torch first (torch==2.13.0), because an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RESBM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.resbm-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      python -m pip install -q torch
    else
      python -m pip install -q "torch==${RESBM_TORCH_VERSION:-2.13.0}"
    fi
  fi
  python -m pip install -q -e "$ROOT[dev]"
  touch "$stamp"
fi
# DeepSpeed on CPU: the CPU accelerator (gloo), one thread per rank, a private extension cache
# (DeepSpeed JIT-compiles a small comm op on first start; the shared cache is locked across installs).
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/resbm_ds/torch_extensions}"
export TOKENIZERS_PARALLELISM=false
# `bash launchers/setup.sh --prefetch` on a login node (or any machine with a compiler and registry
# access), with the TORCH_EXTENSIONS_DIR and RESBM_CACHE the jobs will use: builds DeepSpeed's CPU
# comm op and fetches the default corpus, the two things a compute node would otherwise do on first
# start (and often cannot: no network, no compiler, or $HOME not writable).
if [[ "${BASH_SOURCE[0]}" == "$0" && "${1:-}" == "--prefetch" ]]; then
  echo "[setup] prefetch: DeepSpeed's CPU comm op -> $TORCH_EXTENSIONS_DIR"
  DS_ACCELERATOR=cpu python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
  echo "[setup] prefetch: the default corpus -> ${RESBM_CACHE:-$HOME/.cache/resbm_ds}/corpus"
  python -m resbm_ds.corpus fetch
fi
