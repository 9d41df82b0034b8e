"""The local cache every data step shares: its root (entries are built under system.file_lock)."""
from __future__ import annotations

import os
from pathlib import Path

from ..cli import UserError
from ..system import MISSING, is_, path_kind


def cache_root() -> Path:
    """$RESBM_CACHE, default ~/.cache/resbm_ds: corpus, npm tarballs, tokenizers, token arrays."""
    root = Path(os.environ.get("RESBM_CACHE") or Path.home() / ".cache" / "resbm_ds").expanduser()
    kind = path_kind(root)
    if kind not in ("a directory", MISSING):
        raise UserError(f"RESBM_CACHE={root}: {is_(kind)}; give a directory (or a new name) for the data cache")
    return root
