"""Shared test setup: DeepSpeed on CPU over gloo, offline, and a helper to launch real multi-process runs."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "resbm_ds" / "torch_extensions"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def free_port() -> int:
    """A port the OS reports free right now (so concurrent test sessions do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, nprocs: int, timeout: int = 600, launcher: str = "torchrun", env=None, check=True):
    """Run `args` (a script and its arguments) in `nprocs` real processes; returns CompletedProcess."""
    port = free_port()
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}",
               f"--master_port={port}", *args]
    elif launcher == "deepspeed":
        cmd = ["deepspeed", f"--num_gpus={nprocs}", f"--master_port={port}", *args]
    else:
        raise ValueError(launcher)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_pipe_worker(tmp_path: Path, nprocs: int, steps: int, overrides, name="run"):
    """Run tests/workers/pipe_worker.py and return the per-rank reports, ordered by rank."""
    out = tmp_path / name
    launch([str(REPO / "tests" / "workers" / "pipe_worker.py"), str(out), str(steps), *overrides], nprocs)
    return [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(nprocs)]


def run_pipe_worker_cases(tmp_path: Path, nprocs: int, steps: int, cases: dict[str, list[str]]):
    """Run several configs through tests/workers/pipe_worker.py in one launch; {name: per-rank reports}."""
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps(cases))
    launch([str(REPO / "tests" / "workers" / "pipe_worker.py"), str(tmp_path / "run"), str(steps),
            f"--cases={spec}"], nprocs)
    return {name: [json.loads((tmp_path / f"run.{name}.rank{r}.json").read_text()) for r in range(nprocs)]
            for name in cases}
