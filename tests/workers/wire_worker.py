"""Two ranks exchange tensors through DeepSpeed's p2p layer with the wire chain [codec, meter, link]
installed as `build_engine` installs it, and write what they measured: `wire_worker.py OUT_PREFIX`.

Rank r is pipeline stage r of a 2-stage pipeline (a stand-in grid; no model, no engine).
"""
import json
import sys
import time

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import p2p

from resbm_ds.config import WireConfig
from resbm_ds.wire import chain
from resbm_ds.wire.codecs import WireCodec, roundtrip
from resbm_ds.wire.link import LinkEmulator
from resbm_ds.wire.meter import WireMeter


class Grid:
    pipe_parallel_size = 2

    def __init__(self, rank):
        self.rank = rank

    def get_stage_id(self):
        return self.rank

    def stage_to_global(self, stage_id):
        return stage_id


def tensor(seed, shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 3).to(dtype)


def configure(**kw):
    """A fresh chain in build_engine's order; -> (meter, link)."""
    cfg = WireConfig(**kw)
    meter, link = WireMeter(), LinkEmulator(cfg)
    chain.install([WireCodec(cfg), meter, link])
    dist.barrier()
    return meter, link


def main():
    prefix = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank = dist.get_rank()
    p2p._grid = Grid(rank)
    report = {"codec": [], "link": []}
    shape = (2, 16, 24)

    # ---- codecs: forward always encoded, backward only with codec_backward ----------------------
    seed = 0
    for codec in ("none", "int8", "fp8", "int4", "int2"):
        for backward in (False, True):
            for dtype in (torch.float32, torch.bfloat16):
                meter, _ = configure(codec=codec, codec_backward=backward)
                seed += 2
                x, g = tensor(seed, shape, dtype), tensor(seed + 1, shape, dtype)
                meta = torch.arange(256, dtype=torch.int32)           # like DeepSpeed's handshake
                if rank == 0:
                    p2p.send(meta, 1)
                    p2p.send(x, 1)
                    buf = torch.zeros(shape, dtype=dtype)
                    p2p.recv(buf, 1)
                    expect, got = (roundtrip(g, codec) if backward and codec != "none" else g), buf
                else:
                    m = torch.zeros(256, dtype=torch.int32)
                    p2p.recv(m, 0)
                    assert torch.equal(m, meta)
                    buf = torch.zeros(shape, dtype=dtype)
                    p2p.recv(buf, 0)
                    p2p.send(g, 0)
                    expect, got = (roundtrip(x, codec) if codec != "none" else x), buf
                orig = g if rank == 0 else x
                c = meter.take()
                report["codec"].append(dict(
                    codec=codec, backward=backward, dtype=str(dtype), exact=bool(torch.equal(got, expect)),
                    rel_err=float((got.float() - orig.float()).norm() / orig.float().norm()),
                    sent=c.sent_fwd + c.sent_bwd, recv=c.recv_fwd + c.recv_bwd))

    # ---- link: one transfer on an idle link pays bytes / bandwidth + latency -------------------
    bw, lat = 8.0, 20.0                       # 8 Mbit/s = 1 MB/s, 20 ms
    _, link = configure(link_bandwidth_mbps=bw, link_latency_ms=lat)
    for n_floats in (1, 12_500, 50_000):      # 4 B, 50 kB, 200 kB
        for _ in range(2):
            dist.barrier()
            x = torch.ones(n_floats)
            if rank == 0:
                time.sleep(0.05)              # the receiver is already waiting in recv
                t0 = time.monotonic()
                p2p.send(x, 1)
                t1 = time.monotonic()
                dist.send(torch.tensor([t0, t1], dtype=torch.float64), 1)
            else:
                p2p.recv(x, 0)
                t2 = time.monotonic()
                stamps = torch.zeros(2, dtype=torch.float64)
                dist.recv(stamps, 0)
                t0, t1 = stamps.tolist()
                report["link"].append(dict(nbytes=n_floats * 4, delay=t2 - t0, sender_blocked=t1 - t0,
                                           expected=n_floats * 4 * 8 / (bw * 1e6) + lat / 1e3))
    # back-to-back sends on one link are serialised: the k-th arrives k transfers later
    dist.barrier()
    n = 25_000                                # 100 kB = 100 ms each
    if rank == 0:
        t0 = time.monotonic()
        for _ in range(3):
            p2p.send(torch.ones(n), 1)
        dist.send(torch.tensor([t0], dtype=torch.float64), 1)
    else:
        arrivals = []
        for _ in range(3):
            p2p.recv(torch.zeros(n), 0)
            arrivals.append(time.monotonic())
        stamp = torch.zeros(1, dtype=torch.float64)
        dist.recv(stamp, 0)
        report["serial"] = dict(arrivals=[a - float(stamp[0]) for a in arrivals],
                                expected=[(k + 1) * n * 4 * 8 / (bw * 1e6) + lat / 1e3 for k in range(3)])
    report["stats"] = dict(transfers=link.stats.transfers, bytes=link.stats.bytes)
    chain.CHAIN.uninstall()
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
