"""Data parallelism across sites (resbm_ds/sync.py): two sites are two real launches (one torchrun
each, one process per site, pipeline.stages=1) on 127.0.0.1, each with its own master port, joined
by the sync port. Checked: DiLoCo at H=1, outer lr 1, no momentum is synchronous data parallelism;
sites hold equal parameters after every outer step; the bytes between sites follow each method's
formula; an interrupted and resumed run repeats the uninterrupted losses; a site that dies ends the
others in one line with their last checkpoint intact."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, free_port, launch
from resbm_ds.cli import ConfigError
from resbm_ds.config import load_config
from resbm_ds.checkpoints.store import verify, write_manifest
from resbm_ds.run_dir import RunDirError, plan_run
from resbm_ds.sync import decode_sparse, encode_sparse, sparse_payload_bytes

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.max_seq_len=64",
        "data.seq_len=64", "bottleneck.ratio=16", "deepspeed.train_micro_batch_size_per_gpu=2",
        "deepspeed.gradient_accumulation_steps=2", "train.warmup_steps=2", "train.eval_batches=2",
        "train.eval_every=1000", "pipeline.stages=1", "train.min_lr_ratio=1.0"]   # lr independent of train.steps
PARAMS = 893_828          # the trainable parameters of TINY's model (its checkpoint's layer files)


def args(out, *extra):
    return ["-m", "resbm_ds.train", "--config", "cpu-demo", f"train.out_dir={out}", *TINY, *extra]


def run_sites(tmp_path, name, extra, sites=2, resume=False, timeout=400, nprocs=1):
    """Start `sites` sites of `nprocs` processes at once; wait for all; [(stdout, stderr)] by site."""
    sync_port = free_port()
    procs = []
    for s in range(sites):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}", f"--master_port={free_port()}",
               *args(tmp_path / f"{name}{s}", *extra, "sync.sites=2", f"sync.site_rank={s}",
                     f"sync.master_port={sync_port}"), *(["--resume"] if resume else [])]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, done):
        assert p.returncode == 0, f"{p.args}\n{out[-3000:]}\n{err[-5000:]}"
    return done


def steps(out: Path) -> dict[int, dict]:
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if r]
    return {r["step"]: r for r in rows if "loss" in r}


def weights(out: Path, tag: str) -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted((out / "checkpoints" / tag).glob("layer_*-model_states.pt")):
        found.update({f"{f.name[:8]}.{k}": v for k, v in torch.load(f, weights_only=True).items()})
    return found


def sparse_bytes(n, chunk, topk, bits):
    """Independent of sync.py: per chunk two fp32 scales and topk uint16 indices, the values packed."""
    chunks = (n + chunk - 1) // chunk
    return chunks * (8 + 2 * topk) + (chunks * topk * bits + 7) // 8


# ---- without processes ---------------------------------------------------------------------------

@pytest.mark.parametrize("n,chunk,topk,bits", [(10_000, 4096, 64, 2), (100, 64, 32, 8), (5000, 1000, 7, 4)])
def test_sparse_message_keeps_the_top_k_with_its_signs_in_the_formula_bytes(n, chunk, topk, bits):
    torch.manual_seed(0)
    v = torch.randn(n)
    msg = encode_sparse(v, chunk, topk, bits)
    assert msg.dtype == torch.uint8 and msg.numel() == sparse_payload_bytes(n, chunk, topk, bits) == \
        sparse_bytes(n, chunk, topk, bits)
    d = decode_sparse(msg, n, chunk, topk, bits)
    kept = d != 0
    padded = torch.nn.functional.pad(v, (0, -n % chunk)).view(-1, chunk)
    expected = torch.zeros_like(padded).scatter_(1, padded.abs().topk(topk, 1).indices, 1).reshape(-1)[:n].bool()
    assert torch.equal(kept, expected)
    assert torch.equal(d[kept].sign(), v[kept].sign())
    # the largest and smallest kept magnitude of each chunk cross exactly (fp32 scales)
    assert torch.isclose(d.abs().max(), v.abs().max())


@pytest.mark.parametrize("overrides,message", [
    (["sync.sites=2"], "sync.method='allreduce': allreduce is one site; with sync.sites=2 use diloco or sparseloco"),
    (["sync.method=diloco", "sync.sites=2", "sync.site_rank=2"], "sync.site_rank=2: must be in [0, sync.sites=2)"),
    (["sync.method=sparseloco", "sync.topk=100", "sync.chunk=64"], "sync.topk=100: must be <= sync.chunk (64)"),
    (["sync.method=sparseloco", "sync.bits=3"], "sync.bits=3: allowed: [2, 4, 8]"),
    (["sync.method=diloco", "sync.outer_momentum=1.0"], "sync.outer_momentum=1.0: must be in [0, 1)"),
    (["sync.method=gossip"], "sync.method='gossip': allowed: ['allreduce', 'diloco', 'sparseloco']"),
])
def test_bad_sync_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("cpu-demo", overrides).validate()
    assert message in str(e.value)


def test_a_run_from_before_sync_resumes_as_one_site(tmp_path):
    """Its config.yaml has no sync section: it was one site (allreduce), not a changed config."""
    cfg = load_config("cpu-demo", [f"train.out_dir={tmp_path}"]).validate()
    saved = cfg.to_dict()
    del saved["sync"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    tag = tmp_path / "checkpoints" / "step1"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    write_manifest(tag)
    (tmp_path / "checkpoints" / "latest").write_text("step1")
    assert plan_run(cfg, True, None, False).resume_tag == "step1"
    changed = load_config("cpu-demo", [f"train.out_dir={tmp_path}", "sync.method=diloco"]).validate()
    with pytest.raises(RunDirError, match="sync.method 'allreduce' -> 'diloco'"):
        plan_run(changed, True, None, False)


# ---- two sites on real processes -------------------------------------------------------------------

def test_diloco_at_h1_lr1_without_momentum_is_synchronous_data_parallelism(tmp_path):
    common = ["train.steps=4", "train.optimizer=sgd", "train.lr=0.5", "deepspeed.gradient_clipping=0.0",
              "train.save_every=4"]
    launch(args(tmp_path / "dp", *common), 2)    # one site, 2 data-parallel ranks, gradients all-reduced
    run_sites(tmp_path, "site", [*common, "sync.method=diloco", "sync.inner_steps=1", "sync.outer_lr=1.0",
                                 "sync.outer_momentum=0.0"])
    dp, sites = steps(tmp_path / "dp"), [steps(tmp_path / f"site{s}") for s in range(2)]
    for step in range(1, 5):   # DeepSpeed reports the mean loss of the data-parallel ranks
        assert (sites[0][step]["loss"] + sites[1][step]["loss"]) / 2 == pytest.approx(dp[step]["loss"], rel=1e-5)
    ref, a, b = (weights(tmp_path / name, "step4") for name in ("dp", "site0", "site1"))
    assert len(ref) > 10 and ref.keys() == a.keys() == b.keys()
    for k in ref:
        assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(a[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method,extra", [
    ("diloco", []),                                               # outer lr 0.7, Nesterov momentum 0.9
    ("sparseloco", ["sync.chunk=4096", "sync.topk=64", "sync.bits=2"]),
])
def test_sites_stay_equal_count_their_bytes_and_resume_exactly(tmp_path, method, extra):
    """H=3 over 8 steps: outer steps at 3 and 6. The interrupted run stops at step 4, between outer
    steps (theta_start, momentum and error feedback live only in the checkpoint), and resumes."""
    common = [f"sync.method={method}", "sync.inner_steps=3", *extra]
    run_sites(tmp_path, "ref", [*common, "train.steps=8", "train.save_every=1"])
    ref = [steps(tmp_path / f"ref{s}") for s in range(2)]

    for step in range(1, 9):
        a, b = weights(tmp_path / "ref0", f"step{step}"), weights(tmp_path / "ref1", f"step{step}")
        equal = all(torch.equal(a[k], b[k]) for k in a)
        assert equal == (step % 3 == 0), f"step {step}: sites {'differ' if step % 3 == 0 else 'agree'}"

    per_sync = 4 * PARAMS if method == "diloco" else sparse_bytes(PARAMS, 4096, 64, 2)
    handshake = 5 * 8
    for site in ref:
        sent = {s: r["wire_bytes_sites"] for s, r in site.items()}
        assert sent == {1: handshake, 2: 0, 3: per_sync, 4: 0, 5: 0, 6: per_sync, 7: 0, 8: 0}, sent

    run_sites(tmp_path, "cut", [*common, "train.steps=4", "train.save_every=4"])
    run_sites(tmp_path, "cut", [*common, "train.steps=8", "train.save_every=4"], resume=True)
    for s in range(2):
        resumed = steps(tmp_path / f"cut{s}")
        assert sorted(resumed) == list(range(1, 9))
        assert [resumed[k]["loss"] for k in range(1, 9)] == [ref[s][k]["loss"] for k in range(1, 9)]


@pytest.mark.parametrize("layout", [["pipeline.stages=2"], ["deepspeed.zero_optimization.stage=1"]],
                         ids=["2-stage-pipelines", "zero1-2-replicas"])
def test_sites_of_two_processes_stay_equal_and_the_outer_step_reaches_zero_masters(tmp_path, layout):
    """Each site 2 processes: a 2-stage ResBM pipeline (each stage its own group between sites), or
    2 ZeRO-1 replicas (each syncs half of the parameters, then they all-gather inside the site, and
    the new weights reach ZeRO's fp32 master partitions, or the next inner step would undo them)."""
    run_sites(tmp_path, "s", [*layout, "sync.method=diloco", "sync.inner_steps=2", "train.steps=3",
                              "train.save_every=1"], nprocs=2)
    for step in (1, 2, 3):
        a, b = weights(tmp_path / "s0", f"step{step}"), weights(tmp_path / "s1", f"step{step}")
        assert len(a) > 10 and all(torch.equal(a[k], b[k]) for k in a) == (step == 2), step
    for s in range(2):
        assert steps(tmp_path / f"s{s}")[2]["wire_bytes_sites"] == 4 * PARAMS   # both halves, once
    if "pipeline.stages=2" in layout:
        return
    masters, w = 0, weights(tmp_path / "s0", "step2")
    for rank in range(2):
        state = torch.load(tmp_path / "s0" / "checkpoints" / "step2" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                           weights_only=False)["optimizer_state_dict"]
        for flat, where in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, frag in where.items():    # parameters held whole by this rank's partition
                layer, key = name.split(".", 1)
                full = w[f"layer_{int(layer):02d}.{key}"]
                if frag.numel == full.numel():
                    assert torch.equal(flat[frag.start:frag.start + frag.numel].detach(), full.reshape(-1)), name
                    masters += 1
    assert masters > 10


def test_a_site_that_dies_ends_the_others_in_one_line_with_the_checkpoint_intact(tmp_path):
    sync_port = free_port()
    procs = []
    for s in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={free_port()}",
               "--max-restarts=0", *args(tmp_path / f"site{s}", "train.steps=500", "train.save_every=2",
                                         "sync.method=diloco", "sync.inner_steps=2", "sync.sites=2",
                                         f"sync.site_rank={s}", f"sync.master_port={sync_port}")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    out1 = tmp_path / "site1"
    deadline = time.time() + 300
    while time.time() < deadline and not ((out1 / "metrics.jsonl").exists() and len(steps(out1)) >= 3):
        time.sleep(0.2)
    os.killpg(procs[1].pid, 9)      # the whole of site 1: its launcher and its rank
    procs[1].wait()
    killed_at = time.time()
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0 and time.time() - killed_at < 60
    lines = [ln for ln in err.splitlines() if "another site left the outer sync" in ln]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error (rank 0): site 0 of 2: another site left the outer sync or stopped answering")
    ckpts = tmp_path / "site0" / "checkpoints"
    latest = (ckpts / "latest").read_text()
    verify(ckpts / latest)
    assert (ckpts / latest / "outer_state_stage00_dp000.pt").exists()
