"""A run directory (`train.out_dir`) between runs: what is in it, what a new start may do with it,
and its checkpoint tags. Everything here runs before the process group, so a refusal costs nothing.

    fresh start      refused into a directory that holds a run, unless --overwrite (which clears it)
    --resume         from checkpoints/latest; refused when tags exist but `latest` is missing or
                     names a missing tag (it lists the tags: pass --resume-from TAG)
    --resume-from T  from tag T
    either resume    refused when the tag's files do not match its manifest (checkpoints/store.py), naming
                     the file and the previous complete tag
    a changed config on resume: only RESUMABLE keys may change (more steps, logging, trackers, the
                     emulated link); any other difference is refused, naming the keys
    any start        refused while another run holds the directory's lock (`lock_run_dir`)
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .cli import ConfigError, UserError
from .config import Config, SyncConfig, read_yaml
from .data.tokenizer import Tokenizer, load_saved_tokenizer
from .checkpoints.store import LATEST, read_latest, sibling_tags, step_of, tag_dir, verify
from .metrics import METRICS_FILE, TRACKER_IDS, flatten

CONFIG_FILE = "config.yaml"
LAYOUT_FILE = "layout.json"   # the process layout a run's checkpoints were written with
LOCK_FILE = ".lock"           # flock'ed by the run that owns the directory; holds its "host pid"
# Keys that may differ between a run and its resumption: they change neither shapes, nor the data
# order, nor what the optimizer state means.
RESUMABLE = ("train.steps", "train.eval_every", "train.save_every", "train.log_every", "train.eval_batches",
             "train.keep_last", "train.init_from", "train.nonfinite", "train.max_skipped_steps",
             "train.divergence_steps", "train.max_param_rms", "train.out_dir", "tracking.", "wire.link_",
             "sync.master_addr", "sync.master_port", "sync.timeout_s",
             "deepspeed.steps_per_print", "deepspeed.wall_clock_breakdown", "runtime.")
# What must match for train.init_from (weights only): the network's shapes.
WEIGHT_SHAPES = ("model.", "bottleneck.")


class RunDirError(UserError):
    """A start that would lose or mix up a run's data; the message says what to do instead."""


def config_changes(saved: dict, new: dict, only=None, allowed=()) -> dict[str, tuple]:
    """Flattened keys whose values differ (within the `only` prefixes, outside `allowed`). A key the
    saved config lacks (it was written before the key existed) counts as the key's default."""
    defaults = flatten(Config().to_dict())
    a, b = flatten(saved), flatten(new)
    a = {**{k: defaults[k] for k in b.keys() - a.keys() if k in defaults}, **a}
    keys = sorted(set(a) | set(b))
    if only:
        keys = [k for k in keys if k.startswith(only)]
    return {k: (a.get(k), b.get(k)) for k in keys
            if _norm(a.get(k)) != _norm(b.get(k)) and not k.startswith(allowed)}


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def read_run_file(f: Path) -> dict | None:
    """A mapping the run wrote (config.yaml, layout.json: JSON is YAML); None when absent. A damaged
    file is one line naming it."""
    if not f.is_file():
        return None
    try:
        data = read_yaml(f, str(f), str(f))
    except ConfigError as e:
        problem = e.allowed
    else:
        if isinstance(data, dict):
            return data
        problem = f"holds a {type(data).__name__}, not a mapping"
    raise RunDirError(f"{f} is damaged ({problem}): restore it, or start the run over with --overwrite; "
                      "nothing was changed")


def _saved_config(run: Path) -> dict | None:
    return read_run_file(run / CONFIG_FILE)


@dataclass
class RunPlan:
    out: Path
    resume_tag: str | None = None          # the checkpoint to resume from, None: a fresh start
    overwrite: bool = False                # clear the directory first (rank 0)
    changes: dict = field(default_factory=dict)   # resumable keys that changed (reported at start)


def check_writable(out: Path) -> None:
    """train.out_dir must be a directory we can create files in (or one we can create): tried with a
    real temporary file in the nearest existing ancestor, since os.access says yes to root anywhere."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"train.out_dir={out}: exists and is not a directory; choose another train.out_dir")
    base = next(d for d in (out, *out.parents) if d.exists())
    if not base.is_dir():
        raise RunDirError(f"train.out_dir={out}: {base} is a file, not a directory; choose another train.out_dir")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise RunDirError(f"train.out_dir={out}: cannot write in {base} ({e.strerror}); "
                          "choose a writable train.out_dir") from None


_lock_fd: int | None = None    # this process's hold on its run directory (lock_run_dir)


def lock_run_dir(out: Path, hold: bool = True) -> None:
    """One run per directory: an exclusive flock on OUT/.lock, taken by rank 0 before anything is
    written and held for the process's life (the kernel releases it when the process ends, however it
    ends). A second run is refused, naming the holder's host and pid (written into the file).

    `hold=False` (a dry run) only checks an existing lock file and creates nothing. Works across the
    nodes of a shared filesystem where flock reaches the server (NFSv4; Lustre mounted with -o flock,
    GPFS); where it does not (Lustre with -o localflock or noflock, some FUSE filesystems) flock
    fails or only locks this node: the run says so in a note and goes on unlocked."""
    global _lock_fd
    path = out / LOCK_FILE
    if _lock_fd is not None or (not hold and not path.is_file()):
        return
    if hold:
        out.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if hold else 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"host {holder[0]}, pid {holder[1]}" if len(holder) == 2 else "holder unknown"
        raise RunDirError(f"train.out_dir={out} is in use by another run ({who}; {path} is locked): wait for it "
                          "to end, or choose another train.out_dir; nothing was changed") from None
    except OSError as e:
        os.close(fd)
        print(f"[resbm] note: cannot lock {path} ({e.strerror}; the filesystem does not support flock): "
              "nothing stops a second run from writing into this directory", file=sys.stderr, flush=True)
        return
    if not hold:
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
    _lock_fd = fd


def unlock_run_dir() -> None:
    """Let go of the run directory (a CLI called in-process; a process that ends lets go anyway)."""
    global _lock_fd
    if _lock_fd is not None:
        os.close(_lock_fd)
        _lock_fd = None


def write_layout(out: Path, stages: int, dp: int) -> None:
    """Rank 0 at start: the layout, which the config does not hold (it follows the world size)."""
    (out / LAYOUT_FILE).write_text(json.dumps({"pipeline.stages": stages, "data_parallel": dp}) + "\n")


def _layout_change(out: Path, cfg: Config, world: int | None) -> dict:
    layout = read_run_file(out / LAYOUT_FILE)
    if world is None or layout is None:
        return {}
    saved = layout.get("data_parallel")
    dp = world // cfg.pipeline.stages
    return {} if saved in (None, dp) else {"data_parallel (world size / pipeline.stages)": (saved, dp)}


def plan_run(cfg: Config, resume: bool, resume_from: str | None, overwrite: bool,
             world: int | None = None, lock: str = "none") -> RunPlan:
    """`lock`: "hold" (rank 0 of a real start owns the directory from here on), "check" (a dry run:
    refused like a start, but takes nothing) or "none" (the other ranks of a run)."""
    out = Path(cfg.train.out_dir)
    check_writable(out)
    if lock != "none":
        lock_run_dir(out, hold=lock == "hold")
    ckpt = out / "checkpoints"
    have = sibling_tags(ckpt)
    if resume_from:
        tag_dir(ckpt, resume_from, "--resume-from")
        if resume_from not in have:
            raise RunDirError(f"--resume-from {resume_from}: no such checkpoint in {ckpt} (tags: {have or 'none'})")
        tag = resume_from
    elif resume:
        latest, tag = ckpt / LATEST, read_latest(ckpt)
        if tag not in have:
            if have:
                why = f"names {tag!r}, which is missing" if tag else "is missing"
                raise RunDirError(f"{latest} {why}, but {ckpt} holds {have}: pass --resume-from TAG "
                                  f"(the newest is {have[-1]}); nothing was changed")
            tag = None             # nothing saved yet: --resume starts at step 0
    else:
        tag = None
        held = [p for p in (METRICS_FILE, "checkpoints") if (out / p).exists()]
        if held and not overwrite:
            raise RunDirError(f"train.out_dir={out} already holds a run ({', '.join(held)}"
                              f"{f': {len(have)} checkpoints' if have else ''}): continue it with --resume, "
                              "start over with --overwrite, or choose another train.out_dir")
    plan = RunPlan(out, tag, overwrite=overwrite and tag is None)
    saved = _saved_config(out)
    if saved is not None and "sync" not in saved:   # a run from before sync.*: it was one site
        saved["sync"] = SyncConfig().model_dump()
    if tag is not None and saved is not None:
        # the data order and ZeRO's optimizer partitions follow the data-parallel size too
        refused = {**config_changes(saved, cfg.to_dict(), allowed=RESUMABLE), **_layout_change(out, cfg, world)}
        if refused:
            raise RunDirError(f"--resume: the config differs from the run's {out / CONFIG_FILE} (or {LAYOUT_FILE}) in keys that "
                              f"cannot change mid-run: {_listing(refused)}; allowed to change: {list(RESUMABLE)}")
        plan.changes = config_changes(saved, cfg.to_dict(), only=RESUMABLE)
    if tag is not None:
        at = step_of(tag)
        if cfg.train.steps <= at:
            raise RunDirError(f"--resume: the run is at step {at} ({tag}) and train.steps={cfg.train.steps} leaves "
                              f"nothing to train: pass train.steps={at + 1} or more to go on; nothing was changed")
        verify(ckpt / tag)     # every file as the manifest lists it, before any process starts
    return plan


def check_tokenizer(out: Path, tok: Tokenizer) -> None:
    """--resume: the tokenizer built now must be the one the run saved (OUT/tokenizer): the same ids
    must mean the same text, and the data position counts tokens of it. A retrained or replaced
    cache entry is refused here, before launch."""
    saved_dir = out / "tokenizer"
    if not saved_dir.is_dir():
        return
    saved = load_saved_tokenizer(saved_dir)
    if saved.fingerprint != tok.fingerprint:
        raise RunDirError(f"--resume: the tokenizer is not the run's ({tok.name} is {tok.fingerprint}, {saved_dir} "
                          f"is {saved.fingerprint}): token ids would change meaning mid-run; restore it from "
                          f"{saved_dir}, or start over with --overwrite")


def check_init_from(cfg: Config) -> None:
    """train.init_from: the source run's network must be this one (weights load layer by layer)."""
    src = Path(cfg.train.init_from)
    run = next((d for d in (src, *src.parents[:2]) if (d / CONFIG_FILE).is_file()), None)
    if run is None:
        return   # a bare tag directory: shapes are checked when the layers load
    diff = config_changes(_saved_config(run), cfg.to_dict(), only=WEIGHT_SHAPES)
    if diff:
        raise RunDirError(f"train.init_from={src}: its network differs from this config: {_listing(diff)}")


def _listing(diff: dict) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in diff.items())


def clear_run(out: Path) -> None:
    """--overwrite: remove what a previous run wrote (rank 0, before anything new is written)."""
    for name in (METRICS_FILE, TRACKER_IDS, CONFIG_FILE, LAYOUT_FILE):
        (out / name).unlink(missing_ok=True)
    for name in ("checkpoints", "tensorboard", "monitor", "tokenizer"):
        shutil.rmtree(out / name, ignore_errors=True)
