"""Wire codecs: quantise the float tensors that cross a stage boundary, at DeepSpeed's p2p layer.

`WireCodec(cfg.wire)` is the first hook of the wire chain (chain.py), before the meter, so the meter
counts the ENCODED bytes. DeepSpeed's engine never notices: it still hands a float
tensor to `p2p.send` and a preallocated float buffer to `p2p.recv`; the sender encodes, one uint8
tensor crosses, and the receiver decodes into the engine's buffer in place. Both sides build the
codec from the same config, so nothing about the encoding is negotiated on the wire.

Format (one uint8 tensor per transfer, shape [rows, codec_row_bytes(h)], a row = one token's
code vector: its codes, then its scale):

    int8:  q = round(x / s).clamp(-127, 127) as int8 bits,  s = max|x_row| / 127
    fp8:   q = (x / s) as float8_e4m3fn bits,                s = max|x_row| / 448
    int4, int2 (b bits, L = 2^b levels at the odd multiples of s/2, all of them used):
           q = floor(x / s).clamp(-L/2, L/2 - 1) + L/2 in b bits,  x' = (q - L/2 + 1/2) s,
           s = max|x_row| / (L/2) rounded up; two 4-bit or four 2-bit values per byte (the first in
           the low bits), the last byte zero-padded when h does not fill it
    the per-row scale s travels as 2 bytes of bfloat16 (fp32's exponent range, so tiny gradients do
    not underflow as they would in fp16); the encoder quantises with the ROUNDED scale, so the
    error bounds below hold exactly. An all-zero row decodes to zeros. fp8 dtypes are
    not in DeepSpeed's handshake dtype table (PipelineEngine.ID_TO_DTYPE), hence the uint8 carrier.

Bytes per row: `wire_bytes.codec_row_bytes` (the one formula, which `Config.wire_bytes_per_token` uses
too): ceil(h * bits / 8) + 2, e.g. fp32 h=8 -> 32 bytes dense, 10 int8, 6 int4, 4 int2.

Error bounds (per element, s = the row's bf16 scale): int8, int4 and int2 |x - x'| <= s/2 (at 4 and
2 bits, s/2 = max|x_row| / 16 and / 4); fp8 e4m3 (3 mantissa bits) |x - x'| <= 2^-4 |x| + 2^-10 s
(relative rounding in the normal range, half a subnormal step below it). The sub-8-bit codes have no
zero: a zero in a non-zero row arrives as +-s/2.

What is left alone: non-float tensors (DeepSpeed's int32 shape handshake, integer side tensors such
as token ids), 0-d tensors (the engine's start-up ping), and, unless `codec_backward`, the gradients
travelling to an earlier stage. Autograd is unaffected: the receiving stage computes on the
dequantised values and its gradient is applied unchanged to the sender's output (a straight-through
estimator for the rounding).
"""
from __future__ import annotations

import torch

from ..wire_bytes import CODEC_BITS, CODEC_SCALE_BYTES, codec_row_bytes
from .chain import Hook, Transfer

QMAX = {"int8": 127.0, "fp8": 448.0}     # largest magnitude of the code (e4m3fn: 448)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


def encoded_nbytes(shape, codec: str) -> int:
    """Bytes on the wire for a float tensor of `shape` under `codec` (rows x codec_row_bytes(h))."""
    h = shape[-1] if len(shape) else 1
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * codec_row_bytes(h, codec)


def compression_factor(shape, dtype: torch.dtype, codec: str) -> float:
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype.itemsize / encoded_nbytes(shape, codec)


@torch.no_grad()
def encode(x: torch.Tensor, codec: str) -> torch.Tensor:
    """A float tensor -> uint8 [rows, codec_row_bytes(h)] (codes, then the row's bf16 scale)."""
    rows = _rows(x).float()
    if codec in ("int4", "int2"):
        return _encode_packed(rows, CODEC_BITS[codec])
    qmax = QMAX[codec]
    amax = rows.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).to(torch.bfloat16)
    y = (rows / scale.float()).clamp_(-qmax, qmax)
    if codec == "int8":
        q = y.round_().to(torch.int8).view(torch.uint8)
    elif codec == "fp8":
        q = y.to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return torch.cat([q, scale.view(torch.uint8)], dim=1)


def _encode_packed(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """int4 / int2: 2^bits levels, 8 / bits values per byte (module docstring)."""
    half = 2 ** (bits - 1)
    amax = rows.abs().amax(dim=1, keepdim=True)
    # round the scale UP to bf16 (nearest rounding moves it by at most 2^-9), so |x / s| <= L/2
    scale = (amax / half * (1 + 2 ** -8)).to(torch.bfloat16)
    s = scale.float()
    q = (rows / torch.where(s > 0, s, 1.0)).floor_().clamp_(-half, half - 1).add_(half).to(torch.uint8)
    per_byte = 8 // bits
    q = torch.nn.functional.pad(q, (0, -q.shape[1] % per_byte)).view(q.shape[0], -1, per_byte)
    packed = torch.zeros(q.shape[:2], dtype=torch.uint8, device=q.device)
    for i in range(per_byte):
        packed |= q[..., i] << (bits * i)
    return torch.cat([packed, scale.view(torch.uint8)], dim=1)


@torch.no_grad()
def decode_into(payload: torch.Tensor, out: torch.Tensor, codec: str) -> torch.Tensor:
    """Dequantise `payload` (from `encode`) into the float tensor `out`, in place."""
    q, scale = payload[:, :-CODEC_SCALE_BYTES], payload[:, -CODEC_SCALE_BYTES:].contiguous().view(torch.bfloat16).float()
    if codec in ("int4", "int2"):
        bits = CODEC_BITS[codec]
        fields = [(q >> (bits * i)) & (2 ** bits - 1) for i in range(8 // bits)]
        levels = torch.stack(fields, dim=-1).flatten(1)[:, :out.shape[-1]]
        values = levels.float() - 2 ** (bits - 1) + 0.5
    elif codec == "int8":
        values = q.view(torch.int8).float()
    else:
        values = q.contiguous().view(torch.float8_e4m3fn).float()
    out.copy_((values * scale).view(out.shape))
    return out


def roundtrip(x: torch.Tensor, codec: str) -> torch.Tensor:
    return decode_into(encode(x, codec), torch.empty_like(x), codec)


class _StraightThrough(torch.autograd.Function):
    """roundtrip forward; backward the gradient unchanged, or round-tripped too (codec_backward):
    what a boundary between stages does, for one that crosses no wire."""

    @staticmethod
    def forward(ctx, x, codec, backward):
        ctx.codec, ctx.backward = codec, backward
        return roundtrip(x, codec)

    @staticmethod
    def backward(ctx, grad):
        return (roundtrip(grad.contiguous(), ctx.codec) if ctx.backward else grad), None, None


def straight_through(codec: str, backward: bool):
    """A callable code -> round-tripped code, with the wire's gradient (see _StraightThrough)."""
    return lambda x: _StraightThrough.apply(x, codec, backward)


class WireCodec(Hook):
    """The chain hook: encodes what it applies to on send, decodes it into the engine's buffer on recv."""

    def __init__(self, wire_cfg):
        if wire_cfg.codec == "fp8" and not hasattr(torch, "float8_e4m3fn"):
            raise RuntimeError(f"wire.codec=fp8 needs torch.float8_e4m3fn (torch {torch.__version__})")
        self.codec, self.backward = wire_cfg.codec, bool(wire_cfg.codec_backward)
        self._recv_buffers: dict[tuple, torch.Tensor] = {}
        self.encoded = 0   # transfers encoded or decoded by this process (for tests and logs)

    def _applies(self, tensor, t: Transfer) -> bool:
        if self.codec == "none" or not tensor.is_floating_point() or tensor.dim() == 0:
            return False
        return t.forward or self.backward

    def on_send(self, tensor, t: Transfer):
        if not self._applies(tensor, t):
            return tensor
        self.encoded += 1
        return encode(tensor, self.codec)

    def recv_buffer(self, tensor, t: Transfer):
        return self._buffer(tensor) if self._applies(tensor, t) else tensor

    def on_recv(self, received, into, t: Transfer):
        if received is not into:
            decode_into(received, into, self.codec)
            self.encoded += 1

    def _buffer(self, like: torch.Tensor) -> torch.Tensor:
        h = like.shape[-1] if like.dim() else 1
        key = (like.numel() // h, codec_row_bytes(h, self.codec), like.device)
        if key not in self._recv_buffers:
            self._recv_buffers[key] = torch.empty(key[:2], dtype=torch.uint8, device=like.device)
        return self._recv_buffers[key]
