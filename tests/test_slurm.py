"""The slurm/*.sbatch templates on a real (local) Slurm cluster: 2 emulated nodes x 2 ranks.

The module starts the cluster once (slurm/cluster/start.sh through tests/slurm_cluster.py) and
always stops it, also when a test fails. Each CPU template is submitted with sbatch as a user
would: the job must complete on both nodes with one pipeline stage per node, the metrics must
show the compressed wire bytes of the formula, and a second submission with --resume must
continue from the first one's checkpoint. The fail-fast tests kill a rank / point the ranks at a
rendezvous that does not answer: the job must end with "resbm: rank failure, job aborted" and a
non-zero state, long before its time limit.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from conftest import REPO
from slurm_cluster import cluster_available, job_info, job_output, local_cluster, wait_job

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

SLURM_DIR = REPO / "slurm"
CPU_TEMPLATES = ["cpu_srun", "cpu_torchrun", "cpu_deepspeed"]
GPU_TEMPLATES = ["gpu_srun", "gpu_torchrun", "gpu_deepspeed"]
NODES, PER_NODE = 2, 2                   # 2 nodes x 2 ranks: 2 stages x 2 data-parallel
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.max_seq_len=64",
        "data.seq_len=64", "bottleneck.ratio=16", "deepspeed.train_micro_batch_size_per_gpu=2",
        "deepspeed.gradient_accumulation_steps=2", "deepspeed.zero_optimization.stage=1",
        "train.warmup_steps=2", "train.eval_batches=2", "train.eval_every=100"]
MB, GAS, T, H, h, FP32 = 2, 2, 64, 64, 4, 4
TIME_LIMIT_MIN = 5
JOB_TIMEOUT = 420                        # seconds the test waits for one job (2 busy cores)

needs_cluster = pytest.mark.skipif(
    not cluster_available(), reason="the local Slurm cluster needs root and Slurm or apt-get")


@pytest.fixture(scope="module")
def slurm():
    with local_cluster(nodes=NODES, cpus_per_node=4) as cluster:
        yield cluster


def _job_env(run_dir: Path, **extra) -> dict:
    env = {"RESBM_RUN_DIR": str(run_dir), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    if (Path(sys.prefix) / "bin" / "activate").exists():   # the venv running the tests
        env["RESBM_VENV"] = sys.prefix
    env.update(extra)
    return env


def sbatch(script: Path, sbatch_args, script_args, env) -> int:
    """`sbatch --parsable SBATCH_ARGS SCRIPT SCRIPT_ARGS` (slurm_cluster.submit takes no script
    arguments); returns the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(script), *script_args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
    return int(proc.stdout.strip().splitlines()[-1].split(";")[0])


def run_template(template: str, tmp_path: Path, run_dir: Path, args, *, name: str,
                 sbatch_args=(), env=None, wait=True):
    """sbatch slurm/TEMPLATE.sbatch --config cpu-demo TINY ARGS; returns (job id, info, output)."""
    sbatch_args = [f"--job-name={name}", f"--time={TIME_LIMIT_MIN}", f"--chdir={tmp_path}",
                   f"--output={tmp_path}/{name}-%j.out", *sbatch_args]
    job = sbatch(SLURM_DIR / f"{template}.sbatch", sbatch_args, ["--config", "cpu-demo", *TINY, *args],
                 env=_job_env(run_dir, **(env or {})))
    if not wait:
        return job, None, None
    info = wait_job(job, timeout=JOB_TIMEOUT)
    return job, info, job_output(info)


def metric_rows(run_dir: Path):
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r]


def placement(output: str) -> dict:
    """rank -> (node, stage, dp) from the "[resbm] rank R node N stage S dp D" lines."""
    found = re.findall(r"^\[resbm\] rank (\d+) node (\S+) stage (\d+) dp (\d+)$", output, re.M)
    return {int(r): (n, int(s), int(d)) for r, n, s, d in found}


def check_completed_on_two_nodes(info, output):
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", output[-6000:]
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == str(NODES), info
    assert int(info["NumTasks"]) == NODES * PER_NODE, info
    ranks = placement(output)
    assert sorted(ranks) == list(range(NODES * PER_NODE)), output[-6000:]
    # block placement, rank = stage * dp + dp_id: node n1 holds stage 0, node n2 stage 1
    for rank, (node, stage, dp) in ranks.items():
        assert (node, stage, dp) == (f"n{rank // PER_NODE + 1}", rank // PER_NODE, rank % PER_NODE), ranks
    stages_per_node = {}
    for node, stage, _ in ranks.values():
        stages_per_node.setdefault(node, set()).add(stage)
    assert stages_per_node == {"n1": {0}, "n2": {1}}
    assert re.search(r"^resbm: layout: .*one pipeline stage per node", output, re.M), output[:3000]
    assert re.search(r"^\[resbm\] layout: n1: stage 0 \(ranks 0-1\); n2: stage 1 \(ranks 2-3\) -> "
                     r"one pipeline stage per node", output, re.M), output[-6000:]
    assert "resbm: job finished OK" in output


def check_wire_bytes(rows):
    """fp32 code of width h per token (the default reads the token ids on each stage), MB x GAS
    micro-batches, one boundary per pipeline, 2 pipelines."""
    per_pipeline = GAS * MB * T * h * FP32
    boundaries = (NODES - 1) * PER_NODE
    steps = [r for r in rows if "loss" in r]
    assert steps
    for r in steps:
        assert r["wire_bytes_fwd"] == per_pipeline * boundaries, r
        assert r["wire_bytes_bwd"] == per_pipeline * boundaries, r
        assert r["wire_bytes_per_boundary"] == 2 * per_pipeline, r


# ---- no cluster needed --------------------------------------------------------------------------

@pytest.mark.parametrize("template", CPU_TEMPLATES + GPU_TEMPLATES)
def test_template_is_valid_bash_and_documented(template):
    path = SLURM_DIR / f"{template}.sbatch"
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    header = text.split("\n#SBATCH", 1)[0]
    for needle in ("sbatch slurm/", "Placement:", "Edit:", "Assumes:", "Fail fast:", "RESBM_RUN_DIR"):
        assert needle in header, (template, needle)
    assert re.search(r"^#SBATCH --time=", text, re.M) and re.search(r"^#SBATCH --nodes=", text, re.M)
    device, pattern = template.split("_")
    assert f'resbm_setup {device} "$@"' in text and f"resbm_launch {pattern}" in text
    if device == "gpu":
        assert re.search(r"^#SBATCH --gpus-per-node=", text, re.M)


def test_gpu_and_cpu_templates_share_their_body():
    def body(name):
        text = (SLURM_DIR / f"{name}.sbatch").read_text()
        return text[text.index("set -uo pipefail"):].replace("resbm_setup gpu", "resbm_setup cpu")
    for pattern in ("srun", "torchrun", "deepspeed"):
        assert body(f"gpu_{pattern}") == body(f"cpu_{pattern}")


def test_layout_check_flags_nodes_with_several_stages():
    from resbm_ds.slurm_layout import layout_problems
    summary, problems = layout_problems([(0, "n1", 0), (1, "n1", 0), (2, "n2", 1), (3, "n2", 1)])
    assert summary == "n1: stage 0 (ranks 0-1); n2: stage 1 (ranks 2-3)" and problems == []
    _, problems = layout_problems([(0, "n1", 0), (1, "n1", 1), (2, "n2", 2), (3, "n2", 3)])
    assert problems == ["node n1 holds 2 pipeline stages (0, 1), not one stage per node",
                        "node n2 holds 2 pipeline stages (2, 3), not one stage per node"]
    _, problems = layout_problems([(0, "n1", 0), (1, "n2", 0), (2, "n1", 1), (3, "n2", 1)])
    assert len(problems) == 4 and "stage 0 spans nodes n1, n2" in problems[2]
    assert layout_problems([(0, "vm", 0), (1, "vm", 1)])[1] == []    # one node: nothing to say


# ---- on the local cluster ------------------------------------------------------------------------

@needs_cluster
def test_each_cpu_template_trains_on_two_nodes_and_the_next_resumes(slurm, tmp_path):
    """cpu_srun trains 3 steps from scratch; cpu_torchrun is submitted with --resume and goes on
    to step 5, cpu_deepspeed with --resume to step 7: every template runs a real 2-node job, and
    every --resume submission continues from the previous job's checkpoint."""
    run_dir = tmp_path / "run"
    plan = [("cpu_srun", 3, []), ("cpu_torchrun", 5, ["--resume"]), ("cpu_deepspeed", 7, ["--resume"])]
    done = 0
    kept: list = []
    for template, steps, extra in plan:
        _, info, out = run_template(template, tmp_path, run_dir,
                                    [f"train.steps={steps}", f"train.save_every={steps}", *extra],
                                    name=template)
        where = f"{template} (job output {info.get('StdOut')})"
        check_completed_on_two_nodes(info, out)
        assert f"resbm: launch ({template.split('_')[1]}):" in out, where
        assert ("from scratch" if not done else f"resuming at step {done + 1}") in out, (where, out[-5000:])
        assert f"-> {4 * H / (4 * h):.1f}x fewer than a dense fp32 boundary" in out, where   # dense / measured
        rows = metric_rows(run_dir)
        check_wire_bytes(rows)
        step_rows = [r for r in rows if "loss" in r]
        assert [r["step"] for r in step_rows] == list(range(1, steps + 1)), where   # none redone or lost
        assert step_rows[:done] == kept, where                          # earlier jobs' rows are kept
        assert (run_dir / "checkpoints" / "latest").read_text() == f"step{steps}", where
        done, kept = steps, step_rows
    logs = {p.name for p in (run_dir / "logs").iterdir()}
    assert len([n for n in logs if n.startswith("step-")]) == 3 and any(n.startswith("slurm-") for n in logs), logs
    assert any(n.startswith("hostfile-") for n in logs), logs           # cpu_deepspeed's hostfile


# The job's verdict on SIGTERM (slurm/lib/resbm_job.sh): the trainer's own stop line when it reached
# the job's log, else what the run directory holds (srun stops relaying output once signalled, so
# which of the two a job prints depends on timing).
STOP_LINE = re.compile(r"^resbm: (?:job stopped by SIGTERM from Slurm .*, checkpoints/latest: step(\d+);"
                       r"|stopped by SIGTERM after step (\d+): checkpoint step\2 saved)", re.M)


def stopped_at(out: str) -> int | None:
    """The step a job stopped by SIGTERM saved, from its verdict line; None without one."""
    m = STOP_LINE.search(out)
    return int(m.group(1) or m.group(2)) if m else None


def resbm_lines(out: str) -> str:
    return "\n".join(line for line in out.splitlines() if line.startswith(("resbm:", "[resbm] stop")))


@needs_cluster
def test_requeued_job_resumes_by_itself(slurm, tmp_path):
    """Preemption with requeue: `scontrol requeue` stops the running job and queues it again
    under the same id; the restarted script sees SLURM_RESTART_COUNT=1 and adds --resume."""
    run_dir = tmp_path / "run"
    steps, every = 24, 3
    job, _, _ = run_template("cpu_srun", tmp_path, run_dir, [f"train.steps={steps}", f"train.save_every={every}"],
                             name="requeue", wait=False)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not latest.exists():
        assert time.monotonic() < deadline, "no checkpoint before the deadline"
        assert job_info(job)["JobState"].split()[0] in ("PENDING", "RUNNING"), job_info(job)
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", str(job)], check=True, capture_output=True, timeout=30)
    while job_info(job)["JobState"].split()[0] != "RUNNING":   # skip Slurm's requeue delay
        assert time.monotonic() < deadline, job_info(job)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=30)
        time.sleep(0.5)
    info = wait_job(job, timeout=JOB_TIMEOUT)
    out = job_output(info)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out[-5000:])
    stopped = stopped_at(out)
    assert stopped, resbm_lines(out)                # the preempted job saved first ...
    assert "resbm: requeued job (restart 1): adding --resume" in out, out[-5000:]
    resumed_at = int(re.search(r"resuming at step (\d+)", out).group(1))
    assert resumed_at == stopped + 1 and resumed_at < steps, resumed_at   # ... so none is lost
    step_rows = [r for r in metric_rows(run_dir) if "loss" in r]
    assert [r["step"] for r in step_rows] == list(range(1, steps + 1))
    check_wire_bytes(step_rows)


@needs_cluster
def test_scancel_saves_and_resume_loses_no_step(slurm, tmp_path):
    """scancel mid-run: every rank saves at its current step; a resubmission with --resume continues
    at the next one."""
    run_dir = tmp_path / "run"
    job, _, _ = run_template("cpu_srun", tmp_path, run_dir, ["train.steps=400", "train.save_every=1000"],
                             name="cancel", wait=False)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not ((run_dir / "metrics.jsonl").exists() and len(metric_rows(run_dir)) >= 3):
        assert time.monotonic() < deadline, "no progress before the deadline"
        assert job_info(job)["JobState"].split()[0] in ("PENDING", "RUNNING"), job_info(job)
        time.sleep(0.1)
    subprocess.run(["scancel", str(job)], check=True, capture_output=True, timeout=30)
    info = wait_job(job, timeout=JOB_TIMEOUT)
    out = job_output(info)
    stopped = stopped_at(out)
    assert stopped and info["JobState"] == "CANCELLED", (info["JobState"], resbm_lines(out))
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{stopped}"
    assert max(r["step"] for r in metric_rows(run_dir) if "loss" in r) == stopped
    _, info, out = run_template("cpu_srun", tmp_path, run_dir,
                                [f"train.steps={stopped + 2}", "train.save_every=1000", "--resume"], name="cancel2")
    assert info["JobState"] == "COMPLETED", out[-6000:]
    assert f"resuming at step {stopped + 1}" in out, out[-6000:]
    assert [r["step"] for r in metric_rows(run_dir) if "loss" in r] == list(range(1, stopped + 3))


def _end_time(info) -> float:
    return datetime.strptime(info["EndTime"], "%Y-%m-%dT%H:%M:%S").timestamp()


def _runtime_s(info) -> int:
    parts = [int(x) for x in re.split(r"[-:]", info["RunTime"])]
    while len(parts) < 4:
        parts.insert(0, 0)
    d, hh, mm, ss = parts
    return ((d * 24 + hh) * 60 + mm) * 60 + ss


@needs_cluster
def test_killed_rank_ends_the_job_with_a_clear_message(slurm, tmp_path):
    """Rank 1 (node n1) SIGKILLs itself after the first step; srun must end the other three."""
    run_dir = tmp_path / "run"
    _, info, out = run_template(
        "cpu_srun", tmp_path, run_dir, ["train.steps=400", "train.save_every=400"], name="victim",
        env={"RESBM_ENTRY": "slurm_victim", "PYTHONPATH": str(REPO / "tests" / "workers"),
             "RESBM_TEST_KILL_RANK": "1"})
    assert "[victim] rank 1 on n1 kills itself" in out, out[-6000:]
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert re.search(r"^resbm: rank failure, job aborted: rank 1 on node n1: killed by a signal", out, re.M), \
        out[-4000:]
    killed_at = (run_dir / "metrics.jsonl").stat().st_mtime        # the victim acts on the first row
    assert _end_time(info) - killed_at < 45, (info["EndTime"], killed_at)
    assert _runtime_s(info) < TIME_LIMIT_MIN * 60 / 2, info["RunTime"]
    assert len([r for r in metric_rows(run_dir) if "loss" in r]) < 400


@needs_cluster
def test_unreachable_rendezvous_ends_the_job(slurm, tmp_path):
    """Every rank waits for a rendezvous host that never answers: torchrun gives up after
    RESBM_DIST_TIMEOUT seconds and srun ends the job (192.0.2.1 is TEST-NET-1, never routed)."""
    _, info, out = run_template(
        "cpu_torchrun", tmp_path, tmp_path / "run", ["train.steps=3"], name="nordzv",
        env={"RESBM_MASTER_ADDR": "192.0.2.1", "RESBM_DIST_TIMEOUT": "10"})
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert re.search(r"^resbm: rank failure, job aborted: .*(192\.0\.2\.1|rendezvous|connect)", out, re.M), \
        out[-4000:]
    assert _runtime_s(info) < TIME_LIMIT_MIN * 60 / 2, info["RunTime"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@needs_cluster
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has GPUs")
@pytest.mark.parametrize("template", GPU_TEMPLATES)
def test_gpu_template_without_gpus_stops_before_launch(slurm, tmp_path, template):
    t0 = time.time()
    _, info, out = run_template(template, tmp_path, tmp_path / "run", ["train.steps=3"], name=template,
                                sbatch_args=["--gpus-per-node=0", f"--ntasks-per-node={PER_NODE}",
                                             "--cpus-per-task=1"])
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert "resbm: ERROR: this is a GPU template but no GPU is visible on n1" in out, out
    assert "resbm: job aborted before launch" in out and "[resbm] rank" not in out
    assert time.time() - t0 < 60
