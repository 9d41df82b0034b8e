"""Link emulation: make every pipeline p2p transfer pay a slow network's time, on one machine.

`LinkEmulator(cfg.wire)` is the last hook of the wire chain (chain.py), after the codec and the
meter, so it times the bytes that are actually sent, after encoding.

The model (virtual time, on the machine's monotonic clock, which all local processes share):

  * A link joins two adjacent stages of one pipeline (one data-parallel replica). It has a bandwidth
    `B` (wire.link_bandwidth_mbps, 1 Mbit/s = 1e6 bit/s) and a one-way latency `L`
    (wire.link_latency_ms).
  * Half duplex by default: forward activations and returned gradients share the link's bandwidth and
    queue behind each other. This is the accounting behind the paper's link-bound figure (80 Mbit/s
    over 8 KiB forward + 8 KiB backward per token = 609 tokens/s). `wire.link_full_duplex=true`
    gives each direction its own queue.
  * A transfer of n bytes offered at time t (the moment the engine calls `p2p.send`) starts when the
    link is free, `start = max(t, free)`, occupies it for `n * 8 / B`, and arrives `L` later:

        done    = start + n * 8 / B        (the link is busy until then: free = done)
        arrival = done + L

    so on an idle link every transfer pays exactly `n * 8 / B + L`, transfers on one link are
    serialised, and latency is pipelined (it delays the receiver, it does not occupy the link).
  * The sender is blocked until `done` (DeepSpeed's p2p sends are blocking: a real send returns
    once its last byte is on the wire), posts `arrival`, then hands the tensor to the real
    transport. The receiver gets the tensor from the real transport and then waits until `arrival`.

Every p2p message pays, whatever it carries (activations, gradients, codec payloads, DeepSpeed's
one-off 1 KiB shape handshake and start-up ping): what counts is the bytes handed to the transport.
The link's state lives in a small file under /dev/shm shared by the link's two processes: its
`free` time (updated under flock, so both directions of a half-duplex link see one queue) and, per
direction, a ring of arrival times that the sender writes before its real send and the receiver
reads after its real recv (p2p messages are FIFO per direction, so the k-th message sent is the
k-th received). No extra message crosses the transport, and nothing the meter counts changes.
The emulator therefore needs both stages of a link on one host; its constructor checks that.

Collectives between stages (the loss broadcast, the clip-norm reduction, a tied gradient's
all-reduce, the trainer's metric reduction; counted by meter.py as `other`) pay too: every member of
such a collective waits `n * 8 / B + L` before it joins (`delay_collective`, a simpler model than
the p2p queue: they are a few bytes per step, so the latency is what matters). Collectives within
one stage (data-parallel gradient all-reduce) are not delayed: they do not cross a link.

What it does not model: congestion control, packet loss, jitter, and the real transport's own time
(on one machine, gloo over loopback adds well under a millisecond per transfer on top of the
emulated time).

Measured on the 2-core CPU box (tests/test_codecs_link.py, tests/test_bench.py): a single transfer
arrives within about 1 ms of `n * 8 / B + L`; an uncompressed tiny pipeline on a 0.5 Mbit/s link
runs at about 0.95x its link-bound tokens/s (the rest is compute that DeepSpeed's blocking 1F1B
schedule cannot overlap with the link).

Link-bound prediction (`link_bound_tokens_per_s`): if the link is the bottleneck, a step cannot take
less than the time the busiest link needs to carry that step's bytes, so
tokens/s <= tokens_per_step / (bytes_per_link_per_step * 8 / B) (half duplex; full duplex divides
by the larger direction instead).
"""
from __future__ import annotations

import atexit
import fcntl
import os
import socket
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import compat
from .chain import Collective, Hook, Transfer, nbytes


@dataclass
class LinkModel:
    """The timing rule, separated from the processes so it can be checked on its own."""
    bandwidth_mbps: float | None = None
    latency_ms: float = 0.0

    def serialisation_s(self, nbytes: int) -> float:
        return 0.0 if self.bandwidth_mbps is None else nbytes * 8 / (self.bandwidth_mbps * 1e6)

    def transfer_s(self, nbytes: int) -> float:
        """What one transfer costs on an idle link: bytes / bandwidth + latency."""
        return self.serialisation_s(nbytes) + self.latency_ms / 1e3

    def schedule(self, offered: float, nbytes: int, free: float) -> tuple[float, float, float]:
        """-> (start, done, arrival) of a transfer offered at `offered` on a link free at `free`."""
        start = max(offered, free)
        done = start + self.serialisation_s(nbytes)
        return start, done, done + self.latency_ms / 1e3


def link_bound_tokens_per_s(tokens_per_step: float, bytes_per_link_per_step: float,
                            bandwidth_mbps: float) -> float:
    """The most tokens/s a link of this bandwidth allows, given the bytes one link carries per step."""
    return tokens_per_step / (bytes_per_link_per_step * 8 / (bandwidth_mbps * 1e6))


class LinkClock:
    """One link's shared state, in a file both of its processes map: the `free` time, and per
    direction a ring of arrival times (slot k = the k-th message sent that way)."""

    RING = 4096   # slots per direction; a blocking send is never more than a few messages ahead

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.sent = [0, 0]       # messages this process sent / received, per direction
        self.received = [0, 0]

    def reserve(self, model: LinkModel, nbytes: int, offered: float) -> tuple[float, float, float]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(self.fd, 8, 0)
            free = struct.unpack("d", raw)[0] if len(raw) == 8 else 0.0
            start, done, arrival = model.schedule(offered, nbytes, free)
            os.pwrite(self.fd, struct.pack("d", done), 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return start, done, arrival

    def _slot(self, direction: int, k: int) -> int:
        return 8 + 8 * (direction * self.RING + k % self.RING)

    def post_arrival(self, direction: int, arrival: float):
        os.pwrite(self.fd, struct.pack("d", arrival), self._slot(direction, self.sent[direction]))
        self.sent[direction] += 1

    def take_arrival(self, direction: int) -> float:
        raw = os.pread(self.fd, 8, self._slot(direction, self.received[direction]))
        self.received[direction] += 1
        return struct.unpack("d", raw)[0]

    def close(self, unlink: bool = True):
        try:
            os.close(self.fd)
        except OSError:
            pass
        if unlink:
            try:
                os.unlink(self.path)
            except OSError:
                pass


def sleep_until(t: float):
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        time.sleep(left)


@dataclass
class LinkStats:
    transfers: int = 0
    bytes: int = 0
    collectives: int = 0         # collectives between stages that paid the link


class LinkEmulator(Hook):
    """The chain hook. Construct it on every rank at the same point: with the link emulated
    (wire.link_*), the constructor is a collective (it agrees on the shared clock directory)."""

    def __init__(self, wire_cfg):
        self.model = LinkModel(wire_cfg.link_bandwidth_mbps, wire_cfg.link_latency_ms)
        self.full_duplex = bool(wire_cfg.link_full_duplex)
        self.enabled = bool(wire_cfg.link_emulated)
        self.stats = LinkStats()
        self._clocks: dict[tuple, LinkClock] = {}
        self._dir: Path | None = self._shared_dir() if self.enabled else None
        atexit.register(self.close)

    def on_send(self, tensor, t: Transfer):
        if self.enabled:
            self._before_send(tensor, t.peer_stage)
        return tensor

    def on_recv(self, received, into, t: Transfer):
        if self.enabled:
            self._after_recv(t.peer_stage)

    def on_collective(self, c: Collective):
        """A collective between stages pays one link transfer (a simpler model than p2p's queue)."""
        if self.enabled:
            self.stats.collectives += 1
            time.sleep(self.model.transfer_s(c.nbytes))

    def _shared_dir(self) -> Path:
        """A directory name from rank 0, and a check that every rank runs on this host."""
        host = socket.gethostname()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            hosts, token = [host], uuid.uuid4().hex[:12]
        else:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (host, uuid.uuid4().hex[:12]))
            hosts, token = [g[0] for g in gathered], gathered[0][1]
        if len(set(hosts)) > 1:
            raise RuntimeError(f"wire.link_* emulation needs every rank on one host (found {sorted(set(hosts))}): "
                               "the emulated link's clock is shared through local memory")
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        d = base / f"resbm-link-{token}"
        d.mkdir(exist_ok=True)
        return d

    def _peer_rank(self, stage: int) -> int:
        return compat.stage_to_global(stage)

    def _clock(self, peer_stage: int, sending: bool) -> tuple[LinkClock, int]:
        """The clock of the link to `peer_stage`, and the direction index of this transfer."""
        me, peer = dist.get_rank(), self._peer_rank(peer_stage)
        src, dst = (me, peer) if sending else (peer, me)
        key = (min(me, peer), max(me, peer)) + ((src, dst) if self.full_duplex else ())
        if key not in self._clocks:
            self._clocks[key] = LinkClock(self._dir / "-".join(map(str, key)))
        return self._clocks[key], int(src > dst)

    def _before_send(self, tensor: torch.Tensor, dest_stage: int):
        n = nbytes(tensor)
        clock, direction = self._clock(dest_stage, sending=True)
        offered = time.monotonic()
        _, done, arrival = clock.reserve(self.model, n, offered)
        clock.post_arrival(direction, arrival)
        sleep_until(done)
        self.stats.transfers += 1
        self.stats.bytes += n

    def _after_recv(self, src_stage: int):
        clock, direction = self._clock(src_stage, sending=False)
        sleep_until(clock.take_arrival(direction))

    def close(self):
        for clock in self._clocks.values():
            clock.close()
        self._clocks.clear()
        if self._dir is not None:
            try:
                self._dir.rmdir()
            except OSError:
                pass
