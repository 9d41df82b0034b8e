"""What every benchmark suite shares: one run as a logged subprocess, its environment, and the
machine it ran on."""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import deepspeed
import torch

from ..config import REPO_ROOT
from ..system import CPU_ENV


def run_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    for key, value in CPU_ENV.items():
        if key != "DS_ACCELERATOR" or not torch.cuda.is_available():
            env.setdefault(key, value)
    return env


def run_logged(cmd: list[str], run_dir: Path, timeout_s: int, env: dict, fresh: bool = True,
               started=None) -> tuple[int, float]:
    """Run `cmd` in `run_dir` (command.txt, log.txt; emptied first when `fresh`, else the log is
    appended to, as a resumed run's), in its own process group so a timeout kills it with every rank
    it started; `started(pid)` learns the group. -> (exit code, -9 on timeout; wall seconds)."""
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "command.txt", "w" if fresh else "a") as f:
        f.write(" ".join(cmd) + "\n")
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "w" if fresh else "a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        if started:
            started(proc.pid)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
            log.write(f"\n[bench] killed after {timeout_s} s\n")
    return rc, time.perf_counter() - t0


def log_tail(run_dir: Path, lines: int = 25) -> str:
    """The end of a run's log, without progress-bar lines."""
    text = (run_dir / "log.txt").read_text(errors="replace")
    kept = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    return "\n".join(kept[-lines:])


def children_cpu_s() -> float:
    """CPU seconds used by finished child processes (torchrun and, through it, the ranks)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return dict(cpu=cpu or "unknown", cores=cores, logical_cpus=os.cpu_count(), memory_gib=mem,
                gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                os=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                deepspeed=deepspeed.__version__, hostname=socket.gethostname(),
                load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def write_results(results: dict, out: Path, markdown) -> None:
    """DIR/results.json and DIR/results.md (`markdown(results)`), rewritten after every run."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))


def fmt(x, spec=",.0f") -> str:
    """A table cell: '–' for a missing value."""
    return "–" if x is None else format(x, spec)

