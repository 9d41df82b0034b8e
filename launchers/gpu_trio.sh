#!/usr/bin/env bash
# The headline trio on one GPU, same tokens each (resbm_ds/configs/bench-gpu-trio.yaml, 109M
# parameters, bf16, one process): the uncompressed model with the same token tables (the fair
# control), the default ResBM at 128x (h=8 + token tables, ids read locally) and ResBM at 128x without
# ids (h=8).
#   bash launchers/gpu_trio.sh OUT            # about 3 minutes a run on an H100/H200-class GPU
#   bash launchers/gpu_trio.sh OUT --tiny     # the same script at toy size, to check it on a CPU
# Writes OUT/<run>/ (the run directory), OUT/<run>.log and OUT/results.json (machine, each run's
# curve, final val loss and tokens/s, the gaps against the control).
set -euo pipefail
OUT="${1:?usage: gpu_trio.sh OUT [--tiny]}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$ROOT/launchers/setup.sh"
cd "$ROOT"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
extra=()
if [ "${2:-}" = "--tiny" ]; then
  extra=(model.hidden_size=64 model.num_heads=4 train.steps=6 train.eval_every=3 train.warmup_steps=2
         deepspeed.train_micro_batch_size_per_gpu=2 deepspeed.bf16.enabled=false data.seq_len=64 model.max_seq_len=64)
fi
tables=(bottleneck.token_channel=learned bottleneck.token_ids=local)   # the default's, spelled out (V=4,096)
resbm=(bottleneck.method=resbm bottleneck.wire_dtype=bf16 bottleneck.init=identity bottleneck.decoder=linear
       bottleneck.decoder_norm=rms)
declare -A runs=(
  [none-tok]="bottleneck.method=none ${tables[*]}"
  [resbm-tok]="${resbm[*]} bottleneck.width=8 ${tables[*]}"
  [resbm]="${resbm[*]} bottleneck.width=8 bottleneck.token_channel=none"
)
mkdir -p "$OUT"
for name in none-tok resbm-tok resbm; do
  # shellcheck disable=SC2086
  python -m resbm_ds.train --config bench-gpu-trio ${runs[$name]} "${extra[@]}" "train.out_dir=$OUT/$name" 2>&1 \
    | tee "$OUT/$name.log"
done
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from resbm_ds.bench.convergence import analyse
from resbm_ds.bench.runner import machine_info
out = Path(sys.argv[1])
runs = {n: analyse(out / n) for n in ("none-tok", "resbm-tok", "resbm")}
control = runs["none-tok"]["final_val_loss"]
gaps = {n: 100 * (r["final_val_loss"] / control - 1) for n, r in runs.items() if n != "none-tok"}
(out / "results.json").write_text(json.dumps(dict(machine=machine_info(), runs=runs, gap_vs_control_pct=gaps), indent=1))
for n, r in runs.items():
    print(f"{n:10s} tokens {r['tokens']:,}  val {r['final_val_loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s"
          + (f"  gap {gaps[n]:+.2f}%" if n in gaps else "  (control)"))
PY
