"""The training entry point end to end: real corpus, real tokenizer, real DeepSpeed processes."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, free_port, launch, rows, train_args

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

MB, GAS, T, H, h = 2, 2, 64, 64, 4


def test_cli_run_writes_metrics_tensorboard_checkpoints(tmp_path):
    out = tmp_path / "run"
    proc = launch(["--module", *train_args(out, "train.steps=6", "train.eval_every=3", "train.save_every=3")], 2,
                  launcher="deepspeed")
    steps = [r for r in rows(out) if "loss" in r]
    vals = [r for r in rows(out) if "val_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in vals] == [3, 6]
    per_step = GAS * MB * T * h * 4            # fp32 code, one boundary, one pipeline
    for r in steps:                            # the default reads the token ids on each stage: the code alone
        assert r["wire_bytes_fwd"] == r["wire_bytes_bwd"] == per_step
        assert r["tokens"] == r["step"] * GAS * MB * T and r["tokens_per_s"] > 0
    assert steps[0]["lr"] < steps[2]["lr"]     # warmup
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (f"wire: {4 * h} bytes/token forward, {4 * h} backward per boundary (measured) -> "
            f"{4 * H / (4 * h):.1f}x fewer than a dense fp32 boundary, {2 * H / (4 * h):.1f}x vs dense bf16"
            ) in proc.stdout
    assert (out / "checkpoints" / "latest").read_text() == "step6"
    assert (out / "tokenizer" / "spm.model").exists() and (out / "config.yaml").exists()
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    assert "\r" not in proc.stdout + proc.stderr           # a captured log gets plain lines, no progress bar
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("[resbm] step ") and " loss " in ln]) == 6
    # no DeepSpeed CPU all-reduce buffers left in /dev/shm (shm.cpp names them ..._<addr>_<port>_<rank>)
    port = re.search(r"--master_port=(\d+)", proc.stdout + proc.stderr).group(1)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("deepspeed_allreduce_buffer") and f"_{port}_" in f]


def test_killed_run_resumes_with_the_uninterrupted_losses(tmp_path):
    args = ["train.steps=24", "train.save_every=5", "train.eval_every=100"]
    ref = tmp_path / "ref"
    launch(["-m", *train_args(ref, *args)], 2)
    expected = {r["step"]: r["loss"] for r in rows(ref) if "loss" in r}

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", *train_args(out, *args)]
    victim = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:   # kill the whole run once it is past its first checkpoint
        if (out / "metrics.jsonl").exists() and any(r.get("step", 0) >= 7 for r in rows(out)):
            break
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = max(r["step"] for r in rows(out))
    latest = (out / "checkpoints" / "latest").read_text()
    assert killed_at < 24 and latest in ("step5", "step10", "step15", "step20"), (killed_at, latest)

    launch(["-m", *train_args(out, *args), "--resume"], 2)
    resumed = {r["step"]: r["loss"] for r in rows(out) if "loss" in r}
    assert sorted(resumed) == list(range(1, 25))      # no duplicated or missing steps
    for step in range(1, 25):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), (step, resumed, expected)


@pytest.mark.parametrize("extra,nprocs,message", [
    (["data.train_path=/nonexistent/corpus.txt"], 2, "data.train_path='/nonexistent/corpus.txt': does not exist"),
    (["model.hidden_sise=64"], 2, "model.hidden_sise"),
    (["pipeline.stages=2"], 3, "pipeline.stages=2: must divide the world size (3 processes)"),
])
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, extra, nprocs, message):
    proc = launch(["-m", *train_args(tmp_path / "x", *extra)], nprocs, check=False,
                  timeout=180)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_nan_loss_stops_every_rank_with_a_message(tmp_path):
    """Two stages: a non-finite step is skipped by both (they agree through one all-reduce), never
    saved, and the run stops after train.max_skipped_steps of them with the last good checkpoint."""
    import torch
    out = tmp_path / "nan"
    proc = launch(["-m", *train_args(out, "train.lr=1e30", "train.warmup_steps=1", "train.save_every=1",
                                     "train.steps=20", "deepspeed.gradient_clipping=0.0", "train.max_param_rms=0")],
                  2, check=False, timeout=300)
    assert proc.returncode != 0
    assert "loss is nan" in proc.stderr.lower() or "loss is inf" in proc.stderr.lower(), proc.stderr[-3000:]
    assert "more than train.max_skipped_steps=3" in proc.stderr and "the last good checkpoint is step" in proc.stderr
    skipped = [r["step"] for r in rows(out) if r.get("skipped")]
    assert len(skipped) == 4 and skipped == list(range(skipped[0], skipped[0] + 4)), skipped
    saved = sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*"))
    assert saved and max(saved) < skipped[0], (saved, skipped)
    for f in (out / "checkpoints").glob("step*/layer_*.pt"):
        assert all(torch.isfinite(v).all() for v in torch.load(f, weights_only=True).values() if v.is_floating_point()), f


def test_a_dead_rank_ends_the_run_quickly(tmp_path):
    """Kill one rank mid-run: the launcher must end the others and exit non-zero, not hang."""
    import psutil
    out = tmp_path / "dead"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "--max-restarts=0", "-m", *train_args(out, "train.steps=500", "train.eval_every=1000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and rows(out)):
        time.sleep(0.2)
    ranks = [c for c in psutil.Process(proc.pid).children() if "resbm_ds.train" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    killed_at = time.time()
    ranks[1].kill()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - killed_at < 60
    assert "SIGKILL" in output and "resbm_ds.train FAILED" in output, output[-3000:]
