"""The one patch of what crosses between pipeline stages, and the ordered hooks that see it.

DeepSpeed's pipeline engine sends every activation (forward) and activation gradient (backward)
through `deepspeed.runtime.pipe.p2p.send/recv`, called through the module attribute, and reaches
other stages outside p2p only through `deepspeed.comm` collectives (the loss broadcast, the clip
norm, a tied embedding's gradient). `HookChain` replaces those four functions once (through
`compat.patch_comm`, where every DeepSpeed patch lives) and passes each transfer through an explicit,
ordered list of hooks. `build_engine` installs `[codec, meter, link]`:

  send:  codec.on_send (encodes) -> meter.on_send (counts the encoded bytes) -> link.on_send (pays
         the emulated link for them) -> the real transport
  recv:  codec.recv_buffer (a uint8 buffer for the payload) -> ... -> the real transport -> then in
         reverse: link.on_recv (waits for the emulated arrival) -> meter.on_recv -> codec.on_recv
         (decodes into the engine's buffer)

Direction and DeepSpeed's shape handshake are worked out here, once per transfer (`Transfer`);
whether a collective's group spans stages is worked out once per group (`Collective`).

    with install([WireCodec(cfg.wire), meter, LinkEmulator(cfg.wire)]):
        ...                     # uninstall() restores DeepSpeed's functions and closes the hooks
"""
from __future__ import annotations

from dataclasses import dataclass

import deepspeed.comm as ds_comm
import torch

from .. import compat
from ..compat import TENSOR_META_SIZE


def is_shape_handshake(tensor) -> bool:
    """DeepSpeed's shape/dtype handshake (PipelineEngine._send_tensor_meta): a 1-D int32 buffer of
    TENSOR_META_SIZE elements. Activation-path tensors are [batch, seq, ...], never 1-D."""
    return tensor.dtype == torch.int32 and tensor.dim() == 1 and tensor.numel() == TENSOR_META_SIZE


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass(frozen=True)
class Transfer:
    """One p2p message, seen from this rank."""
    peer_stage: int
    sending: bool
    forward: bool       # towards a later stage (activations); else towards an earlier one (gradients)
    handshake: bool     # DeepSpeed's one-off shape handshake (is_shape_handshake)

    @classmethod
    def of(cls, tensor, peer_stage: int, sending: bool) -> "Transfer":
        forward = (peer_stage > compat.own_stage()) == sending
        return cls(peer_stage, sending, forward, is_shape_handshake(tensor))


@dataclass(frozen=True)
class Collective:
    """One `deepspeed.comm` all_reduce/broadcast whose group holds ranks of more than one stage."""
    nbytes: int
    ranks: list[int]
    reporter: bool      # this rank reports it: the lowest rank of an all_reduce, a broadcast's source


class Hook:
    """A link of the chain; override what you need. Defaults pass everything through unchanged."""

    def on_send(self, tensor: torch.Tensor, t: Transfer) -> torch.Tensor:
        return tensor                       # what goes on towards the transport

    def recv_buffer(self, tensor: torch.Tensor, t: Transfer) -> torch.Tensor:
        return tensor                       # what the transport should receive into

    def on_recv(self, received: torch.Tensor, into: torch.Tensor, t: Transfer) -> None:
        """After the transport: `received` is this hook's recv_buffer, `into` what it was given."""

    def on_collective(self, c: Collective) -> None:
        """Before a collective between stages joins the transport, on every member."""

    def close(self) -> None:
        """When the chain is uninstalled or replaced."""


class HookChain:
    def __init__(self):
        self.hooks: list[Hook] = []
        self._originals = None
        self._groups: dict[int, tuple[list[int], bool]] = {}

    # ---- installing ----------------------------------------------------------------------------
    def install(self, hooks: list[Hook]) -> "HookChain":
        """Patch DeepSpeed's functions (once per process) and make `hooks` the chain, in order."""
        if self._originals is None:
            self._originals = compat.patch_comm(self.send, self.recv, self.all_reduce, self.broadcast)
        self._close_hooks()
        self.hooks = list(hooks)
        self._groups.clear()
        return self

    def uninstall(self) -> None:
        self._close_hooks()
        if self._originals is not None:
            compat.restore_comm(self._originals)
            self._originals = None

    def _close_hooks(self):
        for hook in self.hooks:
            hook.close()
        self.hooks = []

    def __enter__(self) -> "HookChain":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ---- p2p -----------------------------------------------------------------------------------
    def send(self, tensor, dest_stage, async_op=False):
        t = Transfer.of(tensor, dest_stage, sending=True)
        for hook in self.hooks:
            tensor = hook.on_send(tensor, t)
        return self._originals[0](tensor, dest_stage, async_op=async_op)

    def recv(self, tensor, src_stage, async_op=False):
        t = Transfer.of(tensor, src_stage, sending=False)
        buffers = [tensor]
        for hook in self.hooks:
            buffers.append(hook.recv_buffer(buffers[-1], t))
        result = self._originals[1](buffers[-1], src_stage, async_op=async_op)
        for k in reversed(range(len(self.hooks))):
            self.hooks[k].on_recv(buffers[k + 1], buffers[k], t)
        return result

    # ---- collectives ---------------------------------------------------------------------------
    def all_reduce(self, tensor, op=ds_comm.ReduceOp.SUM, group=None, *args, **kwargs):
        self._collective(tensor, group, source=None)
        return self._originals[2](tensor, op, group, *args, **kwargs)

    def broadcast(self, tensor, src, group=None, *args, **kwargs):
        self._collective(tensor, group, source=src)
        return self._originals[3](tensor, src, group, *args, **kwargs)

    def _spans_stages(self, group) -> tuple[list[int], bool]:
        key = id(group)
        if key in self._groups:
            return self._groups[key]
        ranks = torch.distributed.get_process_group_ranks(group or torch.distributed.group.WORLD)
        stages = compat.stages_of_ranks(ranks)
        if stages is None:   # before the engine exists (its own set-up): no stage layout to judge by yet
            return ranks, False
        self._groups[key] = ranks, len(stages) > 1
        return self._groups[key]

    def _collective(self, tensor, group, source):
        if not self.hooks or not torch.distributed.is_initialized() or not torch.is_tensor(tensor):
            return
        ranks, crosses = self._spans_stages(group)
        if not crosses:
            return
        me = torch.distributed.get_rank()
        c = Collective(nbytes(tensor), ranks, me == (min(ranks) if source is None else source))
        for hook in self.hooks:
            hook.on_collective(c)


CHAIN = HookChain()


def install(hooks: list[Hook]) -> HookChain:
    """The process's one chain, with `hooks` in order (replacing, and closing, any before)."""
    return CHAIN.install(hooks)
