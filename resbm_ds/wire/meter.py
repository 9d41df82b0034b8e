"""Count the bytes that cross between pipeline stages: p2p messages and collectives between stages.

A hook of the wire chain (chain.py), after the codec, so it counts the bytes actually sent. It counts
every p2p message except DeepSpeed's one-off shape handshake: activations and their gradients, a
codec's uint8 payload, and integer side tensors of the activation path (token ids, model/boundary.py,
model/baselines.py). The engine's start-up ping (sent inside `deepspeed.initialize`, after the chain
is installed) is dropped by `build_engine`.

Traffic between stages outside p2p is counted too, as `other`: every `deepspeed.comm.all_reduce` /
`broadcast` whose group holds ranks of more than one stage (the loss broadcast from the last stage,
the global gradient-norm reduction for clipping, the trainer's non-finite check (engine.StepGuard),
a tied embedding's gradient all-reduce, the trainer's own metric reduction). Each such collective
is counted once, with its payload size, on the rank that reports it (chain.Collective: the lowest
rank of an all-reduce's group, a broadcast's source); a 2-rank all-reduce of n bytes moves n bytes each way.
Not counted: barriers (no payload), collectives before the engine's stage layout exists (its own
set-up: weight broadcast within data-parallel groups, the link emulator's host check), and
checkpoint files (written to storage, not sent between stages).
"""
from __future__ import annotations

from dataclasses import dataclass

from .chain import Collective, Hook, Transfer, nbytes


@dataclass
class WireCounts:
    sent_fwd: int = 0
    sent_bwd: int = 0
    recv_fwd: int = 0
    recv_bwd: int = 0
    sends: int = 0
    other: int = 0          # collectives between stages (payload, once per collective)
    collectives: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class WireMeter(Hook):
    """`take()` returns and resets the counts since the last call. `transfers` only grows: every
    message and collective between stages, handshakes included (a sign of progress, watch.py)."""

    def __init__(self):
        self.counts = WireCounts()
        self.transfers = 0

    def on_send(self, tensor, t: Transfer):
        self.transfers += 1
        if not t.handshake:
            c = self.counts
            c.sends += 1
            if t.forward:
                c.sent_fwd += nbytes(tensor)
            else:
                c.sent_bwd += nbytes(tensor)
        return tensor

    def on_recv(self, received, into, t: Transfer):
        self.transfers += 1
        if not t.handshake:
            if t.forward:
                self.counts.recv_fwd += nbytes(received)
            else:
                self.counts.recv_bwd += nbytes(received)

    def on_collective(self, c: Collective):
        self.transfers += 1
        if c.reporter:
            self.counts.other += c.nbytes
            self.counts.collectives += 1

    def take(self) -> WireCounts:
        counts, self.counts = self.counts, WireCounts()
        return counts
