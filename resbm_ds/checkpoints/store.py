"""The checkpoint store: a run's `checkpoints/` directory, with one rule for each of its facts.

    <checkpoints>/step<N>/            a tag: DeepSpeed's files of the state after step N (`tag_for`)
    <checkpoints>/step<N>/manifest.json   {"format": 1, "files": {"layer_00-model_00-model_states.pt":
                                      {"bytes": N, "sha256": "..."}, ...}}
    <checkpoints>/latest              the newest complete tag's name (`read_latest`, `point_latest`)

A save writes the tag's files, then its manifest, then moves `latest` to it, each by write + rename
(`publish`), so a manifest exists only for a checkpoint that was saved whole and `latest` only ever
names one; `prune` keeps the newest train.keep_last. On a read, a listed file that is missing, has
another size or other bytes refuses the checkpoint in one line that names the file and the newest
earlier tag that verifies. A tag without a manifest is refused when its siblings have one (its save
was cut short); a run with no manifests at all (written before manifests existed) is read with a
warning. A tag is always the name of a directory in the checkpoints directory, never a path.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

from ..cli import UserError
from ..system import sha256_file

MANIFEST = "manifest.json"
LATEST = "latest"
TAG = re.compile(r"step(\d+)$")   # the one tag rule: step<N>, the state after step N


def tag_for(step: int) -> str:
    return f"step{step}"


def step_of(tag: str) -> int:
    """The step a tag was saved after (a tag the trainer wrote: step<N>)."""
    m = TAG.match(tag)
    if m is None:
        raise ValueError(f"{tag!r} is not a checkpoint tag (step<N>)")
    return int(m.group(1))

class TagError(UserError):
    """A tag that names no checkpoint of the run."""


class IncompleteCheckpoint(FileNotFoundError):
    """A checkpoint with a missing, truncated or modified file: it is not loaded. A FileNotFoundError,
    so every reader that reports a missing checkpoint in one line reports this one too."""


def write_manifest(tag_dir: Path) -> Path:
    """Hash every file under `tag_dir` (DeepSpeed has finished writing it) into its manifest."""
    tag_dir = Path(tag_dir)
    files = {str(p.relative_to(tag_dir)): dict(bytes=p.stat().st_size, sha256=sha256_file(p))
             for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp")}
    tmp = tag_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(dict(format=1, files=files), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tag_dir / MANIFEST)
    return tag_dir / MANIFEST


def sibling_tags(ckpt_dir: Path) -> list[str]:
    """The checkpoint tags (stepN directories) in a checkpoints directory, oldest first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m.group(1)), d.name) for d in Path(ckpt_dir).iterdir() if d.is_dir() and (m := TAG.match(d.name))]
    return [name for _, name in sorted(found)]


def tag_dir(ckpt_dir: Path, tag: str, given: str = "--tag") -> Path:
    """The one rule for a checkpoint tag in every command (--resume-from, export/spectrum --tag, a
    `latest` file): the name of a directory directly in the run's checkpoints directory. A path
    (`../../other_run/checkpoints/step3`, an absolute one, a link out) would read another run's
    weights under this run's config, and is refused."""
    d = Path(ckpt_dir) / tag
    if Path(tag).name != tag or tag in ("", ".", "..") or d.resolve().parent != Path(ckpt_dir).resolve():
        raise TagError(f"{given} {tag!r}: a checkpoint tag is the name of a directory in {ckpt_dir}, "
                       f"not a path (tags: {sibling_tags(ckpt_dir) or 'none'})")
    return d


def problem(tag_dir: Path) -> str | None:
    """What is wrong with a tag directory's files against its manifest; None when they all match.
    A tag without a manifest is a problem only when a sibling tag has one."""
    tag_dir = Path(tag_dir)
    manifest = tag_dir / MANIFEST
    if not tag_dir.is_dir():
        return f"{tag_dir} is missing"
    if not manifest.is_file():
        if any((tag_dir.parent / t / MANIFEST).is_file() for t in sibling_tags(tag_dir.parent)):
            return f"{manifest} is missing (the save of {tag_dir.name} did not finish)"
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is unreadable"
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{path} has {size:,} bytes, the manifest says {want['bytes']:,} (truncated or replaced)"
        if sha256_file(path) != want["sha256"]:
            return f"{path} differs from the manifest (its sha256 changed: the file was modified or corrupted)"
    return None


def newest_complete(ckpt_dir: Path, before: str | None = None) -> str | None:
    """The newest tag (older than `before`, when given) whose files verify and that has a manifest."""
    tags = sibling_tags(ckpt_dir)
    if before in tags:
        tags = tags[:tags.index(before)]
    return next((t for t in reversed(tags)
                 if (Path(ckpt_dir) / t / MANIFEST).is_file() and problem(Path(ckpt_dir) / t) is None), None)


def previous_offer(ckpt_dir: Path, tag: str, use: str = "--resume-from {tag}") -> str:
    """What to use instead of a bad `tag`: the newest earlier complete one (in a run from before
    manifests, the newest earlier tag)."""
    prev = newest_complete(ckpt_dir, before=tag)
    have = sibling_tags(ckpt_dir)
    if prev is None and not any((Path(ckpt_dir) / t / MANIFEST).is_file() for t in have):
        older = have[:have.index(tag)] if tag in have else []
        prev = older[-1] if older else None
    return (f"continue from the previous complete checkpoint with {use.format(tag=prev)}" if prev else
            f"no earlier checkpoint in {ckpt_dir} verifies")


_verified: set[tuple[str, float]] = set()


def verify(tag_dir: Path, use: str = "--resume-from {tag}") -> None:
    """Refuse a checkpoint whose files do not match its manifest, naming the file and the previous
    complete checkpoint (`use` says how to pass it, e.g. '--resume-from {tag}'). Without any
    manifest in the run: a warning on stderr. Each tag is hashed once per process."""
    tag_dir = Path(tag_dir).resolve()
    key = (str(tag_dir), (tag_dir / MANIFEST).stat().st_mtime if (tag_dir / MANIFEST).is_file() else 0.0)
    if key in _verified:
        return
    wrong = problem(tag_dir)
    if wrong is not None:
        raise IncompleteCheckpoint(f"checkpoint {tag_dir.name} is incomplete or modified: {wrong}; "
                                   f"{previous_offer(tag_dir.parent, tag_dir.name, use)}")
    if not (tag_dir / MANIFEST).is_file():
        print(f"[resbm] warning: {tag_dir} has no {MANIFEST} (saved before manifests existed): its files "
              "cannot be checked for truncation or modification", file=sys.stderr, flush=True)
    _verified.add(key)


# ---- latest, saving, pruning ------------------------------------------------------------------

def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None when there is no `latest` file."""
    latest = Path(ckpt_dir) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def point_latest(ckpt_dir: Path, tag: str) -> None:
    """Move `latest` to `tag`, atomically (write + rename)."""
    tmp = Path(ckpt_dir) / (LATEST + ".tmp")
    tmp.write_text(tag)
    os.replace(tmp, Path(ckpt_dir) / LATEST)


def publish(ckpt_dir: Path, tag: str, keep_last: int) -> None:
    """After every rank has written the tag's files: its manifest, then `latest`, then pruning."""
    write_manifest(Path(ckpt_dir) / tag)
    point_latest(ckpt_dir, tag)
    prune(ckpt_dir, keep_last)


def discard(ckpt_dir: Path, tag: str) -> None:
    """Remove what a save that failed left (the tag's files, a half-moved `latest`)."""
    shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)
    (Path(ckpt_dir) / (LATEST + ".tmp")).unlink(missing_ok=True)


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """train.keep_last: delete all but the newest `keep_last` tags (never the one `latest` names)."""
    if keep_last < 1:
        return []
    latest = read_latest(ckpt_dir)
    old = [t for t in sibling_tags(ckpt_dir)[:-keep_last] if t != latest]
    for t in old:
        shutil.rmtree(Path(ckpt_dir) / t, ignore_errors=True)
    return old


def tag_bytes(tag_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(tag_dir).rglob("*") if f.is_file())


# ---- reading --------------------------------------------------------------------------------

def checkpoint_dir(path, tag: str | None = None, use: str = "--tag {tag}") -> Path:
    """The `<checkpoints>/<tag>` directory holding layer files, from a run directory, a checkpoints
    directory (tag from its `latest` file), or the tag directory itself; its files checked against
    its manifest (`verify`; `use` says how to name the previous complete tag instead)."""
    p = Path(path)
    if any(p.glob("layer_*-model_states.pt")):
        verify(p, use)
        return p
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    given = use.format(tag="").strip()
    if tag is None:
        latest = p / LATEST
        tag = read_latest(p)
        if tag is None:
            raise FileNotFoundError(f"{p}: no 'latest' file; pass the checkpoint tag (--tag)")
        given = f"{latest} names"
        if not tag_dir(p, tag, given).is_dir():
            raise FileNotFoundError(f"{latest} names {tag!r}, which is missing; tags in {p}: "
                                    f"{sibling_tags(p) or 'none'} (pass one: {use.format(tag='TAG')})")
    d = tag_dir(p, tag, given)
    if not any(d.glob("layer_*-model_states.pt")):
        raise FileNotFoundError(f"{d}: no DeepSpeed pipeline layer files (layer_XX-*model_states.pt)")
    verify(d, use)
    return d


def out_of_space(path: Path, error: BaseException) -> str | None:
    """When `error`, met writing under `path`, comes from a full filesystem: a phrase saying so (torch
    reports ENOSPC in a zip writer as "unexpected pos" or an "iostream error", without errno)."""
    text = str(error).lower()
    full = (getattr(error, "errno", None) == errno.ENOSPC or "no space left" in text
            or "unexpected pos" in text or "iostream error" in text)
    if not full:
        return None
    base = next((d for d in (Path(path), *Path(path).parents) if d.exists()), Path("/"))
    return f"no space left on the filesystem of {base} ({shutil.disk_usage(base).free:,} bytes free)"
