"""Shared test setup: DeepSpeed on CPU over gloo, offline, and a helper to launch real multi-process runs."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from resbm_ds.system import CPU_ENV, free_port  # noqa: F401  (free_port: the test modules take it from here)

REPO = Path(__file__).resolve().parent.parent
for _key, _value in CPU_ENV.items():
    os.environ.setdefault(_key, _value)


# The longest test files first (measured on 2 cores, longest first), so that the two pytest-xdist
# workers of launchers/test.sh end together instead of one idling while the other runs a long file
# it drew last. Order inside a file is kept.
LONG_FILES = ("test_bench.py", "test_runs.py", "test_faults.py", "test_methods_learn.py", "test_slurm.py", "test_sync.py",
              "test_train.py", "test_optim.py", "test_after_training.py", "test_netem.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


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
    proc = run_group(cmd, timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_group(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a process group of its own, killed
    whole when the command times out or the test is interrupted (pytest-timeout, Ctrl-C): killing
    only the launcher would leave its ranks waiting on each other, using the cores the next tests need."""
    with subprocess.Popen(cmd, cwd=kwargs.pop("cwd", REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


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


# ---- training runs shared by the test modules ---------------------------------------------------

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.max_seq_len=64",
        "data.seq_len=64", "bottleneck.ratio=16", "deepspeed.train_micro_batch_size_per_gpu=2",
        "deepspeed.gradient_accumulation_steps=2", "train.warmup_steps=2", "train.eval_batches=2"]


def rows(out):
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if r]


def train_args(out, *extra):
    """Arguments after the launcher's module flag (`deepspeed --module` / `torchrun -m`)."""
    return ["resbm_ds.train", "--config", "cpu-demo", f"train.out_dir={out}", *TINY, *extra]


ENV = {**os.environ, "PYTHONPATH": str(REPO)}
ONE = ["pipeline.stages=1", "bottleneck.segments=1", "bottleneck.method=none"]   # 1 process, seconds


def train1(out, *extra, check=True, timeout=300, env=None):
    """One process, no launcher (pipeline.stages=1)."""
    proc = run_group([sys.executable, "-m", *train_args(out, *ONE, *extra)], timeout,
                     env={**ENV, "MASTER_PORT": str(free_port()), **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


class RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
