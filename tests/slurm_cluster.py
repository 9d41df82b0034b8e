"""Helpers for tests that run real Slurm jobs on a local test cluster.

The cluster itself is started and stopped by ``slurm/cluster/start.sh`` / ``stop.sh`` (a real
munged + slurmctld + N x slurmd on this machine, emulated nodes ``n1..nN``; see
``slurm/cluster/README.md``). This module only wraps those scripts and the Slurm client commands;
it uses the standard library only.

Typical use in a test module::

    import pytest
    from slurm_cluster import cluster_available, local_cluster, submit, wait_job, job_output

    pytestmark = pytest.mark.skipif(not cluster_available(), reason="needs root + Slurm/apt")

    @pytest.fixture(scope="module")
    def slurm():
        with local_cluster() as cluster:
            yield cluster

    def test_two_nodes(slurm, tmp_path):
        script = tmp_path / "job.sh"
        script.write_text("#!/bin/bash\\nsrun bash -c 'echo $SLURM_PROCID'\\n")
        info = wait_job(submit(script, "--nodes=2", "--ntasks-per-node=1", "--time=2"), timeout=60)
        assert info["JobState"] == "COMPLETED", info
        assert sorted(job_output(info).split()) == ["0", "1"]

Notes: job ids restart at 1 after every start, so read the output through ``job_output(info)``
(the ``StdOut`` path Slurm reports), never by guessing a file name. Always give jobs a short
``--time``: a distributed job whose peers never come keeps retrying until its time limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator, Mapping, Optional, Union

REPO_ROOT = Path(__file__).resolve().parent.parent
START_SH = REPO_ROOT / "slurm" / "cluster" / "start.sh"
STOP_SH = REPO_ROOT / "slurm" / "cluster" / "stop.sh"
DEFAULT_STATE_DIR = "/run/resbm-slurm"

#: Job states after which a job will not change any more.
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "REVOKED", "SPECIAL_EXIT",
})

PathLike = Union[str, "os.PathLike[str]"]


class SlurmError(RuntimeError):
    """A Slurm command or one of the cluster scripts failed."""


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """What ``local_cluster()`` yields."""

    nodes: tuple          # ("n1", "n2", ...)
    cpus_per_node: int
    partition: str
    state_dir: Path       # logs are in state_dir / "log" (slurmctld.log, slurmd-nX.log, jobcomp.log)
    start_output: str     # start.sh's summary line


def cluster_available() -> bool:
    """True if this process could start the local cluster (root, and Slurm or apt-get present).

    Use it in ``pytest.mark.skipif``; it starts nothing.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    if not START_SH.is_file():
        return False
    have_slurm = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    return have_slurm or shutil.which("apt-get") is not None


def _run(cmd, *, env=None, timeout=60.0, check=True) -> subprocess.CompletedProcess:
    for attempt in range(3):
        try:
            proc = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise SlurmError(f"{' '.join(map(str, cmd))} timed out after {timeout}s") from e
        # a read-only query killed by a signal (seen once: scontrol show job, SIGPIPE, on a loaded
        # box) is asked again; anything that changes state is never repeated
        if not (proc.returncode < 0 and list(map(str, cmd[:2])) == ["scontrol", "show"]):
            break
        time.sleep(1)
    if check and proc.returncode != 0:
        raise SlurmError(f"{' '.join(map(str, cmd))} failed (rc={proc.returncode}):\n"
                         f"{proc.stdout}{proc.stderr}".rstrip())
    return proc


def start_cluster(*, nodes: int = 2, cpus_per_node: int = 4, partition: str = "debug",
                  state_dir: Optional[PathLike] = None, extra_env: Optional[Mapping[str, str]] = None,
                  timeout: float = 300.0) -> ClusterInfo:
    """Run start.sh (idempotent: a healthy cluster with the same settings is left as it is).

    ``timeout`` covers a first-time apt-get install. Raises SlurmError with start.sh's output
    (including the tail of the relevant daemon log) on failure.
    """
    env = _script_env(nodes=nodes, cpus_per_node=cpus_per_node, partition=partition,
                      state_dir=state_dir, extra_env=extra_env)
    proc = _run(["bash", START_SH], env=env, timeout=timeout)
    return ClusterInfo(nodes=tuple(f"n{k}" for k in range(1, nodes + 1)),
                       cpus_per_node=cpus_per_node, partition=partition,
                       state_dir=Path(env["SLURM_TEST_STATE"]),
                       start_output=proc.stdout.strip())


def stop_cluster(*, state_dir: Optional[PathLike] = None, timeout: float = 120.0) -> str:
    """Run stop.sh (cancels all jobs, waits for their steps, stops the daemons). Idempotent.

    Returns its summary line; raises SlurmError if something was still alive afterwards.
    """
    env = _script_env(state_dir=state_dir)
    return _run(["bash", STOP_SH], env=env, timeout=timeout).stdout.strip()


def _script_env(*, nodes=None, cpus_per_node=None, partition=None, state_dir=None,
                extra_env=None) -> dict:
    env = dict(os.environ)
    env["SLURM_TEST_STATE"] = str(state_dir or env.get("SLURM_TEST_STATE") or DEFAULT_STATE_DIR)
    if nodes is not None:
        env["NODES"] = str(nodes)
    if cpus_per_node is not None:
        env["CPUS_PER_NODE"] = str(cpus_per_node)
    if partition is not None:
        env["PARTITION"] = str(partition)
    env.update({k: str(v) for k, v in (extra_env or {}).items()})
    return env


@contextlib.contextmanager
def local_cluster(*, nodes: int = 2, cpus_per_node: int = 4, partition: str = "debug",
                  state_dir: Optional[PathLike] = None,
                  extra_env: Optional[Mapping[str, str]] = None,
                  start_timeout: float = 300.0, stop_timeout: float = 120.0) -> Iterator[ClusterInfo]:
    """Start the local Slurm cluster for the duration of a ``with`` block.

    stop.sh ALWAYS runs at exit: on normal exit, on an exception in the block, and also when
    start.sh itself failed (to clean up a half-started cluster). ``extra_env`` passes further
    settings to the scripts (MEM_PER_NODE_MB, CTLD_PORT, SLURMD_BASE_PORT, START_TIMEOUT,
    STOP_TIMEOUT). A stop failure is raised only if the block itself did not raise.
    """
    try:
        yield start_cluster(nodes=nodes, cpus_per_node=cpus_per_node, partition=partition,
                            state_dir=state_dir, extra_env=extra_env, timeout=start_timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            stop_cluster(state_dir=state_dir, timeout=stop_timeout)
        raise
    else:
        stop_cluster(state_dir=state_dir, timeout=stop_timeout)


def submit(script_path: PathLike, *sbatch_args: str, env: Optional[Mapping[str, str]] = None) -> int:
    """``sbatch --parsable [sbatch_args...] script_path``; returns the job id.

    ``env`` entries are added to (override) this process's environment for sbatch, which by
    default exports its whole environment to the job. Options in ``sbatch_args`` override the
    script's ``#SBATCH`` lines. Raises SlurmError if sbatch fails (e.g. the request can never be
    satisfied: EnforcePartLimits=ALL makes that an immediate error instead of a job pending forever).
    """
    full_env = dict(os.environ)
    full_env.update({k: str(v) for k, v in (env or {}).items()})
    proc = _run(["sbatch", "--parsable", *sbatch_args, script_path], env=full_env, timeout=60)
    out = proc.stdout.strip().splitlines()
    m = re.match(r"^(\d+)", out[-1]) if out else None   # "123" or "123;cluster"
    if not m:
        raise SlurmError(f"cannot parse a job id from sbatch --parsable output: {proc.stdout!r}")
    return int(m.group(1))


_KEY_RE = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/.\-]*)=")


def parse_scontrol_line(line: str) -> dict:
    """Parse one ``scontrol show ... -o`` line ("Key=value Key2=value with spaces ...") into a dict."""
    line = line.strip()
    keys = list(_KEY_RE.finditer(line))
    fields = {}
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(line)
        fields[m.group(1)] = line[m.end():end].strip()
    return fields


def job_info(job_id: Union[int, str]) -> dict:
    """The parsed fields of ``scontrol show job -o JOB_ID`` (JobState, ExitCode, StdOut, NodeList, ...)."""
    proc = _run(["scontrol", "show", "job", "-o", str(job_id)], timeout=30)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise SlurmError(f"scontrol show job {job_id} printed nothing")
    return parse_scontrol_line(lines[0])


def _state(info: Mapping[str, str]) -> str:
    return info.get("JobState", "").split()[0] if info.get("JobState") else ""


def wait_job(job_id: Union[int, str], timeout: float = 120.0, poll: float = 0.5) -> dict:
    """Poll ``scontrol show job -o JOB_ID`` every ``poll`` s until the job reaches a final state.

    Returns the parsed fields (JobState, ExitCode "rc:signal", StdOut, StdErr, NodeList, NumNodes,
    NumTasks, RunTime, Reason, ...). Does not raise for a failed job: check ``info["JobState"]``
    (e.g. ``== "COMPLETED"``) and ``info["ExitCode"]`` (``"0:0"``) yourself. If the job has not
    ended after ``timeout`` seconds, it is scancel'ed and TimeoutError is raised with its state.
    """
    deadline = time.monotonic() + timeout
    info: dict = {}
    while True:
        info = job_info(job_id)
        if _state(info) in TERMINAL_STATES:
            return info
        if time.monotonic() >= deadline:
            break
        time.sleep(poll)
    _run(["scancel", str(job_id)], check=False, timeout=30)
    raise TimeoutError(
        f"Slurm job {job_id} did not end within {timeout}s: JobState={info.get('JobState')} "
        f"Reason={info.get('Reason')} RunTime={info.get('RunTime')} NodeList={info.get('NodeList')} "
        f"StdOut={info.get('StdOut')} (the job was cancelled)")


def job_output(info: Mapping[str, str]) -> str:
    """The text of the job's StdOut file, as reported by ``wait_job`` / ``job_info``.

    (With sbatch's default, stderr goes to the same file.)
    """
    path = info.get("StdOut")
    if not path:
        raise SlurmError(f"job {info.get('JobId')} has no StdOut field: {dict(info)}")
    return Path(path).read_text(errors="replace")
