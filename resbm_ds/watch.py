"""Watching a run's processes from inside each rank: its launcher, its progress, its peers.

    LauncherWatch  the launcher processes above this rank (`deepspeed` runner, its per-node
                   `deepspeed.launcher.launch`, `torchrun`): when one of them is gone, the rank is
                   asked to stop as on SIGTERM (save, one line, exit 143). The `deepspeed` runner
                   forwards no signal to its children, so without this a SIGTERM or SIGINT sent to
                   it leaves every rank running, orphaned, to the last step.
    ProgressWatch  a deadline inside each training step: a step in which nothing crosses between
                   stages for runtime.dist_timeout_s (a peer stopped, hung or unreachable) ends this rank
                   with one line naming the peer when it can, instead of a hang or a traceback. Each
                   message moves the deadline on, so a long step that keeps moving data never trips it.
    Peers          every rank's host and pid, gathered once at start, so that a rank that lost a
                   peer can say which rank it was (a dead or stopped process on the same host).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time

import psutil
import torch.distributed as dist

# Module names (`python -m X`) and console scripts of the launchers we document.
LAUNCHER_MODULES = ("deepspeed.launcher.launch", "torch.distributed.run")
LAUNCHER_SCRIPTS = ("deepspeed", "torchrun")


def _launcher_name(p: psutil.Process) -> str | None:
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return None
    if "-m" in cmd[:-1] and cmd[cmd.index("-m") + 1] in LAUNCHER_MODULES:
        return cmd[cmd.index("-m") + 1]
    script = next((os.path.basename(c) for c in cmd[:2] if os.path.basename(c) in LAUNCHER_SCRIPTS), None)
    return script


def launcher_chain() -> list[tuple[psutil.Process, str]]:
    """This rank's parent and the processes above it, as long as each is a launcher: under
    `deepspeed` the per-node launch and the runner; under `torchrun` torchrun; none without one."""
    chain, p = [], psutil.Process().parent()
    while p is not None and (name := _launcher_name(p)):
        chain.append((p, name))
        p = p.parent()
    return chain


def _gone(p: psutil.Process) -> bool:
    try:   # a killed launcher whose own parent has not reaped it yet is a zombie: gone too
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


class LauncherWatch:
    """Calls `on_gone(description)` once, from a daemon thread, when a launcher above this rank ends."""

    def __init__(self, on_gone, interval_s: float = 0.5):
        self.chain = launcher_chain()
        self.on_gone, self.interval_s = on_gone, interval_s
        if self.chain:
            threading.Thread(target=self._run, name="resbm-launcher-watch", daemon=True).start()

    def ended(self) -> str | None:
        """Which launcher has ended, if one has (also asked when a peer, not this rank, saw it first)."""
        return next((f"its launcher {name} (pid {p.pid}) ended" for p, name in self.chain if _gone(p)), None)

    def _run(self):
        while (why := self.ended()) is None:
            time.sleep(self.interval_s)
        self.on_gone(why)


class Peers:
    """Every rank's (host, pid), from one all_gather at start."""

    def __init__(self):
        self.table: list = [None] * dist.get_world_size()
        dist.all_gather_object(self.table, (socket.gethostname(), os.getpid()))
        self.rank = dist.get_rank()

    def describe(self) -> str | None:
        """The peers on this host that are dead or stopped, e.g. 'rank 1 (pid 812) is stopped
        (SIGSTOP)'; None when every local peer looks alive (the fault is elsewhere)."""
        host, found = socket.gethostname(), []
        for r, (h, pid) in enumerate(self.table):
            if r == self.rank or h != host:
                continue
            try:
                status = psutil.Process(pid).status()
            except psutil.NoSuchProcess:
                status = psutil.STATUS_DEAD
            if status in (psutil.STATUS_DEAD, psutil.STATUS_ZOMBIE):
                found.append(f"rank {r} (pid {pid}) is gone")
            elif status == psutil.STATUS_STOPPED:
                found.append(f"rank {r} (pid {pid}) is stopped (SIGSTOP)")
        return ", ".join(found) or None


class ProgressWatch:
    """`with watch.phase("step 7"):` -- if the block runs past the deadline, print one line
    and end this process (exit 1): its peers are gone or stopped, and a collective would only hang
    or fail later with a traceback. The launcher then ends the remaining ranks."""

    def __init__(self, peers: Peers | None, timeout_s: int, activity=lambda: 0, enabled: bool = True):
        # `activity()`: a count that grows whenever data crosses (WireMeter.transfers).
        self.peers, self.timeout_s, self.activity = peers, timeout_s, activity
        self._what, self._deadline, self._seen = None, None, None
        self._lock = threading.Lock()
        self.enabled = enabled
        if enabled:
            threading.Thread(target=self._run, name="resbm-progress-watch", daemon=True).start()

    def phase(self, what: str):
        if not self.enabled:
            return contextlib.nullcontext()
        watch = self

        class _Phase:
            def __enter__(self):
                with watch._lock:
                    watch._what, watch._deadline = what, time.monotonic() + watch.timeout_s

            def __exit__(self, *exc):
                with watch._lock:
                    watch._what, watch._deadline = None, None
        return _Phase()

    def _run(self):
        while True:
            time.sleep(min(1.0, self.timeout_s / 10))
            with self._lock:
                seen = self.activity()
                if self._deadline is not None and seen != self._seen:   # data moved: not stuck
                    self._deadline = time.monotonic() + self.timeout_s
                self._seen = seen
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if late:
                who = (self.peers.describe() if self.peers else None) or "a peer rank is stopped, hung or unreachable"
                print(f"error (rank {os.environ.get('RANK', '0')}): no progress in {what} for {self.timeout_s} s "
                      f"(runtime.dist_timeout_s + 5; env RESBM_DIST_TIMEOUT): {who}; ending this rank",
                      file=sys.stderr, flush=True)
                os._exit(1)


def peer_failure(e: BaseException, peers: Peers | None, dist_timeout_s: int) -> str | None:
    """One line for a collective that failed because a peer went away or stopped answering (gloo /
    NCCL errors, timeouts after runtime.dist_timeout_s), else None."""
    if not isinstance(e, (dist.DistError, RuntimeError)):
        return None
    text = str(e)
    timed_out = "timed out" in text.lower() or isinstance(e, getattr(dist, "DistStoreError", ()))
    if not isinstance(e, dist.DistError) and not timed_out and not any(
            k in text for k in ("Connection closed", "Connection reset", "Broken pipe", "gloo", "NCCL")):
        return None
    who = (peers.describe() if peers else None) or "a peer rank died, hung or is unreachable"
    first = (text.strip().splitlines() or [""])[0]
    first = first.split("] ", 1)[-1][:160]          # without gloo's source-file prefix
    what = (f"a collective got no answer for {dist_timeout_s} s (runtime.dist_timeout_s; env RESBM_DIST_TIMEOUT)"
            if timed_out else
            "a collective lost its peer")
    return f"{what}: {who} ({first})"
