"""The ResBM boundary: an encoder that ends a segment and a decoder that starts the next one.

With `P` an h x H projection with orthonormal rows (the identity path):

    encoder (sending stage):    b  = W_e RMSNorm(x) + P x           [B, T, h]   <- only this crosses
    decoder (receiving stage):  x' = W_d RMSNorm(b) + P^T b         [B, T, H]

`P^T P` is a rank-h identity carried across the boundary: h directions of the residual stream pass
unchanged and their gradient flows straight back, while `W_e` / `W_d` (2*H*h parameters) learn what
else to send. `P` is either a coordinate slice (the first h channels, as in the authors' IOTA code)
or a fixed random orthonormal basis; `identity="none"` drops it (the plain-autoencoder ablation).

Initialisation, and why it trains from step 0: W_e and W_d start at N(0, init_std) like every other
projection. The identity path alone already makes a fresh boundary pass h coordinates of the stream
through unchanged, so the stages after it see a signal and the stages before it get a gradient at
once; W_e and W_d then start small next to it instead of scrambling the stream. The decoder
normalises the code before W_d so the scale of what it writes does not depend on how large the
code grows during training; the encoder normalises x for the same reason (pre-norm, like a block).

The code can be cast to a narrower float dtype for the wire (`wire_dtype`, e.g. bf16 for an fp32
model); the decoder casts it back, and autograd returns the gradient in the wire dtype too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config

WIRE_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def orthonormal_rows(h: int, H: int, seed: int) -> torch.Tensor:
    """A fixed h x H matrix with orthonormal rows, the same on every rank for a given seed."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(H, h, generator=g))   # H x h, orthonormal columns
    return q.T.contiguous()


class IdentityPath(nn.Module):
    """P (project H -> h) and P^T (lift h -> H) for one boundary."""

    def __init__(self, kind: str, hidden: int, width: int, seed: int):
        super().__init__()
        self.kind, self.hidden, self.width = kind, hidden, width
        if kind == "orthonormal":
            # A buffer, saved with the layer: a checkpoint keeps the basis it was trained with.
            self.register_buffer("basis", orthonormal_rows(width, hidden, seed))

    def project(self, x):
        if self.kind == "slice":
            return x[..., : self.width]
        return F.linear(x, self.basis.to(x.dtype))

    def lift(self, b):
        if self.kind == "slice":
            return F.pad(b, (0, self.hidden - self.width))
        return b @ self.basis.to(b.dtype)


def _identity(cfg: Config, boundary: int) -> IdentityPath | None:
    kind = cfg.bottleneck.identity
    if kind == "none":
        return None
    return IdentityPath(kind, cfg.model.hidden_size, cfg.code_width, seed=cfg.seed + 7919 * (boundary + 1))


class BottleneckEncoder(nn.Module):
    """Last layer of a segment: hidden state [B, T, H] -> code [B, T, h] in the wire dtype."""

    def __init__(self, cfg: Config, boundary: int):
        super().__init__()
        H, h = cfg.model.hidden_size, cfg.code_width
        self.boundary = boundary
        self.norm = nn.RMSNorm(H, eps=cfg.model.norm_eps)
        self.proj = nn.Linear(H, h, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.model.init_std)
        self.identity = _identity(cfg, boundary)
        self.wire_dtype = WIRE_TORCH_DTYPES.get(cfg.bottleneck.wire_dtype)   # None = model dtype

    def forward(self, x):
        b = self.proj(self.norm(x))
        if self.identity is not None:
            b = b + self.identity.project(x)
        return b if self.wire_dtype is None else b.to(self.wire_dtype)


class BottleneckDecoder(nn.Module):
    """First layer of the next segment: code [B, T, h] -> hidden state [B, T, H]."""

    def __init__(self, cfg: Config, boundary: int):
        super().__init__()
        H, h = cfg.model.hidden_size, cfg.code_width
        self.boundary = boundary
        self.norm = nn.RMSNorm(h, eps=cfg.model.norm_eps)
        self.proj = nn.Linear(h, H, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.model.init_std)
        self.identity = _identity(cfg, boundary)

    def forward(self, b):
        b = b.to(self.proj.weight.dtype)
        x = self.proj(self.norm(b))
        if self.identity is not None:
            x = x + self.identity.lift(b)
        return x
