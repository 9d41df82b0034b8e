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
import os
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
    try:
        return run(args)
    finally:
        unlock_run_dir()   # main called in-process (tests); a process that ends lets go anyway


def run(args) -> int:
    import torch.distributed as dist
    import yaml

    from .checkpoints.loading import UnsafeCheckpoint
    from .cli import ConfigError
    from .config import load_config
    from .engine import close_distributed
    from .launch import plan_launch
    from .model.accounting import cost_lines
    from .sync import SiteError
    from .trainer import Stopped, Trainer, TrainingError

    if args.dry_run:
        # What the model costs needs the config alone: printed in seconds, before the checks of the
        # launch (world size, data, tokenizer, run directory) that a paper-shape config may not pass here.
        cfg = load_config(args.config, args.overrides).validate()
        lines = cost_lines(cfg.spec, cfg.pipeline.stages, cfg.wire_bytes_per_token, cfg.dense_bytes_per_token())
        print("[resbm] " + "\n[resbm] ".join(lines), flush=True)
    # bad input: one line, exit 2 (cli.cli)
    plan = plan_launch(args.config, args.overrides, resume=args.resume, resume_from=args.resume_from,
                       overwrite=args.overwrite, dry_run=args.dry_run, config_only=args.print_config)
    if args.print_config or args.dry_run:
        sys.stdout.write(yaml.safe_dump(plan.cfg.to_dict(), sort_keys=False))
        if args.dry_run:
            print(plan.describe())
            print("[resbm] dry run: config, data and run directory are valid; nothing was started")
        return 0
    finished, stopped = False, None
    try:
        Trainer(plan).train()
        finished = True
    except Stopped as e:
        if dist.is_initialized() and dist.get_rank() == 0:
            print(f"[resbm] {e}", file=sys.stderr, flush=True)
        finished = True    # every rank saved and stops at the same step: leave together
        stopped = 128 + e.signum
        return stopped
    except (TrainingError, ConfigError, UnsafeCheckpoint, SiteError) as e:
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        close_distributed(barrier=finished)   # no barrier on error paths: a peer may be gone
        if stopped:
            # Saved, trackers closed, process group left: leave now. Tearing down the interpreter
            # (torch, DeepSpeed) takes seconds more on a busy node, out of a preemption's grace time.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(stopped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
