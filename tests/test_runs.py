"""Runs people manage: trackers (real W&B offline, MLflow on SQLite, TensorBoard), plain logs, a stop
signal that saves, resume guards, weights-only starts from another layout, and the CLI around them."""
import glob
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from conftest import ENV, ONE, REPO, TINY, RunsCode, error_line, free_port, launch, rows, train1, train_args

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

# ---- trackers -------------------------------------------------------------------------------------

def wandb_records(run_dir):
    """The records of a W&B offline run file (`run-*.wandb`): wandb's LevelDB-style log of protobuf
    records (32 KiB blocks, 7-byte chunk headers), read with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb
    path, = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, block, pos, records, partial = open(path, "rb").read(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(partial)
            records.append(rec)
    return records


def record_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_trackers_log_the_project_metrics_on_the_step_axis(tmp_path):
    out = tmp_path / "tracked"
    launch(["-m", *train_args(out, "train.steps=4", "train.log_every=2", "train.eval_every=4",
                              "tracking.wandb=true", "tracking.wandb_mode=offline", "tracking.mlflow=true")], 2,
           env={"WANDB_SILENT": "true"})
    logged = {r["step"]: r for r in rows(out) if "loss" in r}
    assert sorted(logged) == [2, 4]

    # W&B: every resbm scalar at its training step, the resolved config and the run metadata
    records = wandb_records(out)
    history = [{record_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    by_step = {h["_step"]: h for h in history}
    for step, row in logged.items():
        for key in ("loss", "lr", "wire_bytes_fwd", "wire_bytes_bwd", "tokens", "grad_norm", "peak_mem_mb"):
            assert by_step[step][key] == pytest.approx(row[key]), (step, key)
    assert by_step[4]["val_loss"] == pytest.approx(next(r["val_loss"] for r in rows(out) if "val_loss" in r))
    config = {record_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}
    assert config["model"]["hidden_size"] == 64 and config["pipeline"]["stages"] == 2
    assert config["meta"]["deepspeed"] and config["meta"]["torch"] and "git_sha" in config["meta"]

    # MLflow (SQLite store): the same series, the config as params, the metadata as tags
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    for key in ("loss", "wire_bytes_fwd"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert history == pytest.approx({s: r[key] for s, r in logged.items()}), key
    run = client.get_run(run_id)
    assert run.data.params["model.hidden_size"] == "64" and run.info.status == "FINISHED"
    assert run.data.tags["deepspeed"] and "resbm_ds" in run.data.tags

    # TensorBoard: one lr series, on the step axis
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [t for t in acc.Tags()["scalars"] if "lr" in t.lower().split("/")[-1]] == ["resbm/lr"]
    assert {e.step: e.value for e in acc.Scalars("resbm/loss")} == pytest.approx(
        {s: r["loss"] for s, r in logged.items()})


def test_deepspeed_monitors_are_refused_with_the_tracker_to_use(tmp_path):
    line = error_line(train1(tmp_path / "x", "deepspeed.wandb.enabled=true", check=False))
    assert "deepspeed.wandb.enabled" in line and "tracking.wandb=true" in line


# ---- a stop signal saves, --resume continues ----------------------------------------------------

def test_sigterm_saves_a_checkpoint_and_resume_continues_at_the_next_step(tmp_path):
    out = tmp_path / "stopped"
    args = ["train.steps=200", "train.save_every=1000", "train.eval_every=1000"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", *train_args(out, *args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(rows(out)) >= 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)          # torchrun passes it on to both ranks
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped = max(r["step"] for r in rows(out) if "loss" in r)
    assert 3 <= stopped < 200
    assert f"stopped by SIGTERM after step {stopped}: checkpoint step{stopped} saved" in output, output[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == f"step{stopped}"

    proc = launch(["-m", *train_args(out, *args[1:], f"train.steps={stopped + 2}"), "--resume"], 2)
    assert f"resuming at step {stopped + 1}" in proc.stdout
    assert "train.steps 200 -> " in proc.stdout and "the cosine schedule now ends" in proc.stdout
    assert [r["step"] for r in rows(out) if "loss" in r] == list(range(1, stopped + 3))


# ---- resume guards and the run directory --------------------------------------------------------

@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("guards") / "run"
    train1(out, "train.steps=4", "train.save_every=1", "train.keep_last=2", "train.eval_every=100")
    return out


def test_keep_last_keeps_the_newest_checkpoints(one_run):
    assert sorted(p.name for p in (one_run / "checkpoints").iterdir() if p.is_dir()) == ["step3", "step4"]


def test_the_run_directory_is_never_silently_reused(one_run, tmp_path):
    line = error_line(train1(one_run, "train.steps=4", check=False))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    line = error_line(train1(one_run, "--resume-from", "step1", check=False))
    assert "step1: no such checkpoint" in line and "['step3', 'step4']" in line

    copy = tmp_path / "nolatest"
    shutil.copytree(one_run, copy)
    (copy / "checkpoints" / "latest").unlink()
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    line = error_line(train1(copy, "train.steps=4", "train.save_every=1", "train.keep_last=2",
                             "train.eval_every=100", "--resume", check=False))
    assert "is missing, but" in line and "['step3', 'step4']" in line and "--resume-from TAG" in line
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before      # nothing touched

    proc = train1(copy, "train.steps=5", "train.save_every=1", "train.keep_last=2", "train.eval_every=100",
                  "--resume-from", "step3")
    assert "resuming at step 4" in proc.stdout
    assert [r["step"] for r in rows(copy) if "loss" in r] == [1, 2, 3, 4, 5]

    proc = train1(copy, "train.steps=2", "train.eval_every=100", "--overwrite")
    assert [r["step"] for r in rows(copy) if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir() if p.is_dir()) == ["step2"]


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(one_run, tmp_path):
    import torch
    copy = tmp_path / "crafted"
    shutil.copytree(one_run, copy)
    marker = tmp_path / "code-ran"
    states = copy / "checkpoints" / "step4" / "mp_rank_00_model_states.pt"
    torch.save({"module": None, "payload": RunsCode(marker)}, states)
    # forge the manifest too: past the integrity check (test_faults.py), the weights-only loader refuses it
    from resbm_ds.checkpoints.store import write_manifest
    write_manifest(states.parent)
    proc = train1(copy, "train.steps=6", "train.save_every=1", "train.keep_last=2", "train.eval_every=100",
                  "--resume", check=False)
    assert proc.returncode != 0 and not marker.exists()
    line = error_line(proc)
    assert "refusing to load" in line and "mp_rank_00_model_states.pt" in line, line


# ---- weights only, from another layout ----------------------------------------------------------

def test_init_from_a_two_stage_checkpoint_into_one_process_gives_its_eval_loss(tmp_path):
    src = tmp_path / "two_stage"
    launch(["-m", *train_args(src, "train.steps=4", "train.eval_every=4")], 2)
    want = next(r["val_loss"] for r in rows(src) if "val_loss" in r)
    dst = tmp_path / "one_process"
    proc = subprocess.run([sys.executable, "-m", *train_args(dst, "pipeline.stages=1", "train.steps=1",
                                                              "train.eval_every=100", f"train.init_from={src}")],
                          cwd=REPO, text=True, capture_output=True, timeout=300,
                          env={**ENV, "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"weights from train.init_from={src}" in proc.stdout
    got = next(r["val_loss"] for r in rows(dst) if "val_loss" in r and r["step"] == 0)
    assert got == pytest.approx(want, rel=1e-5), (got, want)

    line = error_line(train1(tmp_path / "other", "model.hidden_size=128", f"train.init_from={src}", check=False))
    assert "its network differs" in line and "model.hidden_size 64 -> 128" in line


# ---- the CLI --------------------------------------------------------------------------------------

def test_print_config_dry_run_console_script_and_the_no_launcher_hint(tmp_path):
    printed = train1(tmp_path / "p", "--print-config")
    assert "hidden_size: 64" in printed.stdout and not (tmp_path / "p").exists()
    dry = train1(tmp_path / "d", "--dry-run")
    assert "[resbm] plan: 1 stages x 1 data-parallel" in dry.stdout and "nothing was started" in dry.stdout
    assert not (tmp_path / "d").exists()
    script = shutil.which("resbm-train", path=os.path.dirname(sys.executable))
    assert script, "console script resbm-train is not installed (pip install -e .)"
    same = subprocess.run([script, "--config", "cpu-demo", *TINY, *ONE, f"train.out_dir={tmp_path / 'p'}",
                           "--print-config"], capture_output=True, text=True, env=ENV, timeout=120)
    assert same.returncode == 0 and same.stdout == printed.stdout
    bare = subprocess.run([sys.executable, "-m", "resbm_ds.train", "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, env=ENV, timeout=120)
    line = error_line(bare)
    assert "must divide the world size (1 processes)" in line and "pipeline.stages=1" in line and "torchrun" in line


def test_a_log_file_gets_plain_lines_not_progress_bars(tmp_path):
    proc = train1(tmp_path / "plain", "train.steps=6", "train.log_every=2", "train.eval_every=100")
    assert "\r" not in proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[resbm] step ")]
    assert [ln.split()[2] for ln in lines if " loss " in ln] == ["2/6", "4/6", "6/6"], lines
    assert all(len(ln) < 300 for ln in lines)


def test_a_compute_node_without_the_corpus_is_told_to_prefetch(tmp_path):
    """No cached corpus and no npm on PATH (a compute node without registry access): one line that
    names the login-node step, before anything starts."""
    env = {**ENV, "RESBM_CACHE": str(tmp_path / "empty-cache"), "PATH": os.path.dirname(sys.executable)}
    proc = subprocess.run([sys.executable, "-m", "resbm_ds.train", "--config", "cpu-demo", *TINY, *ONE,
                           f"train.out_dir={tmp_path / 'x'}", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    line = error_line(proc)
    assert "the default corpus is not in" in line and "launchers/setup.sh --prefetch" in line, line
