"""Baseline boundary methods, selectable as `bottleneck.method`, on the same pipeline and stage cuts.

Every method uses the layer layout of `pipeline.layer_specs` (embed | blocks.. E | D blocks.. | norm
head, a stage cut right after each encoder E); only what E, D and the layers around them compute
changes.

`bottleneck-noskip`: the SWARM bottleneck (Ryabinin et al. 2023), REPLACING the residual stream at
the boundary, no identity path:

    encoder (sending stage):    b  = W_e LayerNorm(x) + c_e        [B, T, h]   <- only this crosses
    decoder (receiving stage):  x' = W_d LayerNorm(b) + c_d        [B, T, H]

SWARM's own code (FFBottleneck) puts the second LayerNorm before the wire (ahead of its 8-bit
quantiser); here it sits on the receiver, so the raw code crosses - the same function, the same
bytes. Linear layers carry biases and LayerNorms their affine parameters, as in SWARM. Every
gradient that reaches the sender passes through W_e (and LayerNorm); compare `resbm`, whose
identity path carries h directions of the stream across unchanged. `resbm` with `identity=none` is
the closest ResBM ablation (RMSNorm, no biases); both are kept.

`subspace`: Subspace Models (Ramasinghe et al., NeurIPS 2025; PluralisResearch/ProtocolNanoGPT), as
published. One fixed orthonormal basis U (H x k, k = bottleneck.width or hidden/ratio) from one seed,
the same in every layer and on every rank. With a frozen random full-rank token table F [V, H]:

    embedding:   x0 = U Z_E[tok] + F[tok]                 (Z_E [V, k] is the trainable embedding)
    block:       x += RMSNorm0(U Z_o attn(norm(x)));  x += RMSNorm0(U Z_d ffn(norm(x)))
    encoder:     c  = U^T (x - F[tok])                    [B, T, k] and the ids [B, T] cross
    decoder:     x  = U c + F[tok]

o_proj / down_proj / the trainable embedding are reparametrised, W = U Z with Z the parameter
(`SubspaceLinear`), so their outputs lie in span(U) exactly at every step, whatever the optimizer
does to Z (no projection after steps). RMSNorm0 is a norm on the sublayer output WITHOUT per-channel
gain (a per-token scalar keeps span(U); a gain would not); the blocks' input norms keep their gain,
they only feed the sublayer. So x - F[tok] stays in span(U) through every constrained layer and the
decoder rebuilds x exactly (up to float rounding). The last segment (after the last boundary) is an
ordinary, unconstrained Llama segment: the last decoder drops the ids and plain `TransformerBlock`s,
the final norm and the LM head follow.

Since DeepSpeed's pipeline sends a stage's last output (a tensor or a tuple of tensors; integer
tensors travel without gradient), the layers of constrained segments pass `(hidden, token_ids)`
tuples. The ids travel as int16 where the vocabulary fits (else int32), so one boundary crossing
costs k floats + 2 bytes per token forward and k floats backward
(`Config.wire_bytes_per_token`; `Config.compression_ratio` counts the id channel in bytes).

U, F (and F U) are persistent buffers of the layers that use them, so a checkpoint carries the basis
and table it was trained with; they are generated from `seed` with their own generator, never from
the per-layer seeds. Cost: one [V, H] table in the embedding and in each decoder.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .boundary import BottleneckDecoder, BottleneckEncoder, orthonormal_rows
from ..config import ModelSpec
from .layers import TransformerBlock, init_linear

BASELINE_METHODS = ("bottleneck-noskip", "subspace")
BASIS_SEED_OFFSET = 104_729       # U = basis(seed + this), shared by every layer
TABLE_SEED_OFFSET = 130_363       # F = randn(V, H) from (seed + this)


# ---- bottleneck-noskip (SWARM) -----------------------------------------------------------------

class NoSkipEncoder(BottleneckEncoder):
    """Last layer of a segment: LayerNorm -> Linear H->h (with bias); the code replaces the stream.

    A `BottleneckEncoder` with no identity path, SWARM's LayerNorm and a biased projection; it
    inherits the forward (`proj(norm(x))`, cast to the wire dtype) and the optimizer routing
    (its weight is a hidden matrix for Muon, like ResBM's)."""

    def __init__(self, spec: ModelSpec, boundary: int):
        super().__init__(spec, boundary)
        H, h = spec.model.hidden_size, spec.code_width
        self.norm = nn.LayerNorm(H, eps=spec.model.norm_eps)
        self.proj = nn.Linear(H, h, bias=True)
        init_linear(self.proj, spec.model.init_std)
        self.identity = None


class NoSkipDecoder(BottleneckDecoder):
    """First layer of the next segment: code -> LayerNorm -> Linear h->H (with bias)."""

    def __init__(self, spec: ModelSpec, boundary: int):
        super().__init__(spec, boundary)
        H, h = spec.model.hidden_size, spec.code_width
        # SWARM's LayerNorm over the h code values keeps h - 1 degrees of freedom (at h=2: one bit per
        # token); decoder_norm=none reads the code itself
        self.norm = nn.LayerNorm(h, eps=spec.model.norm_eps) if spec.bottleneck.decoder_norm == "rms" else nn.Identity()
        self.proj = nn.Linear(h, H, bias=True)
        init_linear(self.proj, spec.model.init_std)
        self.identity = None


# ---- subspace ------------------------------------------------------------------------------------

# Cached on the CPU whatever the default device: a model first counted under torch.device("meta")
# (model/accounting.py) must not leave meta tensors here for the real model built next.
@functools.lru_cache(maxsize=4)
def _basis(hidden: int, k: int, seed: int) -> torch.Tensor:
    with torch.device("cpu"):
        return orthonormal_rows(k, hidden, seed).T.contiguous()          # H x k, orthonormal columns


@functools.lru_cache(maxsize=2)
def _table(vocab: int, hidden: int, seed: int) -> torch.Tensor:
    with torch.device("cpu"):
        return torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(seed))


def subspace_basis(spec: ModelSpec) -> torch.Tensor:
    """U [H, k]: the one orthonormal basis every constrained layer of the model uses (a fresh copy)."""
    return _basis(spec.model.hidden_size, spec.code_width, spec.seed + BASIS_SEED_OFFSET).clone()


def fixed_table(spec: ModelSpec) -> torch.Tensor:
    """F [V, H]: the frozen random full-rank token table added to the stream (a fresh copy)."""
    return _table(spec.model.vocab_size, spec.model.hidden_size, spec.seed + TABLE_SEED_OFFSET).clone()


def off_subspace(matrix: torch.Tensor, basis: torch.Tensor) -> float:
    """||(I - U U^T) M|| / ||M||: how far the columns of M [H, n] are from span(U) (0 = inside)."""
    m = matrix.detach().double()
    u = basis.detach().double()
    return float(torch.linalg.norm(m - u @ (u.T @ m)) / torch.linalg.norm(m).clamp_min(1e-300))


class SubspaceLinear(nn.Linear):
    """y = U (Z x): a bias-free Linear whose full weight W = U Z [out=H, in] lies in span(U) by
    construction. The parameter `weight` is the coordinate matrix Z [k, in], so it is an
    `nn.Linear` weight for the optimizer (weight decay; Muon on Z, which with orthonormal U is
    Muon on W restricted to the subspace) while every optimizer step keeps W inside span(U)."""

    def __init__(self, in_features: int, basis: torch.Tensor, std: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, basis.shape[0]
        self.weight = nn.Parameter(torch.empty(basis.shape[1], in_features))
        self.register_parameter("bias", None)
        self.register_buffer("basis", basis.clone())
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x):
        return F.linear(F.linear(x, self.weight), self.basis.to(x.dtype))

    @property
    def full_weight(self) -> torch.Tensor:
        """W = U Z [H, in]."""
        return self.basis.to(self.weight.dtype) @ self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.weight.shape[0]} (W = U Z)"


class SubspaceEmbedding(nn.Module):
    """Token ids [B, T] -> (x0 = U Z_E[tok] + F[tok] [B, T, H], ids as int32 [B, T])."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        m = spec.model
        self.weight = nn.Parameter(torch.empty(m.vocab_size, spec.code_width))   # Z_E
        nn.init.normal_(self.weight, mean=0.0, std=m.init_std)
        self.register_buffer("basis", subspace_basis(spec))
        self.register_buffer("fixed", fixed_table(spec))
        self.id_dtype = spec.id_dtype

    def forward(self, ids):
        z = F.embedding(ids, self.weight)
        x = z.to(self.basis.dtype) @ self.basis.T + F.embedding(ids, self.fixed)
        return x.to(z.dtype), ids.to(self.id_dtype)

    @property
    def full_weight(self) -> torch.Tensor:
        """The trainable embedding as a [H, V] matrix of columns U Z_E[v] (all in span(U))."""
        return self.basis.to(self.weight.dtype) @ self.weight.T


class SubspaceBlock(TransformerBlock):
    """A Llama block of a constrained segment, on (hidden, ids) tuples: o_proj and down_proj are
    `SubspaceLinear`s and each sublayer output passes a gain-less RMSNorm before it joins the stream."""

    def __init__(self, spec: ModelSpec, layer_id: int = 0):
        super().__init__(spec.model, layer_id)
        m = spec.model
        basis = subspace_basis(spec)
        out_std = m.init_std / math.sqrt(2 * m.num_layers)   # as TransformerBlock's output projections
        self.self_attn.o_proj = SubspaceLinear(m.num_heads * m.head_dim, basis, out_std)
        self.mlp.down_proj = SubspaceLinear(m.ffn_size, basis, out_std)
        self.attn_output_norm = nn.RMSNorm(m.hidden_size, eps=m.norm_eps, elementwise_affine=False)
        self.mlp_output_norm = nn.RMSNorm(m.hidden_size, eps=m.norm_eps, elementwise_affine=False)

    def forward(self, inputs):
        x, ids = inputs
        x = x + self.attn_output_norm(self.self_attn(self.input_layernorm(x)))
        return x + self.mlp_output_norm(self.mlp(self.post_attention_layernorm(x))), ids


class SubspaceEncoder(nn.Module):
    """Last layer of a constrained segment: (x, ids) -> (c = U^T (x - F[tok]) [B, T, k], ids).

    U^T F[tok] is read from the precomputed [V, k] table F U, so the encoder needs no [V, H] copy.
    Encoder and decoder compute in their buffers' dtype (DeepSpeed keeps buffers fp32 when it casts
    the parameters to bf16) and cast the result, so the round trip adds no bf16 rounding of F."""

    def __init__(self, spec: ModelSpec, boundary: int):
        super().__init__()
        self.boundary = boundary
        basis = subspace_basis(spec)
        self.register_buffer("basis", basis)
        self.register_buffer("fixed_coords", fixed_table(spec) @ basis)   # F U [V, k]
        self.wire_dtype = spec.wire_dtype   # None = model dtype

    codec_roundtrip = None                  # as BottleneckEncoder's

    def forward(self, inputs):
        x, ids = inputs
        c = x.to(self.basis.dtype) @ self.basis - F.embedding(ids.long(), self.fixed_coords)
        c = c.to(self.wire_dtype or x.dtype)
        return (c if self.codec_roundtrip is None else self.codec_roundtrip(c)), ids


class SubspaceDecoder(nn.Module):
    """First layer of the next segment: (c, ids) -> x = U c + F[tok]; the last boundary's decoder
    returns x alone (the unconstrained last segment needs no ids), the others (x, ids)."""

    def __init__(self, spec: ModelSpec, boundary: int):
        super().__init__()
        self.boundary = boundary
        self.last = boundary == spec.bottleneck.segments - 2
        self.register_buffer("basis", subspace_basis(spec))
        self.register_buffer("fixed", fixed_table(spec))
        # The stream's dtype: the code's, unless bottleneck.wire_dtype changed it on the way.
        self.stream_dtype = None if spec.wire_dtype is None else spec.model_dtype

    def forward(self, inputs):
        c, ids = inputs
        x = c.to(self.basis.dtype) @ self.basis.T + F.embedding(ids.long(), self.fixed)
        x = x.to(self.stream_dtype or c.dtype)
        return x if self.last else (x, ids)


# ---- layer lists ---------------------------------------------------------------------------------

def baseline_layers(spec: ModelSpec) -> dict:
    """The layer classes a baseline method puts into `pipeline.layer_specs`' layout (same cuts)."""
    if spec.bottleneck.method == "subspace":
        return dict(encoder=SubspaceEncoder, decoder=SubspaceDecoder, embedding=SubspaceEmbedding,
                    block=SubspaceBlock)
    if spec.bottleneck.method == "bottleneck-noskip":
        return dict(encoder=NoSkipEncoder, decoder=NoSkipDecoder)
    raise ValueError(f"bottleneck.method={spec.bottleneck.method!r} is not a baseline method {BASELINE_METHODS}")
