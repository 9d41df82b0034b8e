"""A real network between nodes (resbm_ds/netem.py): 2 network namespaces joined by a tbf-shaped veth
link, and 2-stage trainings across them with the real launchers (one per node: `deepspeed --no_ssh
--node_rank K` for the ResBM run, `torchrun --nnodes 2 --node_rank K` for the uncompressed one), then
the kernel's byte counters against the wire meter, tokens/s against the link bound, and teardown.

Needs root, iproute2 and the kernel's tbf qdisc; elsewhere every test here is skipped with the reason.

Measured on the 2-core CI box (shared), bench-smoke model (H=64, 2 micro-batches x 2 x 64 tokens
= 256 tokens per step), 2 Mbit/s link:
  * kernel bytes less 66 B of Ethernet/IP/TCP header per packet = the meter's bytes (forward +
    backward + collectives between stages) + 1.0-1.5 KB per step: gloo's framing of each message
    (more messages, as with ResBM's code + token ids, cost more). Allowed: 0..FRAMING_MAX for the
    median step; single steps may carry a TCP retransmission on a loaded machine.
  * the uncompressed run moves 13x the ResBM-16x run's bytes above TCP (15x at the meter, whose
    forward includes the 2-byte token ids; H/h = 16): the framing is the same per step for both.
  * uncompressed tokens/s = 0.94-1.0x the half-duplex link bound (tokens per step / (forward +
    backward bytes x 8 / rate)): DeepSpeed's blocking 1F1B p2p rarely has both directions of the
    full-duplex link busy at once.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from resbm_ds import netem

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

RATE, RATE_BPS = "2mbit", 2e6
STEPS = 8
FRAMING_MAX = 2048              # bytes per step above the meter's, measured 1.0-1.5 KB
H, RATIO = 64, 16               # bench-smoke's hidden size; ResBM h = H / 16 = 4


def _support() -> str:
    try:
        netem.check_support()
    except netem.NetemError as e:
        return str(e)
    return ""


WHY_NOT = _support()
needs_net = pytest.mark.skipif(bool(WHY_NOT), reason=f"no real network here: {WHY_NOT}")


def _train(cluster, out, launcher, overrides):
    logs = [open(out.parent / f"{out.name}.node{k}.log", "w") for k in range(cluster.nodes)]
    args = ["-m", "resbm_ds.train", "--config", "bench-smoke", f"train.out_dir={out}",
            f"train.steps={STEPS}", "train.log_every=1", f"train.eval_every={STEPS}", *overrides]
    t0 = time.perf_counter()
    rc = netem.launch(cluster, args, logs, env={**os.environ, "PYTHONPATH": str(REPO)}, launcher=launcher,
                      timeout_s=300, cwd=REPO)
    for f in logs:
        f.close()
    logs_text = "\n".join((out.parent / f"{out.name}.node{k}.log").read_text()[-3000:] for k in range(cluster.nodes))
    rows = []
    if (out / "metrics.jsonl").exists():
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if r.strip()]
    return dict(rc=rc, rows=[r for r in rows if "loss" in r], log=logs_text, wall_s=time.perf_counter() - t0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both trainings on one 2-node cluster; the cluster is torn down in `finally`, whatever happened,
    and what is left of it afterwards is part of the result."""
    if WHY_NOT:
        pytest.skip(f"no real network here: {WHY_NOT}")
    tmp = tmp_path_factory.mktemp("netem")
    cluster = netem.Cluster(2, [RATE], cluster_id=f"t{os.getpid()}")
    result = {"id": cluster.cluster_id}
    try:
        cluster.up()
        result["resbm"] = _train(cluster, tmp / "resbm", "deepspeed",
                                 ["bottleneck.method=resbm", f"bottleneck.ratio={RATIO}"])
        result["none"] = _train(cluster, tmp / "none", "torchrun", ["bottleneck.method=none"])
    finally:
        cluster.down()
        result["left"] = netem.namespaces(cluster.cluster_id)
    return result


def steady(run):
    assert run["rc"] == [0, 0], run["log"]
    assert len(run["rows"]) == STEPS and all("net_tx_bytes" in r for r in run["rows"]), run["log"]
    return run["rows"][1:]     # step 1 also carries the one-off shape handshake


@pytest.mark.timing    # the shaped link's rates (the `runs` fixture trains once, in this lane)
def test_both_launchers_complete_a_2_stage_training_across_the_namespaces(runs):
    for name in ("resbm", "none"):
        rows = steady(runs[name])
        assert all(r["net_tx_packets"] > 0 and r["net_rx_packets"] > 0 for r in rows)
        assert "rank 1 node" in runs[name]["log"]


def median(xs):
    return sorted(xs)[len(xs) // 2]


@pytest.mark.timing    # the shaped link's rates (the `runs` fixture trains once, in this lane)
@pytest.mark.parametrize("name", ["resbm", "none"])
def test_kernel_bytes_above_tcp_match_the_meter_plus_framing(runs, name):
    """Every step: the kernel saw at least what the meter counted, per direction; the typical step
    adds only gloo's framing. A step may also carry a TCP retransmission (a whole segment again, up
    to 64 KB: seen on a loaded machine), so at most 2 of the 7 steps may exceed the framing."""
    rows = steady(runs[name])
    extra, over = [], 0
    for r in rows:
        sent, received = netem.payload_bytes(r)
        assert sent >= r["wire_bytes_fwd"] and received >= r["wire_bytes_bwd"], r    # stage 0 sends forward
        extra.append(sent + received - (r["wire_bytes_fwd"] + r["wire_bytes_bwd"] + r["wire_bytes_other"]))
        over += not (sent - r["wire_bytes_fwd"] <= FRAMING_MAX and received - r["wire_bytes_bwd"] <= FRAMING_MAX)
    assert 0 <= median(extra) <= FRAMING_MAX and min(extra) >= 0, extra
    assert over <= 2, extra


@pytest.mark.timing    # the shaped link's rates (the `runs` fixture trains once, in this lane)
def test_a_compressed_run_moves_its_code_and_the_uncompressed_one_about_H_over_h_times_more(runs):
    resbm, none = steady(runs["resbm"]), steady(runs["none"])
    tokens = resbm[0]["tokens"] // resbm[0]["step"]
    code = tokens * (H // RATIO) * 4           # GAS * mb * T * h * 4 bytes (fp32), each direction
    sent = median([netem.payload_bytes(r)[0] for r in resbm])
    received = median([netem.payload_bytes(r)[1] for r in resbm])
    assert code <= received <= code + FRAMING_MAX                        # gradients of the code
    assert code <= sent <= code + FRAMING_MAX        # the code alone: the default reads the ids on each stage
    total = lambda rows: median([sum(netem.payload_bytes(r)) for r in rows])   # noqa: E731
    ratio = total(none) / total(resbm)
    assert 0.75 * RATIO <= ratio <= 1.05 * RATIO, ratio


@pytest.mark.timing    # the shaped link's rates (the `runs` fixture trains once, in this lane)
def test_uncompressed_tokens_per_s_on_a_slow_link_sit_at_the_link_bound(runs):
    rows = steady(runs["none"])
    tokens = rows[0]["tokens"] // rows[0]["step"]
    measured = tokens * len(rows) / sum(r["step_time_s"] for r in rows)
    bytes_per_step = rows[-1]["wire_bytes_fwd"] + rows[-1]["wire_bytes_bwd"]
    half_duplex_bound = tokens / (bytes_per_step * 8 / RATE_BPS)
    assert 0.8 <= measured / half_duplex_bound <= 1.15, (measured, half_duplex_bound)


@pytest.mark.timing    # the shaped link's rates (the `runs` fixture trains once, in this lane)
def test_everything_is_torn_down(runs):
    assert runs["left"] == []
    assert not any(n.startswith(f"resbm-{runs['id']}-") for n in netem.namespaces())


# ---- the component on its own (no training) ----------------------------------------------------

def _transfer_s(cluster, src, dst, nbytes):
    """Seconds for `nbytes` over TCP from node src to node dst, timed at the receiver."""
    server = subprocess.Popen(cluster.exec_prefix(dst) + [sys.executable, "-c", (
        "import socket, time\n"
        f"s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('{cluster.address(dst)}', 5601)); s.listen(); print('ready', flush=True)\n"
        "c, _ = s.accept(); n = 0; t0 = None\n"
        "while True:\n"
        "    d = c.recv(65536)\n"
        "    if not d: break\n"
        "    t0 = t0 or time.perf_counter(); n += len(d)\n"
        "print(n, time.perf_counter() - t0)\n")], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    subprocess.run(cluster.exec_prefix(src) + [sys.executable, "-c", (
        "import socket\n"
        f"s = socket.create_connection(('{cluster.address(dst)}', 5601)); s.sendall(b'x' * {nbytes}); s.close()\n")],
        check=True, timeout=60)
    n, seconds = server.communicate(timeout=60)[0].split()
    assert int(n) == nbytes
    return float(seconds)


@pytest.mark.timing
@needs_net
def test_a_hub_gives_each_node_its_own_link_rate():
    """3 nodes on a hub: node 1's link at 8 Mbit/s, node 2's at 2 Mbit/s; node 0's at 8 Mbit/s."""
    with netem.Cluster(3, ["8mbit", "8mbit", "2mbit"], cluster_id=f"h{os.getpid()}") as c:
        nbytes = 250_000
        fast, slow = _transfer_s(c, 1, 0, nbytes), _transfer_s(c, 2, 0, nbytes)
        # the slower of the two links on the path decides (the first bucket's 4 KiB aside)
        assert 0.8 <= fast / (nbytes * 8 / 8e6) <= 1.3, fast
        assert 0.8 <= slow / (nbytes * 8 / 2e6) <= 1.3, slow
    assert netem.namespaces(c.cluster_id) == []


@needs_net
def test_teardown_after_an_error_and_on_sigterm(tmp_path):
    cid = f"e{os.getpid()}"
    with pytest.raises(ZeroDivisionError):
        with netem.Cluster(2, ["10mbit"], cluster_id=cid):
            assert len(netem.namespaces(cid)) == 2
            1 / 0
    assert netem.namespaces(cid) == []
    # a process holding a cluster, killed with SIGTERM, removes it (netem.py loaded on its own: fast)
    script = tmp_path / "hold.py"
    script.write_text(
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('netem', {str(REPO / 'resbm_ds' / 'netem.py')!r})\n"
        "netem = sys.modules['netem'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(netem)\n"
        f"netem.Cluster(2, ['10mbit'], cluster_id={cid!r}).up(); print('up', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        assert len(netem.namespaces(cid)) == 2
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=30) == -signal.SIGTERM
    finally:
        if holder.poll() is None:
            holder.kill()
        netem.down(cid)
    assert netem.namespaces(cid) == []


def test_bad_input_is_one_line_before_anything_is_created():
    for kwargs, words in ((dict(nodes=1), "at least 2 nodes"), (dict(rates=["fast"]), "bad rate"),
                          (dict(nodes=3, rates=["1mbit", "2mbit"]), "2 rates for 3 links"),
                          (dict(cluster_id="Bad-Id"), "lowercase")):
        with pytest.raises(netem.NetemError, match=words) as e:
            netem.Cluster(**kwargs)
        assert "\n" not in str(e.value)


def test_paper_net_refuses_bad_links_in_one_line(tmp_path, capsys):
    from resbm_ds.bench.__main__ import main as bench
    for argv, words in ((["--link", "fast=3"], "paper-net takes --link slow=MBPS"),
                        (["--link", "slow=-1"], "paper-net takes --link slow=MBPS"),
                        (["--set", "wire.link_full_duplex=false"], "full duplex")):
        assert bench(["--suite", "paper-net", "--out", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
    assert not (tmp_path / "results.json").exists()


# ---- data parallelism across sites over a real link (resbm_ds/bench/sites.py) ---------------------

SITES_TINY = ["--set", "model.hidden_size=64", "--set", "model.num_heads=4", "--set", "model.num_layers=3",
              "--set", "train.eval_batches=2", "--set", "sync.inner_steps=2", "--set", "train.warmup_steps=1"]


@needs_net
def test_two_sites_sync_over_a_real_link_and_the_kernel_counts_what_the_meter_says(tmp_path):
    """Two sites (namespaces joined by a shaped link, one process each) under DiLoCo: the suite runs
    on the slow and the fast link; the bytes between sites are the formula's (one outer step every 2
    of 4 steps), the kernel's payload on the link agrees with the meter, and the cluster is gone."""
    from resbm_ds.bench.__main__ import main as bench
    from resbm_ds.bench.sites import CONFIG, allreduce_bytes_per_step, overrides
    from resbm_ds.config import load_config
    out = tmp_path / "sites"
    assert bench(["--suite", "sites", "--out", str(out), "--only", "^diloco$", "--steps", "4", *SITES_TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["link"] for r in results["runs"]} == {"80mbit", "10gbit"}
    params = results["allreduce_formula_bytes_per_step"] // 8            # 2 ranks x 4 bytes per parameter
    cfg = load_config(CONFIG, [*overrides("allreduce", 4, tmp_path), *(s for s in SITES_TINY if s != "--set")])
    assert results["allreduce_formula_bytes_per_step"] == allreduce_bytes_per_step(cfg)
    per_sync = 2 * (2 * (2 - 1) * params * 4 // 2)        # both sites' sync.bytes_per_sync, one shard each
    for r in results["runs"]:
        m = r["metrics"]
        assert r["status"] == "ok" and m["steps"] == 4
        # two outer steps in four; the first step's handshake adds a few bytes (measured: 20 per site)
        assert m["meter_bytes_per_step"] == pytest.approx(2 * per_sync / 4, rel=1e-4), (m, per_sync)
        # the link carries both sites' messages (and a rendezvous); measured within 1.2% of the meter
        assert abs(m["kernel_payload_per_step"] / m["meter_bytes_per_step"] - 1) < 0.05, m
    assert "DiLoCo" in (out / "results.md").read_text()
    assert not netem.namespaces()   # the suite's cluster is torn down
