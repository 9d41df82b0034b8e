#!/usr/bin/env bash
# Set up the virtualenv and run the test suite (pytest). With arguments: pytest with them
# (`bash launchers/test.sh -k core`). Without: the whole suite in three lanes, as CI runs it:
#   the fast lane (unit tests, no launches);
#   the tests that launch real processes, two files at a time (pytest-xdist): a quarter of their time
#     waits on launchers, Slurm, timeouts and sockets, so two at once finish in about 0.7 of the time;
#   the tests that assert wall-clock figures (marker `timing`), alone, as their tolerances assume.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launchers/setup.sh"
cd "$ROOT"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
if [ "$#" -gt 0 ]; then
  exec python -m pytest "$@"
fi
python -m pytest -q -m "not slow"
python -m pytest -q -m "slow and not timing" -n 2 --dist loadfile --durations=15
python -m pytest -q -m "slow and timing"
