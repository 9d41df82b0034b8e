#!/usr/bin/env bash
# Several machines with the `deepspeed` launcher and a hostfile (run on the first host; it reaches
# the others over passwordless ssh). HOSTFILE lines look like `node1 slots=8`. Put one pipeline
# stage per host: slots per host = data-parallel size, pipeline.stages = number of hosts, so that
# only the compressed codes cross hosts (rank = stage * dp + dp_rank).
# The environment reaches remote hosts through ./.deepspeed_env (DeepSpeed reads it); this script
# writes the variables DeepSpeed needs on CPU into it.
#   HOSTFILE=hosts bash launchers/deepspeed_hostfile.sh --config my.yaml pipeline.stages=2
#
# Shell safety: with several hosts DeepSpeed's PDSH runner joins the arguments into ONE command for
# each remote shell and quotes only the arguments that contain a space (in double quotes, where
# $, ` and \ still expand). So every argument without a space is passed single-quoted here (the
# remote shell removes the quotes and sees exactly the argument), and an argument with a space is
# refused when it holds a character a double-quoted string would expand.
# `--print-quoted ARGS...` prints the arguments as they are passed on (one per line) and exits.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

quote_for_pdsh() {   # ARGS -> QUOTED (an array), or exit 2 with a message
  QUOTED=()
  local arg
  for arg in "$@"; do
    if [[ "$arg" == *" "* ]]; then
      if [[ "$arg" == *[\$\`\\\"]* ]]; then
        echo "error: argument '$arg': a space together with \$, \`, \\ or \" cannot reach the remote hosts" \
             "safely through pdsh (DeepSpeed quotes it in double quotes); drop the space or those characters" >&2
        exit 2
      fi
      QUOTED+=("$arg")          # DeepSpeed wraps it in double quotes, which expand nothing here
    else
      QUOTED+=("'${arg//\'/\'\\\'\'}'")   # POSIX single quotes; a ' inside becomes '\''
    fi
  done
}

if [[ "${1:-}" == "--print-quoted" ]]; then
  shift
  quote_for_pdsh "$@"
  [ ${#QUOTED[@]} -eq 0 ] || printf '%s\n' "${QUOTED[@]}"
  exit 0
fi

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
# One host: DeepSpeed starts the ranks locally, without a shell, so the arguments pass as they are.
if [ "$(awk 'NF && $1 !~ /^#/' "$HOSTFILE" | wc -l)" -gt 1 ]; then
  quote_for_pdsh "$@"
  set -- "${QUOTED[@]}"
fi
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module resbm_ds.train "$@"
