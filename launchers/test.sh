#!/usr/bin/env bash
# Set up the virtualenv and run the whole test suite (pytest). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launchers/setup.sh"
cd "$ROOT"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
python -m pytest "$@"
