"""The one engine every suite of `python -m resbm_ds.bench` runs on.

A suite (a subclass of `Suite`) names its runs (`Spec`), says what each run's settings are, how to
launch one, how to analyse it and how to report the suite. The engine does the rest, the same way
for every suite:

  validate  every run's settings, before any run starts (`Suite.validate`)
  reuse     a finished run whose settings match (`Suite.same`) is reused; a stopped one resumes
            from its checkpoint where the suite `resumes`; anything else runs; `--fresh` runs all
  launch    `jobs` runs at a time, in order; a run whose settings wait on other runs (a family's
            lr sweep, a measured link rate) starts once they finished, and is skipped if they never do
  publish   results.json, results.md and plots after every run (`Suite.publish`)
  signals   SIGINT / SIGTERM stop the runs (each saves first) and start no new one
  plan      `--plan` prints each run's decision (reuse, resume, run, wait, or why not) and launches nothing
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import run_logged

RESULT = "result.json"         # runs/<name>/result.json: a finished run, where a suite keeps them there


class Abort(Exception):
    """A suite cannot go on (what later runs' settings come from failed): the engine stops, says why."""


@dataclass(frozen=True)
class Spec:
    """One run of a suite."""
    name: str                  # unique: its directory runs/<name>/ and its name in results.json
    run: Any = None            # the suite's own definition of the run
    select: str = ""           # what --only matches (default: the name)
    waits_for: str = ""        # what its settings wait for, e.g. "the resbm-tok sweep"

    def selected(self, only: str | None) -> bool:
        return not only or bool(re.search(only, self.select or self.name))


class Suite:
    """What a suite defines; the engine does the rest. `entry`, `launch`, `header` and `publish` are
    the suite's; the others have defaults."""
    tag = "bench"              # the prefix of its log lines
    resumes = False            # a stopped run continues from runs/<name>/checkpoints

    def __init__(self, out: Path, specs: list[Spec], fresh: bool = False):
        self.out, self.specs, self.fresh = Path(out), specs, fresh

    def run_dir(self, spec: Spec) -> Path:
        return self.out / "runs" / spec.name

    def say(self, line: str):
        print(f"[{self.tag}] {line}", flush=True)

    # ---- the run ----------------------------------------------------------------------------------
    def validate(self, specs: list[Spec]):
        """Raise (ConfigError) on a run that cannot start, before any does."""

    def entry(self, spec: Spec, done: dict[str, dict]) -> dict | None:
        """The run's results.json entry before it runs: its settings, what reuse compares, a status
        where it cannot run at all; None while what it waits for (in `done`, the finished runs) is not there."""
        raise NotImplementedError

    def launch(self, spec: Spec, entry: dict, launcher: "Launcher") -> dict:
        """Run it (through `launcher`, so a signal can stop it) and analyse it: the entry with its status."""
        raise NotImplementedError

    def note(self, spec: Spec, entry: dict) -> str:
        """What a plan or start line adds to the run's name (its lr, its rate)."""
        return ""

    # ---- where finished runs are kept: runs/<name>/result.json, unless the suite says otherwise ----
    def carried(self) -> dict[str, dict]:
        """Entries of an earlier start that the report keeps, and later runs' settings may use."""
        return {}

    def previous(self, spec: Spec) -> dict | None:
        path = self.run_dir(spec) / RESULT
        return json.loads(path.read_text()) if path.exists() else None

    def same(self, old: dict, entry: dict) -> bool:
        return old.get("overrides") == entry["overrides"]

    def record(self, spec: Spec, entry: dict):
        if entry.get("status") == "ok":
            self.run_dir(spec).mkdir(parents=True, exist_ok=True)
            (self.run_dir(spec) / RESULT).write_text(json.dumps(entry, indent=1))

    # ---- the report -------------------------------------------------------------------------------
    def header(self) -> dict:
        """results.json's fields before the runs (machine, command, ...)."""
        raise NotImplementedError

    def publish(self, results: dict):
        """Write results.json, results.md and the plots (after every run)."""
        raise NotImplementedError

    def session(self):
        """A context the runs need, entered after validation (a network of namespaces)."""
        return contextlib.nullcontext()

    def finish(self, results: dict):
        """The last fields, once every run is done and the session closed."""


def decide(suite: Suite, spec: Spec, entry: dict) -> tuple[str, dict | None]:
    """reuse | resume | run, or the status of a run that cannot start; with the earlier result."""
    if entry.get("status"):
        return entry["status"], None
    old = None if suite.fresh else suite.previous(spec)
    if old is not None and suite.same(old, entry):
        if old.get("status") == "ok":
            return "reuse", old
        if suite.resumes and (suite.run_dir(spec) / "checkpoints" / "latest").exists():
            return "resume", old
    return "run", old


def plan(suite: Suite, specs: list[Spec]):
    """One line per run: what a start into --out would do with it."""
    done = {n: e for n, e in ({} if suite.fresh else suite.carried()).items() if e.get("status") == "ok"}
    for spec in specs:
        try:
            entry = suite.entry(spec, done)
        except Abort:                               # it would stop the suite: what it waits for is missing
            entry = None
        if entry is None:
            print(f"{'wait':12s}{spec.name}  waits for {spec.waits_for}", flush=True)
            continue
        decision, old = decide(suite, spec, entry)
        if decision == "reuse":
            done[spec.name] = old
        note = suite.note(spec, entry)
        print(f"{decision:12s}{spec.name}" + (f"  {note}" if note else ""), flush=True)


class Launcher:
    """How a suite's `launch` starts processes: each in its own process group, which a signal stops."""

    def __init__(self, engine: "Engine", spec: Spec, resume: bool, old: dict | None):
        self.engine, self.spec, self.resume, self.old = engine, spec, resume, old

    def run(self, cmd: list[str], run_dir: Path, timeout_s: int, env: dict) -> tuple[int, float]:
        """runner.run_logged: log.txt (appended to on a resume), the timeout; -> (exit code, wall s)."""
        return run_logged(cmd, run_dir, timeout_s, env, fresh=not self.resume, started=self.started)

    def started(self, pid: int):
        """A process group of this run (a custom launch reports its own)."""
        with self.engine.cond:
            self.engine.children.setdefault(self.spec.name, []).append(pid)
            if self.engine.stopping:
                _terminate(pid)


def _terminate(pid: int):
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


class Engine:
    """The runs of one start of a suite: `jobs` at a time, in order, each published when it ends."""

    def __init__(self, suite: Suite, specs: list[Spec], jobs: int):
        self.suite, self.jobs, self.pending = suite, jobs, list(specs)
        self.carried = {} if suite.fresh else suite.carried()
        self.entries: dict[str, dict] = {}          # this start's, in the order they ended
        self.done = {n: e for n, e in self.carried.items() if e.get("status") == "ok"}
        self.running: set[str] = set()
        self.children: dict[str, list[int]] = {}    # run -> the process groups it started
        self.cond = threading.Condition()
        self.stopping = False
        self.results: dict = {}

    def publish(self):
        self.results["runs"] = list({**self.carried, **self.entries}.values())
        self.suite.publish(self.results)

    def next_run(self) -> tuple[Spec, dict] | None:
        """The first pending run whose settings are known, or None when no other ever will be."""
        with self.cond:
            while not self.stopping:
                for spec in self.pending:
                    if (entry := self.suite.entry(spec, self.done)) is not None:
                        self.pending.remove(spec)
                        self.running.add(spec.name)
                        return spec, entry
                if not self.running:
                    for spec in self.pending:
                        self.suite.say(f"{spec.name}: skipped, it waits for {spec.waits_for}, which did not finish")
                    self.pending = []
                    return None
                self.cond.wait()
            return None

    def work(self):
        while (item := self.next_run()) is not None:
            spec, entry = item
            try:
                self.one(spec, entry)
            finally:
                with self.cond:
                    self.running.discard(spec.name)
                    self.children.pop(spec.name, None)
                    self.cond.notify_all()

    def one(self, spec: Spec, entry: dict):
        decision, old = decide(self.suite, spec, entry)
        if decision == "reuse":
            with self.cond:
                self.entries[spec.name] = self.done[spec.name] = old
            self.suite.say(f"{spec.name}: reused")
            return
        if decision in ("run", "resume"):
            note = self.suite.note(spec, entry)
            self.suite.say(f"{time.strftime('%H:%M:%S')} {'start' if decision == 'run' else 'resume'} {spec.name}"
                           + (f": {note}" if note else ""))
            entry = self.suite.launch(spec, entry, Launcher(self, spec, decision == "resume", old))
        else:
            why = (entry.get("error") or "").strip().splitlines()
            self.suite.say(f"{spec.name}: {decision}: {why[-1][:300] if why else ''}")
        self.suite.record(spec, entry)
        with self.cond:
            self.entries[spec.name] = entry
            if entry.get("status") == "ok":
                self.done[spec.name] = entry
            self.publish()

    def stop(self, signum, frame):
        """Stop every run (each saves a checkpoint first) and start no new one."""
        with self.cond:
            if self.stopping:
                return
            self.stopping = True
            self.cond.notify_all()
            groups = [pid for pids in self.children.values() for pid in pids]
        self.suite.say(f"signal {signum}: stopping {len(self.children)} runs (they save first)")
        for pid in groups:
            _terminate(pid)


def run(suite: Suite, only: str | None = None, jobs: int = 1, show_plan: bool = False) -> dict | None:
    """Start the suite's runs that match `only` (all of them validated first); -> results.json's
    content, or None for a plan."""
    specs = [s for s in suite.specs if s.selected(only)]
    suite.validate(specs)
    if show_plan:
        plan(suite, specs)
        return None
    suite.out.mkdir(parents=True, exist_ok=True)
    state = Engine(suite, specs, jobs)
    state.results = suite.header()
    state.publish()
    suite.say(f"{len(specs)} runs, {jobs} at a time -> {suite.out}")
    with suite.session():
        handlers = {s: signal.signal(s, state.stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                for f in [pool.submit(state.work) for _ in range(jobs)]:
                    f.result()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
    if not state.stopping:
        state.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    suite.finish(state.results)
    state.publish()
    suite.say(f"wrote {suite.out / 'results.json'} and {suite.out / 'results.md'}")
    return state.results
