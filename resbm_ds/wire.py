"""Count the bytes a stage sends and receives between pipeline stages, at DeepSpeed's p2p layer.

DeepSpeed's pipeline engine calls `deepspeed.runtime.pipe.p2p.send/recv` through the module
attribute for every activation (forward) and activation gradient (backward), so wrapping those two
functions sees exactly what crosses a stage boundary. The engine's start-up ping happens before the
meter is installed, and its one-off shape handshake (a 1-D int32 tensor of TENSOR_META_SIZE
elements, `is_shape_handshake`) is not counted; everything else is: activations and their gradients,
a codec's uint8 payload, and integer side tensors of the activation path (the token ids that the
subspace baseline sends with its code, baselines.py).

Direction: a transfer towards a later stage is forward (activations), towards an earlier stage is
backward (gradients).
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class WireMeter:
    """Installed once per process; `take()` returns and resets the counts since the last call."""

    _installed: "WireMeter | None" = None

    def __init__(self):
        self.counts = WireCounts()
        self.hooks = []   # callables (tensor, direction, peer_stage, is_send) -> None, e.g. a link model

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
            cls._installed = meter
        return cls._installed

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
        for hook in self.hooks:
            hook(tensor, "fwd" if forward else "bwd", peer_stage, is_send)

    def take(self) -> WireCounts:
        counts, self.counts = self.counts, WireCounts()
        return counts
