"""Test-only entry point for the Slurm fail-fast test: `python -m slurm_victim ARGS` runs
`resbm_ds.train` with ARGS, and the rank named by RESBM_TEST_KILL_RANK SIGKILLs itself once the
run's metrics.jsonl has its first row (training is under way, every rank is in the pipeline).

The templates run it through RESBM_ENTRY=slurm_victim with tests/workers on PYTHONPATH; the
product code has no test hook.
"""
import os
import signal
import sys
import threading
import time
from pathlib import Path


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):   # torchrun/deepspeed set RANK; plain srun only SLURM_PROCID
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _watch(metrics: Path):
    while not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    sys.stdout.write(f"[victim] rank {_rank()} on {os.environ.get('SLURMD_NODENAME')} kills itself (SIGKILL)\n")
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    args = sys.argv[1:]
    out = next(a.split("=", 1)[1] for a in args if a.startswith("train.out_dir="))
    if _rank() == int(os.environ.get("RESBM_TEST_KILL_RANK", "1")):
        threading.Thread(target=_watch, args=(Path(out) / "metrics.jsonl",), daemon=True).start()
    from resbm_ds.train import main as train_main
    sys.exit(train_main(args))


if __name__ == "__main__":
    main()
