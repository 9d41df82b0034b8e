"""metrics.py and watch.py on their own: metrics.jsonl written, resumed and read back (a torn last
line from a kill mid-append dropped with a note), the plain log line, and the watches a rank keeps
on its launcher, its peers and its progress, with real processes and a real thread (those two are in the launching lane)."""
import subprocess
import sys
import time

import pytest

from resbm_ds.config import load_config
from resbm_ds.metrics import METRICS_FILE, Metrics, metric_rows, plain_line, read_metrics
from resbm_ds.watch import peer_failure

STEP = dict(loss=5.0, lr=1e-3, grad_norm=0.5, tokens_per_s=1000.0, wire_bytes_fwd=2e6, wire_bytes_bwd=1e6, peak_mem_mb=700)


def test_metrics_resume_drops_rows_past_the_checkpoint_and_reads_back(tmp_path, capsys):
    cfg = load_config(None, ["train.steps=6", "tracking.tensorboard=false"])
    m = Metrics(cfg, tmp_path, resumed_step=0, enabled=True, plain_lines=True)
    for step in range(1, 5):
        m.log(dict(step=step, **STEP))
    m.log(dict(step=4, val_loss=4.5, eval_s=0.1))
    m.close()
    assert "[resbm] step 4/6 val_loss 4.5000 (eval 0.1s)" in capsys.readouterr().out
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 5, "loss"')                     # a kill mid-append
    again = Metrics(cfg, tmp_path, resumed_step=2, enabled=True, plain_lines=False)   # resumed from step 2
    again.log(dict(step=3, **STEP))
    again.close()
    steps, vals = read_metrics(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3] and vals == []
    assert "dropped 1 unreadable line(s) [6] (the last one: a write cut short)" in capsys.readouterr().err


def test_a_torn_line_in_the_middle_is_named(tmp_path, capsys):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    assert [r["step"] for _, r in metric_rows(tmp_path / METRICS_FILE)] == [1, 2]
    assert "[2]" in capsys.readouterr().err and "cut short" not in capsys.readouterr().err


def test_plain_line_of_a_step():
    line = plain_line(dict(step=3, **STEP), 10)
    assert line == "[resbm] step 3/10 loss 5.0000, lr 0.001, grad_norm 0.5, tok/s 1,000, wire 3.000 MB, peak mem 700 MB"


@pytest.mark.slow      # real processes, waiting on their start-up
def test_launcher_watch_sees_its_launcher_end(tmp_path):
    """A rank whose launcher (here a process whose script is named `torchrun`) ends is told so, once."""
    rank = tmp_path / "rank.py"
    rank.write_text("import time\n"
                    "from resbm_ds.watch import LauncherWatch\n"
                    "seen = []\n"
                    "watch = LauncherWatch(seen.append, interval_s=0.1)\n"
                    "print('chain', [name for _, name in watch.chain], flush=True)\n"
                    "for _ in range(300):\n"
                    "    time.sleep(0.1)\n"
                    "    if seen: break\n"
                    "print('seen', seen, flush=True)\n")
    launcher = tmp_path / "torchrun"
    out_file = tmp_path / "out"
    launcher.write_text("import pathlib, subprocess, sys, time\n"
                        f"out = pathlib.Path({str(out_file)!r})\n"
                        "subprocess.Popen([sys.executable, " + repr(str(rank)) + "], stdout=open(out, 'w'))\n"
                        # until the rank has started watching (it imports torch: seconds on a loaded box),
                        # then end without waiting for it
                        "deadline = time.monotonic() + 50\n"
                        "while 'chain' not in out.read_text() and time.monotonic() < deadline:\n"
                        "    time.sleep(0.1)\n")
    subprocess.run([sys.executable, str(launcher)], timeout=60)
    for _ in range(300):
        out = (tmp_path / "out").read_text()
        if "seen" in out:
            break
        time.sleep(0.1)
    assert "chain ['torchrun']" in out and "its launcher torchrun" in out and "ended" in out, out


@pytest.mark.slow
def test_progress_watch_ends_a_rank_that_makes_no_progress_and_spares_one_that_moves():
    code = ("import time\n"
            "from resbm_ds.watch import ProgressWatch\n"
            "count = [0]\n"
            "w = ProgressWatch(None, timeout_s=3, activity=lambda: count[0])\n"
            "with w.phase('step 1'):\n"
            "    for _ in range(40): time.sleep(0.2); count[0] += 1     # data keeps moving: 8 s, no stop\n"
            "print('moved past', flush=True)\n"
            "with w.phase('step 2'):\n"
            "    time.sleep(30)\n"
            "print('never', flush=True)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "moved past" in proc.stdout and "never" not in proc.stdout, proc.stderr
    assert "no progress in step 2 for 3 s" in proc.stderr and time.monotonic() - t0 < 25


def test_peer_failure_names_a_timeout_and_ignores_other_errors():
    line = peer_failure(RuntimeError("[../gloo/transport.cc:42] Timed out waiting 30000ms"), None, 30)
    assert line.startswith("a collective got no answer for 30 s") and "Timed out waiting" in line
    assert peer_failure(RuntimeError("Connection reset by peer"), None, 30).startswith("a collective lost its peer")
    assert peer_failure(ValueError("shape mismatch"), None, 30) is None
    assert peer_failure(RuntimeError("CUDA out of memory"), None, 30) is None
