"""Training entry point: `python -m resbm_ds.train --config FILE [--resume] [section.key=value ...]`.

Run it under `deepspeed --num_gpus N`, `torchrun --nproc_per_node N`, or `srun` (one task per rank).
Everything is checked before the process group starts (config, data paths, world size, the run
directory, resume compatibility); then each rank builds its slice of the pipeline, and the loop
runs DeepSpeed's `train_batch` / `eval_batch`.

Outputs in `train.out_dir`:
  config.yaml         the resolved configuration
  metrics.jsonl       one JSON row per logged step (loss, lr, grad norm, tokens, tokens/s, model
                      FLOP/s, wire bytes, peak memory, time), per eval and per checkpoint
  tensorboard/        the same scalars on the step axis (tracking.tensorboard); W&B / MLflow if on
  tokenizer/          the tokenizer the run used
  checkpoints/<tag>   DeepSpeed checkpoints; `latest` names the newest complete one
  .lock               flock'ed by rank 0 while the run lives: a second run into the directory is
                      refused (run_dir.lock_run_dir)

SIGTERM, SIGUSR1 (Slurm's `--signal` before the time limit) and SIGINT stop the run after the
current step on every rank: it saves a checkpoint, says so in one line, and exits with 128 + the
signal number; `--resume` continues at the next step. A launcher that ends (the `deepspeed` runner
on SIGTERM or SIGINT, which forwards neither) stops the ranks the same way, with exit 143; a
training step in which nothing crosses between stages for runtime.dist_timeout_s seconds ends the rank
with one line (watch.py).
"""
from __future__ import annotations

import argparse
import sys

from .cli import ArgumentParser, cli


def parse_args(argv=None):
    p = ArgumentParser(prog="python -m resbm_ds.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML/JSON file or preset name (resbm_ds/configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--resume-from", metavar="TAG", help="continue from OUT/checkpoints/TAG (e.g. step200)")
    p.add_argument("--overwrite", action="store_true",
                   help="start from scratch in an out_dir that holds a run, deleting its checkpoints and metrics")
    p.add_argument("--print-config", action="store_true", help="validate, print the resolved config (YAML), exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate everything (config, data, run directory), print the config and the plan, exit")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)   # passed by `deepspeed`
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.hidden_size=512")
    return p.parse_args(argv)


@cli
def main(argv=None) -> int:
    args = parse_args(argv)
    # here, after parsing: --help and a bad option answer before torch and DeepSpeed load
    from .run_dir import unlock_run_dir
    from .trainer import run_main
    try:
        return run_main(args)
    finally:
        unlock_run_dir()   # main called in-process (tests); a process that ends lets go anyway


if __name__ == "__main__":
    sys.exit(main())
