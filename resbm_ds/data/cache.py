"""The local cache every data step shares: its root, a lock for building an entry once per node,
and content hashes."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from ..cli import UserError
from ..system import MISSING, is_, path_kind


def cache_root() -> Path:
    """$RESBM_CACHE, default ~/.cache/resbm_ds: corpus, npm tarballs, tokenizers, token arrays."""
    root = Path(os.environ.get("RESBM_CACHE") or Path.home() / ".cache" / "resbm_ds").expanduser()
    kind = path_kind(root)
    if kind not in ("a directory", MISSING):
        raise UserError(f"RESBM_CACHE={root}: {is_(kind)}; give a directory (or a new name) for the data cache")
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, so several ranks on one node build a cache entry only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
