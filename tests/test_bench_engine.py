"""The benchmark engine (resbm_ds/bench/engine.py) without training: the reuse decision, the order
runs start and are published in, runs that wait on others, a signal that stops a run, and `--plan`
on copies of the committed results."""
import json
import os
import shutil
import signal
import sys
import threading
import time


from conftest import REPO
from resbm_ds.bench import engine
from resbm_ds.bench.__main__ import main as bench
from resbm_ds.bench.engine import Spec, decide


class Toy(engine.Suite):
    """Runs that 'train' by returning a loss; `b` waits for `a`'s loss; every publish is recorded."""
    tag = "toy"
    resumes = True

    def __init__(self, out, specs, fresh=False, fail=()):
        super().__init__(out, specs, fresh)
        self.fail, self.launched, self.published = set(fail), [], []

    def entry(self, spec, done):
        if spec.waits_for and "a" not in done:
            return None
        return dict(name=spec.name, overrides=[f"x={spec.run}"], lr=done["a"]["loss"] if spec.waits_for else 1)

    def launch(self, spec, entry, launcher):
        self.launched.append((spec.name, launcher.resume))
        return {**entry, "status": "failed" if spec.name in self.fail else "ok", "loss": 0.5}

    def header(self):
        return dict(suite="toy")

    def publish(self, results):
        self.published.append([r["name"] for r in results["runs"]])


def test_reuse_resume_or_run(tmp_path):
    suite = Toy(tmp_path, [])
    spec, entry = Spec("r", 1), dict(name="r", overrides=["x=1"])
    assert decide(suite, spec, entry) == ("run", None)                        # nothing there
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps(dict(status="ok", overrides=["x=1"])))
    assert decide(suite, spec, entry)[0] == "reuse"                           # finished, same settings
    assert decide(suite, spec, dict(entry, overrides=["x=2"]))[0] == "run"    # other settings
    assert decide(Toy(tmp_path, [], fresh=True), spec, entry)[0] == "run"     # --fresh
    (run_dir / "result.json").write_text(json.dumps(dict(status="partial", overrides=["x=1"])))
    assert decide(suite, spec, entry)[0] == "run"                             # stopped, no checkpoint
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("step2")
    assert decide(suite, spec, entry)[0] == "resume"
    suite.resumes = False
    assert decide(suite, spec, entry)[0] == "run"                             # a suite that cannot resume
    assert decide(suite, spec, dict(entry, status="unavailable"))[0] == "unavailable"   # never launched


def test_runs_start_in_order_wait_for_theirs_and_are_published_after_each(tmp_path, capsys):
    specs = [Spec("b", 2, waits_for="a's loss"), Spec("a", 1), Spec("c", 3), Spec("d", 4)]
    (tmp_path / "runs" / "c").mkdir(parents=True)                             # c finished before
    (tmp_path / "runs" / "c" / "result.json").write_text(json.dumps(dict(name="c", status="ok", overrides=["x=3"])))
    suite = Toy(tmp_path, specs, fail={"d"})
    res = engine.run(suite, only="^[abcd]$")
    assert suite.launched == [("a", False), ("b", False), ("d", False)]        # b waited for a; c reused
    assert [r["name"] for r in res["runs"]] == ["a", "b", "c", "d"]
    assert res["runs"][1]["lr"] == 0.5 and "finished" in res
    # published at the start, after every launched run, and at the end (a reused run waits for the next)
    assert suite.published == [[], ["a"], ["a", "b"], ["a", "b", "c", "d"], ["a", "b", "c", "d"]]
    assert (tmp_path / "runs" / "a" / "result.json").exists() and not (tmp_path / "runs" / "d" / "result.json").exists()
    assert "c: reused" in capsys.readouterr().out


def test_a_run_whose_settings_never_come_is_skipped(tmp_path, capsys):
    suite = Toy(tmp_path, [Spec("a", 1), Spec("b", 2, waits_for="a's loss")], fail={"a"})
    res = engine.run(suite)
    assert suite.launched == [("a", False)] and [r["name"] for r in res["runs"]] == ["a"]
    assert "b: skipped, it waits for a's loss" in capsys.readouterr().out


class Sleeper(Toy):
    def launch(self, spec, entry, launcher):
        rc, _ = launcher.run([sys.executable, "-c", "import time; time.sleep(60)"], self.run_dir(spec), 120, dict(os.environ))
        return {**entry, "status": "ok" if rc == 0 else "failed", "rc": rc}


def test_a_signal_stops_the_running_run_and_starts_no_other(tmp_path):
    suite = Sleeper(tmp_path, [Spec("a", 1), Spec("c", 3)])
    pid = os.getpid()

    def stop_when_started():
        while not (tmp_path / "runs" / "a" / "log.txt").exists():
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(pid, signal.SIGTERM)

    threading.Thread(target=stop_when_started, daemon=True).start()
    t0 = time.monotonic()
    res = engine.run(suite)
    assert time.monotonic() - t0 < 30
    assert [(r["name"], r["rc"]) for r in res["runs"]] == [("a", -signal.SIGTERM)]   # c never started
    assert "finished" not in res
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                          # handlers restored


def committed_copy(tmp_path, suite: str):
    """A temporary --out holding a copy of results/<suite>/results.json."""
    out = tmp_path / suite
    out.mkdir()
    shutil.copy(REPO / "results" / suite / "results.json", out)
    return out


def plan(capsys, argv) -> dict[str, str]:
    assert bench(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[1]: line.split()[0] for line in lines}


def test_plan_reuses_every_committed_convergence_run(tmp_path, capsys):
    out = committed_copy(tmp_path, "convergence")
    results = json.loads((out / "results.json").read_text())
    committed = [e["name"] for e in results["runs"] + results["diverged"] if e["status"] == "ok"]
    decisions = plan(capsys, ["--suite", "convergence", "--out", str(out), "--plan"])
    assert {n for n, d in decisions.items() if d == "reuse"} == set(committed)
    assert set(decisions.values()) <= {"reuse", "run", "wait"} and "run" in decisions.values()
    assert sorted(os.listdir(out)) == ["results.json"]                                  # nothing written
    fresh = plan(capsys, ["--suite", "convergence", "--out", str(out), "--plan", "--fresh", "--only", "@lr"])
    assert set(fresh.values()) == {"run"}


def test_plan_reuses_every_committed_sites_run(tmp_path, capsys):
    out = committed_copy(tmp_path, "sites")
    for e in json.loads((out / "results.json").read_text())["runs"]:     # as if the suite had run into `out`
        e["overrides"] = [o.replace("train.out_dir=results/sites/", f"train.out_dir={out}/") for o in e["overrides"]]
        (out / "runs" / e["name"]).mkdir(parents=True)
        (out / "runs" / e["name"] / "result.json").write_text(json.dumps(e))
    decisions = plan(capsys, ["--suite", "sites", "--out", str(out), "--plan"])
    assert len(decisions) == 9 and set(decisions.values()) == {"reuse"}
    decisions = plan(capsys, ["--suite", "sites", "--out", str(out), "--plan", "--set", "train.lr=0.001"])
    assert set(decisions.values()) == {"run"}                            # other settings: nothing reused
