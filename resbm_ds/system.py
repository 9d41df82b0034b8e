"""The local machine, as every part of the package meets it: what a path is, a file's hash, a lock
across processes, a free TCP port, and the environment a CPU run of DeepSpeed needs. Standard library only."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import stat
import urllib.parse
from pathlib import Path
from typing import Iterator

MISSING = "does not exist"

# What a process running DeepSpeed on CPUs needs (set where not already set: tests, benchmarks, and
# launchers/setup.sh for the shell, which holds the same values): the CPU accelerator, one OpenMP
# thread per rank (ranks share the cores), a private cache for DeepSpeed's JIT-built ops, no hub.
CPU_ENV = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "resbm_ds" / "torch_extensions"),
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def path_kind(p: Path) -> str:
    """What is at `p`, in words: 'a regular file', 'a directory', 'a FIFO', ..., or MISSING."""
    try:
        mode = Path(p).stat().st_mode
    except FileNotFoundError:
        return MISSING
    except OSError as e:
        return f"unreadable ({e.strerror})"
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def is_(kind: str) -> str:
    """'is a directory', 'does not exist', 'is unreadable (...)'."""
    return kind if kind == MISSING else f"is {kind}"


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()


def free_port() -> int:
    """A TCP port the OS reports free right now (so concurrent runs and test sessions do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable(url: str, deadline_s: float) -> str | None:
    """None when a TCP connection to the URL's host and port opens within `deadline_s`, else why
    not, in words ('host:port within 10 s (Connection refused)')."""
    u = urllib.parse.urlparse(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname, port), timeout=deadline_s).close()
    except OSError as e:
        return f"cannot reach {u.hostname}:{port} within {deadline_s:g} s ({e.strerror or type(e).__name__})"
    return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, so that several processes on one node build a cache entry (a token
    array, a tokenizer, a JIT-built op) only once. The kernel drops it when its holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
