"""Count the bytes that cross between pipeline stages: at DeepSpeed's p2p layer, and in collectives.

DeepSpeed's pipeline engine calls `deepspeed.runtime.pipe.p2p.send/recv` through the module
attribute for every activation (forward) and activation gradient (backward), so wrapping those two
functions sees exactly what crosses a stage boundary. The engine's start-up ping (sent inside
`deepspeed.initialize`, after the meter is installed) is dropped by `build_engine`, and its one-off
shape handshake (a 1-D int32 tensor of TENSOR_META_SIZE elements, `is_shape_handshake`) is not
counted; everything else is: activations and their gradients, a codec's uint8 payload, and integer
side tensors of the activation path (token ids, bottleneck.py / baselines.py).

Traffic between stages outside p2p is counted too, as `other`: every `deepspeed.comm.all_reduce` /
`broadcast` whose group holds ranks of more than one stage (the loss broadcast from the last stage,
the global gradient-norm reduction for clipping, a tied embedding's gradient all-reduce, the
trainer's own metric reduction). Each such collective is counted once, with its payload size, on
the lowest rank of its group (a broadcast: on its source); a 2-rank all-reduce of n bytes moves n
bytes each way. Hooks (`collective_hooks`, e.g. the emulated link) see each one on every rank.
Not counted: barriers (no payload), collectives before the engine's stage layout exists (its own
set-up: weight broadcast within data-parallel groups, the link emulator's host check), and
checkpoint files (written to storage, not sent between stages).

Direction: a transfer towards a later stage is forward (activations), towards an earlier stage is
backward (gradients).
"""
from __future__ import annotations

from dataclasses import dataclass

import deepspeed.comm as ds_comm
import torch
from deepspeed.runtime.pipe import p2p
from deepspeed.runtime.pipe.engine import TENSOR_META_SIZE


def is_shape_handshake(tensor) -> bool:
    """DeepSpeed's shape/dtype handshake (PipelineEngine._send_tensor_meta): a 1-D int32 buffer of
    TENSOR_META_SIZE elements. Activation-path tensors are [batch, seq, ...], never 1-D."""
    return tensor.dtype == torch.int32 and tensor.dim() == 1 and tensor.numel() == TENSOR_META_SIZE


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


class WireMeter:
    """Installed once per process; `take()` returns and resets the counts since the last call."""

    _installed: "WireMeter | None" = None

    def __init__(self):
        self.counts = WireCounts()
        self.collective_hooks = []   # callables (nbytes, group_ranks) -> None, run on every member
        self._groups: dict[int, tuple[list[int], bool, int]] = {}

    @classmethod
    def install(cls) -> "WireMeter":
        if cls._installed is None:
            meter = cls()
            original_send, original_recv = p2p.send, p2p.recv

            def send(tensor, dest_stage, async_op=False):
                meter._count(tensor, dest_stage, is_send=True)
                return original_send(tensor, dest_stage, async_op=async_op)

            def recv(tensor, src_stage, async_op=False):
                result = original_recv(tensor, src_stage, async_op=async_op)
                meter._count(tensor, src_stage, is_send=False)
                return result

            p2p.send, p2p.recv = send, recv
            meter._wrap_collectives()
            cls._installed = meter
        return cls._installed

    def _wrap_collectives(self):
        meter = self
        original_all_reduce, original_broadcast = ds_comm.all_reduce, ds_comm.broadcast

        def all_reduce(tensor, op=ds_comm.ReduceOp.SUM, group=None, *args, **kwargs):
            meter._count_collective(tensor, group, counter=None)
            return original_all_reduce(tensor, op, group, *args, **kwargs)

        def broadcast(tensor, src, group=None, *args, **kwargs):
            meter._count_collective(tensor, group, counter=src)
            return original_broadcast(tensor, src, group, *args, **kwargs)

        ds_comm.all_reduce, ds_comm.broadcast = all_reduce, broadcast

    def _group_info(self, group) -> tuple[list[int], bool, int]:
        """(global ranks, spans more than one pipeline stage, this rank's global rank)."""
        key = id(group)
        if key in self._groups:
            return self._groups[key]
        me = torch.distributed.get_rank()
        ranks = torch.distributed.get_process_group_ranks(group or torch.distributed.group.WORLD)
        grid = getattr(p2p, "_grid", None)
        if grid is None:   # before the engine exists (its own set-up): no stage layout to judge by yet
            return ranks, False, me
        info = (ranks, len({grid._topo.get_coord(r).pipe for r in ranks}) > 1, me)
        self._groups[key] = info
        return info

    def _count_collective(self, tensor, group, counter):
        if not torch.distributed.is_initialized() or not torch.is_tensor(tensor):
            return
        ranks, crosses, me = self._group_info(group)
        if not crosses:
            return
        nbytes = tensor.numel() * tensor.element_size()
        if me == (min(ranks) if counter is None else counter):
            self.counts.other += nbytes
            self.counts.collectives += 1
        for hook in self.collective_hooks:
            hook(nbytes, ranks)

    def _count(self, tensor, peer_stage, is_send):
        # floats: activations and gradients; uint8: a wire codec's payload (codecs.py); integers:
        # side tensors such as token ids (baselines.py). Only the shape handshake is not counted.
        if is_shape_handshake(tensor):
            return
        nbytes = tensor.numel() * tensor.element_size()
        forward = (peer_stage > p2p._grid.get_stage_id()) == is_send
        c = self.counts
        if is_send:
            c.sends += 1
            if forward:
                c.sent_fwd += nbytes
            else:
                c.sent_bwd += nbytes
        elif forward:
            c.recv_fwd += nbytes
        else:
            c.recv_bwd += nbytes

    def take(self) -> WireCounts:
        counts, self.counts = self.counts, WireCounts()
        return counts
