"""What every command line of the package shares: user errors (`UserError`, `ConfigError`, `DataError`)
as one line and exit status 2, and argument types that check ranges and the kind of a path before
anything runs.

Light on purpose (no torch, no DeepSpeed): `--help` and a bad option answer at once.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

from .system import MISSING, is_, path_kind


# long enough for the printing rank to reach the same check on a busy machine (all ranks run it at
# the same point; 3 s was not, with 4 processes per core)
QUIET_RANK_PAUSE_S = 10.0


class UserError(ValueError):
    """Bad input from the user (a config value, a data file, a run directory): the message alone says
    what is wrong and what is allowed, so `cli` prints it as one line, without a traceback."""


class ConfigError(UserError):
    """An invalid configuration value: says which key, what value, and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid config: {key}={_short(value)}: {allowed}")


class DataError(UserError):
    """A data file (or the text in it) the run cannot use: names the file and the config key."""

    def __init__(self, key: str, path, problem: str):
        self.key, self.path = key, path
        super().__init__(f"{key}={str(path)!r}: {problem}")


def _short(value, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def cli(main):
    """Wrap a CLI's `main(argv) -> int`: a UserError (or a missing file the user named) becomes one
    line `error: ...` on stderr and exit status 2; anything else is a bug and keeps its traceback.

    Under a launcher every rank checks the same input, so the first rank of each node prints (one
    line per node, where a node-local file may differ). The others pause first: a launcher kills the
    survivors as soon as one rank exits, which must not be before the first rank has printed. A rank
    still alive after the pause prints too: the first rank was slower to get there (a busy machine)
    or did not fail, and the error must not be lost."""
    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        try:
            return main(argv)
        except (UserError, FileNotFoundError) as e:
            if os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) != "0":
                time.sleep(QUIET_RANK_PAUSE_S)
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            return 2
    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other bad input (exit status 2)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


# ---- argument types: each raises ArgumentTypeError, which argparse reports with the option's name

def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float | None = None, low_open: bool = False):
    """A finite number in [low, high] (`low_open`: (low, high])."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if low_open else value < low
        if value != value or below or (high is not None and value > high) or value in (float("inf"), float("-inf")):
            span = f"{'(' if low_open else '['}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
            raise argparse.ArgumentTypeError(f"{text} must be in {span}")
        return value
    parse.__name__ = "number"
    return parse


def _path(allowed: tuple[str, ...], want: str):
    def parse(text: str) -> Path:
        p = Path(text).expanduser()
        kind = path_kind(p)
        if kind not in allowed:
            raise argparse.ArgumentTypeError(f"{text}: {is_(kind)}; give {want}")
        return p
    return parse


existing_file = _path(("a regular file",), "a regular file")     # a directory, FIFO or device is named as such
existing_dir = _path(("a directory",), "a directory")
output_dir = _path(("a directory", MISSING), "a directory (or a new name)")   # to write into: absent or a directory
