"""Faults a run meets, each ending in one line and a non-zero exit with nothing lost (issue #16):
damaged checkpoints (refused by their manifest, naming the file and the previous complete tag),
code in a checkpoint (never run), a launcher that is signalled (no rank left alive), a stopped rank
(reported within RESBM_DIST_TIMEOUT), and no /dev/shm buffers left behind.

The checkpoint cases read a real run's checkpoints through the CLIs' own `main` in this process:
they are refused before any process group starts, so nothing else is needed. The process cases
launch real `deepspeed --num_gpus 2` runs."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import ENV, ONE, REPO, RunsCode, error_line, free_port, rows, train1, train_args
from resbm_ds import export, train
from resbm_ds.checkpoints.store import MANIFEST, verify, write_manifest
from resbm_ds.run_dir import LOCK_FILE
from resbm_ds.watch import Peers, peer_failure

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

RUN_ARGS = ["train.steps=3", "train.save_every=1", "train.keep_last=3", "train.eval_every=100"]
LAYER = "layer_01-model_00-model_states.pt"
STATES = "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 1-process run with checkpoints step1..step3, each with its manifest."""
    out = tmp_path_factory.mktemp("faults") / "run"
    train1(out, *RUN_ARGS)
    assert all((out / "checkpoints" / t / MANIFEST).is_file() for t in ("step1", "step2", "step3"))
    return out


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF          # inside the tensor data: the file still unpickles
    path.write_bytes(bytes(data))


def craft(path):
    torch.save({"module": None, "payload": RunsCode(path.parent / "code-ran")}, path)


# name: (file in step3, what is done to it, what the line says)
DAMAGE = {
    "tampered tensor byte": (LAYER, flip_a_byte, f"{LAYER} differs from the manifest"),
    "truncated layer file": (LAYER, lambda p: p.write_bytes(p.read_bytes()[:1000]),
                             f"{LAYER} has 1,000 bytes, the manifest says"),
    "empty layer file": (LAYER, lambda p: p.write_bytes(b""), f"{LAYER} has 0 bytes, the manifest says"),
    "missing layer file": (LAYER, lambda p: p.unlink(), f"{LAYER} is missing"),
    "missing mp_rank file": (STATES, lambda p: p.unlink(), f"{STATES} is missing"),
    "crafted pickle": (STATES, craft, f"{STATES} has "),   # its size depends on the marker path
    "save cut short (no manifest)": (MANIFEST, lambda p: p.unlink(), "did not finish"),
}


def damaged_copy(saved_run, tmp_path, file, damage):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    damage(run / "checkpoints" / "step3" / file)
    return run


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def listing(run):
    """The run's files and sizes; not its lock file, which each start that takes it rewrites."""
    return sorted((str(p.relative_to(run)), p.stat().st_size) for p in run.rglob("*")
                  if p.is_file() and p.name != LOCK_FILE)


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_one(saved_run, tmp_path, capsys, case):
    file, damage, says = DAMAGE[case]
    run = damaged_copy(saved_run, tmp_path, file, damage)
    before = listing(run)
    rc = train.main(train_args(run, *ONE, *RUN_ARGS, "train.steps=5", "--resume")[1:])
    line = one_error_line(capsys)
    assert rc == 2 and says in line and "continue from the previous complete checkpoint with --resume-from step2" in line, line
    assert listing(run) == before and not (run / "checkpoints" / "step3" / "code-ran").exists()

    rc = export.main([str(run), "--out", str(tmp_path / "export")])
    line = one_error_line(capsys)
    assert rc == 2 and says in line and "--tag step2" in line and not (tmp_path / "export").exists(), line


@pytest.mark.parametrize("latest,says", [
    ("step9", "names 'step9', which is missing, but"),
    (None, "latest is missing, but"),
])
def test_latest_naming_no_checkpoint_lists_the_tags(saved_run, tmp_path, capsys, latest, says):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    if latest is None:
        (run / "checkpoints" / "latest").unlink()
    else:
        (run / "checkpoints" / "latest").write_text(latest)
    before = listing(run)
    rc = train.main(train_args(run, *ONE, *RUN_ARGS, "--resume")[1:])
    line = one_error_line(capsys)
    assert rc == 2 and says in line and "['step1', 'step2', 'step3']" in line and "--resume-from TAG" in line, line
    assert listing(run) == before
    if latest:
        rc = export.main([str(run)])
        line = one_error_line(capsys)
        assert rc == 2 and "names 'step9', which is missing" in line and "'step3'" in line, line


def test_a_run_from_before_manifests_is_read_with_a_warning_and_its_load_errors_are_one_line(saved_run, tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(saved_run, run)
    for m in (run / "checkpoints").glob(f"*/{MANIFEST}"):
        m.unlink()
    verify(run / "checkpoints" / "step3")
    assert f"has no {MANIFEST}" in capsys.readouterr().err
    # without a manifest the damage reaches DeepSpeed's loader (past the process group): still one line
    (run / "checkpoints" / "step3" / STATES).unlink()
    proc = train1(run, *RUN_ARGS, "train.steps=5", "--resume", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "could not load checkpoint step3" in lines[0] and "--resume-from step2" in lines[0], lines[0]


# ---- processes --------------------------------------------------------------------------------

def shm_buffers(port) -> list[str]:
    """DeepSpeed's CPU all-reduce buffers of the run on `port` (shm.cpp names them
    deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>)."""
    return [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in f]


def running(procs) -> list:
    """Those still running code: an exited rank its launcher has not reaped yet (a zombie) is not."""
    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in procs if alive(p)]


class DeepSpeedRun:
    """`deepspeed --num_gpus 2` training in the background, its output read as it comes."""

    def __init__(self, out, env=None):
        self.port = free_port()
        cmd = ["deepspeed", "--num_gpus=2", f"--master_port={self.port}", "--module",
               *train_args(out, "train.steps=2000", "train.eval_every=10000", "train.save_every=10000")]
        # SIGINT as at a terminal: a shell without job control starts background jobs (CI's, nohup's
        # `cmd &`) with SIGINT ignored, and the runner would inherit that and never see the signal
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.time() + 300
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(rows(out)) >= 2):
            assert self.proc.poll() is None, self.output()
            time.sleep(0.1)
        self.ranks = sorted((p for p in psutil.Process(self.proc.pid).children(recursive=True)
                             if "--local_rank=" in " ".join(p.cmdline())),
                            key=lambda p: " ".join(p.cmdline()))   # --local_rank=0, 1
        assert len(self.ranks) == 2, self.output()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, pattern, timeout) -> tuple[float, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [(t, ln) for t, ln in self.lines if re.search(pattern, ln)]
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.output()[-4000:]}")

    def end(self):
        for p in self.ranks:
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)


@pytest.mark.timing    # "within seconds"
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_deepspeed_runner_ends_every_rank_saved_within_seconds(tmp_path, signum):
    out = tmp_path / "run"
    run = DeepSpeedRun(out)
    try:
        sent = time.time()
        run.proc.send_signal(signum)          # to the runner alone, as `kill` does
        deadline = sent + 10
        while time.time() < deadline and running(run.ranks):
            time.sleep(0.1)
        if running(run.ranks):
            pytest.fail("ranks still running 10 s after the signal; output since:\n" +
                        "\n".join(f"{t - sent:+.2f} {ln}" for t, ln in run.lines if t > sent - 1))
        run.proc.wait(timeout=30)
        t, line = run.wait_for(r"stopped after step \d+ \(its launcher deepspeed \(pid \d+\) ended\)", 5)
        step = int(re.search(r"after step (\d+)", line).group(1))
        assert run.proc.returncode != 0 and t - sent < 10
        assert f"checkpoint step{step} saved; continue with --resume" in line
        assert (out / "checkpoints" / "latest").read_text() == f"step{step}"
        assert (out / "checkpoints" / f"step{step}" / MANIFEST).is_file()
        assert len([ln for _, ln in run.lines if ln.startswith("[resbm] stopped")]) == 1
        assert not shm_buffers(run.port)
    finally:
        run.end()


@pytest.mark.timing
def test_a_stopped_rank_is_reported_within_the_dist_timeout(tmp_path):
    timeout = 8
    run = DeepSpeedRun(tmp_path / "run", env={"RESBM_DIST_TIMEOUT": str(timeout)})
    try:
        victim = run.ranks[1]
        victim.send_signal(signal.SIGSTOP)
        stopped = time.time()
        t, line = run.wait_for(r"^error \(rank 0\)", timeout + 20)
        assert t - stopped < timeout + 10, (t - stopped, line)
        assert f"rank 1 (pid {victim.pid}) is stopped (SIGSTOP)" in line and "RESBM_DIST_TIMEOUT" in line, line
        assert len([ln for _, ln in run.lines if ln.startswith("error")]) == 1, run.output()[-3000:]
        assert "Traceback" not in run.output()
        psutil.Process(run.ranks[0].pid).wait(timeout=30)
        assert not shm_buffers(run.port)
    finally:
        run.end()
    assert run.proc.returncode != 0


def test_a_lost_peer_is_named_by_rank(tmp_path):
    """The line a rank prints when a collective loses its peer names the dead or stopped rank on
    this host: real processes in each state, the same table `Peers` gathers at start."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        sleeper.send_signal(signal.SIGSTOP)
        peers = Peers.__new__(Peers)
        host = __import__("socket").gethostname()
        peers.rank, peers.table = 0, [(host, os.getpid()), (host, dead.pid), (host, sleeper.pid), ("elsewhere", 1)]
        time.sleep(0.2)
        line = peer_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:1"),
                            peers, 300)
        assert line.startswith("a collective lost its peer: ")
        assert f"rank 1 (pid {dead.pid}) is gone" in line and f"rank 2 (pid {sleeper.pid}) is stopped" in line
        assert "rank 3" not in line and "Connection closed by peer" in line and "pair.cc" not in line
        assert peer_failure(RuntimeError("loss is nan"), peers, 300) is None
    finally:
        sleeper.kill()
        sleeper.wait()


WATCHED_STEP = """
import sys, time
from resbm_ds.watch import ProgressWatch
moving = sys.argv[1] == "moving"
transfers = [0]
watch = ProgressWatch(None, timeout_s=1, activity=lambda: transfers[0])
with watch.phase("step 7"):
    for _ in range(30):          # 3 s: three times the deadline
        time.sleep(0.1)
        transfers[0] += moving   # a message crossed, or none did
print("survived")
"""


@pytest.mark.timing
@pytest.mark.parametrize("mode", ["moving", "stuck"])
def test_the_step_deadline_counts_from_the_last_message_not_the_step_start(mode):
    """A step that keeps moving data outlives the deadline; one where nothing crosses ends in one line."""
    proc = subprocess.run([sys.executable, "-c", WATCHED_STEP, mode], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    if mode == "moving":
        assert proc.returncode == 0 and proc.stdout.strip() == "survived", proc.stderr[-2000:]
    else:
        assert proc.returncode == 1 and "survived" not in proc.stdout
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("error (rank 0): no progress in step 7 for 1 s"), line


# ---- one run per directory ------------------------------------------------------------------------

def test_two_runs_into_one_out_dir_one_runs_the_other_is_refused_naming_the_holder(tmp_path):
    """Both started at once, with different seeds and steps enough to outlast the other's start: the
    one that takes OUT/.lock runs; the other exits 2 with one line naming the holder's pid. Then the
    holder is stopped (SIGTERM saves), and the directory holds its run alone."""
    out = tmp_path / "run"
    procs = {seed: subprocess.Popen([sys.executable, "-m", *train_args(out, *ONE, "train.steps=100000",
                                                                       "train.save_every=100000",
                                                                       "train.eval_every=100000", f"seed={seed}")],
                                    cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={**ENV, "MASTER_PORT": str(free_port())}) for seed in (1, 2)}
    try:
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in procs.values()):
            time.sleep(0.2)
        (seed, loser), = [(s, p) for s, p in procs.items() if p.poll() is not None]
        (holder,) = [p for p in procs.values() if p is not loser]
        lost_out, lost_err = loser.communicate(timeout=60)
        assert loser.returncode == 2, lost_err[-3000:]
        (line,) = lost_err.strip().splitlines()
        assert line.startswith(f"error: train.out_dir={out} is in use by another run (host ") and \
            f"pid {holder.pid};" in line and "nothing was changed" in line, line
        assert "[resbm]" not in lost_out   # it never got to start
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(rows(out)) >= 2):
            assert holder.poll() is None, holder.communicate()[1][-3000:]
            time.sleep(0.2)
        holder.send_signal(signal.SIGTERM)
        _, err = holder.communicate(timeout=120)
        assert holder.returncode == 128 + signal.SIGTERM, err[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    steps = [r["step"] for r in rows(out) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)), steps          # one row per step, one run
    assert (out / "checkpoints" / "latest").read_text() == f"step{steps[-1]}"
    holder_seed = 3 - seed
    assert f"\nseed: {holder_seed}\n" in "\n" + (out / "config.yaml").read_text()
    # the lock ends with its holder: the run can be continued
    train1(out, f"seed={holder_seed}", f"train.steps={steps[-1] + 1}", "train.save_every=100000",
           "train.eval_every=100000", "--resume")
    assert [r["step"] for r in rows(out) if "loss" in r] == list(range(1, steps[-1] + 2))


# ---- non-finite and diverged steps ----------------------------------------------------------------

def nonfinite_layers(run) -> list[str]:
    """Every saved layer file holding a NaN or infinite weight."""
    return [str(f.relative_to(run)) for f in sorted(run.glob("checkpoints/*/layer_*.pt"))
            if not all(torch.isfinite(v).all() for v in torch.load(f, weights_only=True).values()
                       if v.is_floating_point())]


# name: (overrides, the error line says, the checkpoints left, steps logged as skipped)
NONFINITE = {
    "NaN from step 1 (init_std=1e30)": (["model.init_std=1e30"],
                                        "step 4 is not finite (loss is 8.318, gradient norm nan; 4 in a row, more "
                                        "than train.max_skipped_steps=3): not applied, nothing saved since step 1; "
                                        "no checkpoint was saved", [], [1, 2, 3, 4]),
    "NaN from step 2, train.nonfinite=stop": (["train.lr=1e30", "deepspeed.gradient_clipping=0.0", "train.nonfinite=stop",
                                               "train.max_param_rms=0"],
                                              "step 2 is not finite (loss is nan, gradient norm nan; "
                                              "train.nonfinite=stop)", ["step1"], [2]),
    "exploding weights (lr=1e4)": (["train.lr=1e4"],
                                   "training diverged at step 1: the parameters' RMS is", [], []),
    "diverged without a NaN (lr=1e4)": (["train.lr=1e4", "train.max_param_rms=0"],
                                        "training diverged at step 7: loss 8.3178 >= ln(model.vocab_size) = 8.3178 "
                                        "with a zero gradient norm at 3 steps since step 2, none saved; the last good "
                                        "checkpoint is step1 (--resume-from step1)", ["step1"], [4, 5, 6]),
}


@pytest.mark.parametrize("case", list(NONFINITE))
def test_a_non_finite_or_diverged_step_is_never_applied_or_saved(tmp_path, case):
    overrides, says, saved, skipped = NONFINITE[case]
    run = tmp_path / "run"
    proc = train1(run, "train.steps=10", "train.save_every=1", "train.eval_every=100", *overrides, check=False)
    line = error_line(proc)
    assert proc.returncode == 1 and says in line, line
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    assert ckpts == saved and not nonfinite_layers(run), (ckpts, nonfinite_layers(run))
    if saved:
        assert (run / "checkpoints" / "latest").read_text() == saved[-1]
    assert [r["step"] for r in rows(run) if r.get("skipped")] == skipped
    if saved:   # --resume continues from the last good checkpoint (and meets the same fate)
        proc = train1(run, "train.steps=10", "train.save_every=1", "train.eval_every=100", *overrides,
                      "--resume", check=False)
        assert "resuming at step 2" in proc.stdout and proc.returncode == 1, proc.stderr[-2000:]
        assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == saved and not nonfinite_layers(run)


def test_non_finite_weights_in_a_checkpoint_are_refused_by_resume_and_export(saved_run, tmp_path, capsys):
    """A checkpoint saved with NaN weights (by a run before these checks), its manifest rewritten to
    match: --resume and export each refuse it in one line, offering the previous tag."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    layer = run / "checkpoints" / "step3" / LAYER
    sd = torch.load(layer, weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = torch.full_like(sd[key], float("nan"))
    torch.save(sd, layer)
    write_manifest(layer.parent)

    proc = train1(run, *RUN_ARGS, "train.steps=5", "--resume", check=False)
    line = error_line(proc)
    assert proc.returncode == 1 and "checkpoint step3" in line and "holds non-finite weights" in line \
        and "--resume-from step2" in line, line
    assert (run / "checkpoints" / "latest").read_text() == "step3" and not (run / "checkpoints" / "step4").exists()

    rc = export.main([str(run), "--out", str(tmp_path / "export")])
    line = one_error_line(capsys)
    assert rc == 2 and f"{LAYER} holds non-finite weights ({key})" in line and "--tag step2" in line, line
    assert not (tmp_path / "export").exists()


# ---- damaged run files and what a resume means ------------------------------------------------------

def test_a_torn_metrics_line_is_dropped_and_the_resumed_lr_is_the_printed_one(saved_run, tmp_path):
    """A kill during an append leaves half a row: the resume drops it with a note. The stretched
    schedule's lr that the resume prints is the lr the next step logs, and the cosine goes on down."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 7.1, "lr": 0.00')
    lines = len((run / "metrics.jsonl").read_text().splitlines())
    proc = train1(run, *RUN_ARGS, "train.steps=6", "--resume")
    assert f"dropped 1 unreadable line(s) [{lines}] (the last one: a write cut short)" in proc.stderr, proc.stderr[-2000:]
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    printed = float(re.search(r"the lr at step 4 is ([0-9.e+-]+) \(", proc.stdout).group(1))
    lr = {r["step"]: r["lr"] for r in rows(run) if "loss" in r}
    assert printed == pytest.approx(lr[4], rel=2e-3) and lr[4] > lr[5] > lr[6], (printed, lr)


# name: (what is done to the run, the one line says)
DAMAGED_RUN = {
    "config.yaml not YAML": (lambda run: (run / "config.yaml").write_text("model: [64\n"),
                             "config.yaml is damaged (not valid YAML"),
    "config.yaml a list": (lambda run: (run / "config.yaml").write_text("- model\n"),
                           "config.yaml is damaged (holds a list, not a mapping)"),
    "layout.json cut short": (lambda run: (run / "layout.json").write_text('{"pipeline.stages": 1, "data_'),
                              "layout.json is damaged ("),
}


@pytest.mark.parametrize("case", list(DAMAGED_RUN))
def test_a_damaged_run_file_is_one_line_naming_it(saved_run, tmp_path, capsys, case):
    damage, says = DAMAGED_RUN[case]
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    damage(run)
    before = listing(run)
    rc = train.main(train_args(run, *ONE, *RUN_ARGS, "train.steps=5", "--resume")[1:])
    line = one_error_line(capsys)
    assert rc == 2 and str(run / says.split()[0]) in line and says in line and "--overwrite" in line, line
    assert listing(run) == before


@pytest.mark.parametrize("steps", [3, 2])
def test_resume_with_train_steps_at_or_below_the_checkpoint_is_refused_naming_the_step(saved_run, tmp_path, capsys,
                                                                                      steps):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    before = listing(run)
    rc = train.main(train_args(run, *ONE, *RUN_ARGS, f"train.steps={steps}", "--resume")[1:])
    line = one_error_line(capsys)
    assert rc == 2 and f"the run is at step 3 (step3) and train.steps={steps} leaves nothing to train" in line \
        and "train.steps=4 or more" in line, line
    assert listing(run) == before


# ---- one path rule for tags; exports whole or not at all ---------------------------------------------

@pytest.mark.parametrize("kind", ["relative path", "absolute path", "dot-dot inside", "link out"])
def test_a_tag_that_leaves_the_run_is_refused_by_every_command(saved_run, tmp_path, capsys, kind):
    run, other = tmp_path / "run", tmp_path / "other_run"
    shutil.copytree(saved_run, run)
    shutil.copytree(saved_run, other)
    tag = {"relative path": "../../other_run/checkpoints/step2", "absolute path": str(other / "checkpoints" / "step2"),
           "dot-dot inside": "step2/../../../other_run/checkpoints/step2", "link out": "step9"}[kind]
    if kind == "link out":
        (run / "checkpoints" / "step9").symlink_to(other / "checkpoints" / "step2")
    before = listing(run)
    for main, argv in ((export.main, [str(run), "--tag", tag]),
                       (train.main, train_args(run, *ONE, *RUN_ARGS, "train.steps=5", "--resume-from", tag)[1:])):
        rc = main(argv)
        line = one_error_line(capsys)
        assert rc == 2 and f"{tag!r}: a checkpoint tag is the name of a directory in {run / 'checkpoints'}" in line, line
        assert listing(run) == before and not (run / "export").exists()


def test_an_export_replaces_the_previous_one_whole_or_not_at_all(saved_run, tmp_path):
    run, out = tmp_path / "run", tmp_path / "exported"
    shutil.copytree(saved_run, run)
    assert export.main([str(run), "--out", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    # a re-export that fails half-way (the tokenizer copy meets a dangling link) leaves the first whole
    (run / "tokenizer" / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(shutil.Error):
        export.main([str(run), "--tag", "step2", "--out", str(out)])
    assert (out / "model.safetensors").read_bytes() == first and sorted(os.listdir(tmp_path)) == ["exported", "run"]
    (run / "tokenizer" / "dangling").unlink()
    assert export.main([str(run), "--tag", "step2", "--out", str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() != first and sorted(os.listdir(tmp_path)) == ["exported", "run"]
    assert (out / "tokenizer").is_dir() and oct(out.stat().st_mode & 0o777) == "0o755"
    # --out on a directory that is not an export is refused: it would be replaced
    assert export.main([str(run), "--out", str(run)]) == 2 and (run / "checkpoints").is_dir()


# ---- no hangs ---------------------------------------------------------------------------------------

def ranks_of(out) -> list:
    return [p for p in psutil.process_iter(["cmdline"]) if f"train.out_dir={out}" in " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_busy_master_port_ends_the_run_in_one_line_with_no_rank_left(tmp_path, launcher):
    """Before: under `deepspeed`, rank 0 failed with a traceback and rank 1, its SIGTERM caught by the
    trainer while it retried the store in C++, outlived the launcher for the 300 s rendezvous."""
    out = tmp_path / "run"
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = (["deepspeed", "--num_gpus=2", f"--master_port={port}", "--module"] if launcher == "deepspeed" else
               [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m"])
        t0 = time.time()
        proc = subprocess.run([*cmd, *train_args(out, "train.steps=3")], cwd=REPO, env=ENV, capture_output=True,
                              text=True, timeout=280)
        took = time.time() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and took < 150, (proc.returncode, took, text[-3000:])
    assert not running(ranks_of(out)), [p.info["cmdline"] for p in ranks_of(out)]
    if launcher == "deepspeed":   # our rank 0 hosts the store (torchrun's agent does, and says so itself)
        lines = [ln for ln in text.splitlines() if ln.startswith("error")]
        assert len(lines) == 1 and f"MASTER_PORT={port} on 127.0.0.1 is in use" in lines[0], text[-3000:]
        assert "Traceback" not in text
    else:
        assert "EADDRINUSE" in text or "address already in use" in text.lower(), text[-3000:]
    assert not (out / "metrics.jsonl").exists()


def test_a_tokenizer_that_changed_under_a_run_is_refused_before_launch(saved_run, tmp_path, capsys):
    """The run's tokenizer/ differs from the one the cache gives now (as after a retrained or replaced
    cache entry): refused in one line before any process starts (before: a ValueError traceback
    after the process group)."""
    from sentencepiece import sentencepiece_model_pb2
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    spm = run / "tokenizer" / "spm.model"
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm.read_bytes())
    proto.pieces[-1].score -= 1.0          # still a valid model, another one
    spm.write_bytes(proto.SerializeToString())
    before = listing(run)
    rc = train.main(train_args(run, *ONE, *RUN_ARGS, "train.steps=5", "--resume")[1:])
    line = one_error_line(capsys)
    assert rc == 2 and "--resume: the tokenizer is not the run's" in line and str(run / "tokenizer") in line, line
    assert listing(run) == before


# ---- a full disk --------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 10 MB filesystem, room for one checkpoint of the tiny model (tmpfs: needs the right to
    mount, else the test is skipped)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10M", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs CAP_SYS_ADMIN)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_no_cut_short_tag(small_disk, saved_run, capsys):
    """Before: `iostream error` / `unexpected pos` tracebacks, a cut-short tag the next --resume
    offered, and an export that left an empty directory behind."""
    run = small_disk / "run"
    proc = train1(run, "train.steps=4", "train.save_every=1", "train.eval_every=100", check=False)
    line = error_line(proc)
    assert proc.returncode == 1 and f"saving checkpoint step2 in {run / 'checkpoints'} failed (no space left on " \
        f"the filesystem of {small_disk}" in line, line
    assert re.search(r"a checkpoint of this run takes [\d,]+ bytes: free space, then continue with --resume\); it "
                     r"was removed; the last good checkpoint is step1", line), line
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step1"]
    assert (run / "checkpoints" / "latest").read_text() == "step1"
    dry = train1(run, "train.steps=4", "train.save_every=1", "train.eval_every=100", "--resume", "--dry-run")
    assert "; resume from step1;" in dry.stdout

    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - 64 * 1024))
    rc = export.main([str(saved_run), "--out", str(small_disk / "exported")])
    line = one_error_line(capsys)
    assert rc == 2 and f"exporting to {small_disk / 'exported'} failed (no space left on the filesystem of " \
        f"{small_disk}" in line and "nothing was left behind" in line, line
    assert sorted(os.listdir(small_disk)) == ["filler", "run"]


def test_a_rank_killed_while_loading_the_comm_op_does_not_hang_the_next_run(tmp_path):
    """torch holds a presence-file baton (`lock`) in the op's build directory while it loads the op;
    a process killed then leaves it, and every later load used to wait for it forever."""
    extensions = tmp_path / "torch_extensions"
    built = os.environ.get("TORCH_EXTENSIONS_DIR")
    if built and (Path(built) / "deepspeed_shm_comm").is_dir():   # copy the built op: no 40 s compile
        shutil.copytree(Path(built) / "deepspeed_shm_comm", extensions / "deepspeed_shm_comm")
    baton = extensions / "deepspeed_shm_comm" / "lock"
    baton.parent.mkdir(parents=True, exist_ok=True)
    baton.touch()                                # what torch's FileBaton leaves when its holder is killed
    proc = train1(tmp_path / "run", "train.steps=1", "train.eval_every=100", timeout=240,
                  env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert "left by a process killed while it loaded DeepSpeed's comm op" in proc.stderr and not baton.exists()
    assert rows(tmp_path / "run")[-1]["step"] == 1
