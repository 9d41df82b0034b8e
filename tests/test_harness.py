"""The test harness's own guarantee: a launch that times out leaves no process behind."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import run_group


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"      # a zombie has ended; only its exit status waits to be read


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


# a launcher that starts a worker and waits on it, as torchrun does with its ranks
def launcher(pid_file: Path) -> list[str]:
    return ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"]


def test_a_timed_out_launch_is_killed_with_every_process_it_started(tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        run_group(launcher(tmp_path / "worker.pid"), timeout=2)
    assert gone_within(int((tmp_path / "worker.pid").read_text()), 5)


def test_subprocess_run_alone_would_leave_the_worker_running(tmp_path):
    """The control: what run_group exists to prevent."""
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(launcher(tmp_path / "worker.pid"), timeout=2)
    worker = int((tmp_path / "worker.pid").read_text())
    try:
        assert not gone_within(worker, 1)
    finally:
        os.kill(worker, signal.SIGKILL)
