"""The ResBM boundary: an encoder that ends a segment and a decoder that starts the next one.

With `P` an h x H projection with orthonormal rows (the identity path):

    encoder (sending stage):    b  = W_e RMSNorm(x) + P x                  [B, T, h]  <- crosses
    decoder (receiving stage):  x' = D(RMSNorm(b)) + P^T b (+ T[ids])      [B, T, H]

`P^T P` is a rank-h identity carried across the boundary: h directions of the residual stream pass
unchanged and their gradient flows straight back, while `W_e` and the decoder `D` learn what else to
send. `P` is a coordinate slice (the first h channels, as in the authors' IOTA code) or a fixed
random orthonormal basis; `identity="none"` drops it (the plain-autoencoder ablation).

Switches (bottleneck.*), all on the same layer layout:
  init=identity (default)  W_e and the last matrix of D start at zero, so a fresh boundary computes
                           exactly `P^T P x` and all of the gradient that reaches the sender at step 0
                           goes through the identity path. Why: at init the stream's RMS is about
                           init_std (0.02-0.05) while RMSNorm(x) has RMS 1, so N(0, init_std) weights
                           make `W_e RMSNorm(x)` ~10x larger than `P x` (measured 0.43 vs 0.055 on
                           the paper-cpu model): a fresh boundary was mostly a random projection, and
                           the next segment started from noise instead of the stream.
                           With identity=none there is no identity to start from (zero W_e and W_d
                           would stay zero: neither gets a gradient), so that ablation starts as
                           init=normal.
  init=normal              N(0, init_std) for W_e and D, the paper's/IOTA's initialisation.
                           Without an identity path (identity=none here, and bottleneck-noskip) the
                           sending segment is read only through a norm, which is blind to the
                           stream's scale. With the token embedding at N(0, 0.02), AdamW moves every
                           embedding row the same way while the unigram is learned, and within ~10
                           steps 78-91% of the stream entering the encoder is one direction shared by
                           every token: the code becomes a constant that carries the unigram, and
                           the gradient into the first segment falls ~1000x (measured in plain
                           torch at lr 3e-3, h=2: results/diagnostics); lr 1e-3 does not prevent it (no-skip, 100 steps).
                           With model.embed_std=1 the shared direction stays at 1-3% of the stream
                           over the first 50 steps and the gradient reaches the first segment; the
                           convergence suite uses it for these boundaries. They then learn, slowly.
  decoder=linear (default) D = W_d (h -> H). The decoder is then linear up to the per-token norm.
  decoder=mlp              D = W_2 silu(W_1 .) with width decoder_width (default H), as IOTA's
                           nonlinear decoder: the next segment's stream is no longer confined to a
                           2h-dimensional subspace.
  decoder_norm=rms|none    D reads RMSNorm(b) (default), or b itself. The norm of a tiny code keeps only
                           its direction (sign(b) at h=1) while the identity path carries b. `none`
                           is what the boundaries without an identity path use (the convergence suite's
                           no-skip and identity=none runs); for ResBM it is an ablation with no
                           committed measurement.
  token_channel            The decoder gets the token ids (read on its own stage by default, or
                           sent with the code: token_ids below) and adds a table lookup
                           T[ids] computed on the receiving stage, so the h code values need not
                           carry token identity: `learned` (a V x H table local to the stage, zero
                           under init=identity), `frozen` (a seeded N(0, init_std) buffer: no optimizer state),
                           `lowrank` (A B with A [V, r] and B [r, H], B zero at init), `hashed` (a
                           learned table of B = token_buckets rows x H, whatever V, read at a universal
                           hash of the id, ((a id + c) mod p) mod B, with a and c drawn per boundary
                           from the seed, so two ids that share a row at one boundary most likely do
                           not at the next; a vocabulary of at most B ids gets V rows, read at the id).
                           Never tied to the input embedding, which would all-reduce V x H across
                           stages every step.
  token_ids=sent|local     How the decoders get the ids: sent with the code (int16 where the vocabulary
                           fits, else int32; counted by the meter), or local (auto's choice): nothing
                           but the code crosses, and each decoder reads the ids of the micro-batch its
                           stage is computing from its own copy of the data (model/local_ids.py), so
                           the ids cost 0 bytes and the same function is computed.

The code can be cast to a narrower float dtype for the wire (`wire_dtype`, e.g. bf16 for an fp32
model); the decoder casts it back, and autograd returns the gradient in the wire dtype too.

When ids are sent, the layers of every segment but the last pass `(hidden, ids)` tuples (DeepSpeed's
pipeline sends a stage's whole output; integer tensors travel without gradient), and the last
decoder returns the hidden state alone.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelSpec
from .layers import TokenEmbedding, TransformerBlock

TABLE_SEED_OFFSET = 611_953      # frozen token tables: randn from (seed + this + boundary)
HASH_PRIME = 2_147_483_647       # 2^31 - 1, above any vocabulary: the hashed table's modulus


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


def _identity(spec: ModelSpec, boundary: int) -> IdentityPath | None:
    kind = spec.bottleneck.identity
    if kind == "none":
        return None
    return IdentityPath(kind, spec.model.hidden_size, spec.code_width, seed=spec.seed + 7919 * (boundary + 1))


def _init_weight(weight: torch.Tensor, spec: ModelSpec, table: bool = False):
    """The weight that writes into the code or the stream: zero under init=identity (if there is an
    identity path to start from; see the module docstring), unless it is a token table and
    bottleneck.table_init=normal."""
    b = spec.bottleneck
    if b.init == "identity" and b.identity != "none" and not (table and b.table_init == "normal"):
        nn.init.zeros_(weight)
    else:
        nn.init.normal_(weight, std=spec.model.init_std)


class BottleneckEncoder(nn.Module):
    """Last layer of a segment: hidden state [B, T, H] -> code [B, T, h] in the wire dtype
    (with a token channel: (x, ids) -> (code, ids)). `codec_roundtrip`, set by the engine on a
    boundary that crosses no stage (engine.codec_inside_stages), is the wire codec's encode-decode
    with its straight-through gradient, so that boundary computes what it would across stages."""

    codec_roundtrip = None

    def __init__(self, spec: ModelSpec, boundary: int):
        super().__init__()
        H, h = spec.model.hidden_size, spec.code_width
        self.boundary = boundary
        self.norm = nn.RMSNorm(H, eps=spec.model.norm_eps)
        self.proj = nn.Linear(H, h, bias=False)
        _init_weight(self.proj.weight, spec)
        self.identity = _identity(spec, boundary)
        self.wire_dtype = spec.wire_dtype
        self.carries_ids = spec.sends_token_ids

    def encode(self, x):
        b = self.proj(self.norm(x))
        if self.identity is not None:
            b = b + self.identity.project(x)
        b = b if self.wire_dtype is None else b.to(self.wire_dtype)
        return b if self.codec_roundtrip is None else self.codec_roundtrip(b)

    def forward(self, inputs):
        if self.carries_ids:
            x, ids = inputs
            return self.encode(x), ids
        return self.encode(inputs)


class TokenTable(nn.Module):
    """T[ids] [B, T, H] for the token channel, local to the receiving stage (see module docstring)."""

    def __init__(self, spec: ModelSpec, boundary: int):
        super().__init__()
        m, kind = spec.model, spec.token_channel
        self.kind = kind
        if kind == "learned":
            self.weight = nn.Parameter(torch.empty(m.vocab_size, m.hidden_size))
            _init_weight(self.weight, spec, table=True)
        elif kind == "frozen":
            g = torch.Generator().manual_seed(spec.seed + TABLE_SEED_OFFSET + boundary)
            self.register_buffer("weight", torch.randn(m.vocab_size, m.hidden_size, generator=g) * m.init_std)
        elif kind == "lowrank":
            r = spec.bottleneck.token_rank
            self.coords = nn.Parameter(torch.randn(m.vocab_size, r) / r ** 0.5)
            self.basis = nn.Parameter(torch.empty(r, m.hidden_size))
            _init_weight(self.basis, spec, table=True)
        elif kind == "hashed":
            # a vocabulary that fits in the table needs no hash: one row per id, as `learned`
            self.buckets = min(spec.bottleneck.token_buckets, m.vocab_size)
            self.hashes = spec.bottleneck.token_buckets < m.vocab_size
            draw = random.Random(spec.seed + TABLE_SEED_OFFSET + boundary)
            self.hash_a, self.hash_c = draw.randrange(1, HASH_PRIME), draw.randrange(HASH_PRIME)
            self.weight = nn.Parameter(torch.empty(self.buckets, m.hidden_size))
            _init_weight(self.weight, spec, table=True)
        else:
            raise ValueError(f"bottleneck.token_channel={kind!r}")

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The table row of each id: the id itself, or its bucket for `hashed` (int64 holds a * id)."""
        ids = ids.long()
        if self.kind == "hashed" and self.hashes:
            return (ids * self.hash_a + self.hash_c) % HASH_PRIME % self.buckets
        return ids

    def forward(self, ids):
        ids = self.rows(ids)
        if self.kind == "lowrank":
            return F.embedding(ids, self.coords) @ self.basis
        return F.embedding(ids, self.weight)


class LocalIdsReader(nn.Module):
    """A layer that adds T[ids] and, with bottleneck.token_ids=local, reads the ids from `local_ids`
    (set by model/local_ids.attach_local_ids) instead of receiving them in its input."""

    local_ids = None

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.reads_local_ids = spec.token_channel != "none" and spec.token_ids == "local"

    def split_ids(self, inputs):
        """(stream, ids): the ids from the input tuple, or those of the micro-batch being computed."""
        if not self.reads_local_ids:
            return inputs
        if self.local_ids is None or self.local_ids.current is None:
            raise RuntimeError("bottleneck.token_ids=local, but no token ids were set for this forward "
                               "(model/local_ids.py)")
        return inputs, self.local_ids.current


class BottleneckDecoder(LocalIdsReader):
    """First layer of the next segment: code [B, T, h] -> hidden state [B, T, H]
    (with a token channel: (code, ids) -> (x, ids), or x alone after the last boundary; with local
    ids: code -> x)."""

    def __init__(self, spec: ModelSpec, boundary: int):
        super().__init__(spec)
        b = spec.bottleneck
        H, h = spec.model.hidden_size, spec.code_width
        self.boundary = boundary
        # RMSNorm over the h code values keeps only their direction: for h=1 that is sign(b), for h=2 an
        # angle. decoder_norm=none hands D the code itself (the identity path always carries b).
        self.norm = nn.RMSNorm(h, eps=spec.model.norm_eps) if b.decoder_norm == "rms" else nn.Identity()
        if b.decoder == "mlp":
            width = b.decoder_width or H
            self.up = nn.Linear(h, width, bias=False)
            nn.init.normal_(self.up.weight, std=spec.model.init_std)
            self.proj = nn.Linear(width, H, bias=False)
        else:
            self.up = None
            self.proj = nn.Linear(h, H, bias=False)
        _init_weight(self.proj.weight, spec)
        self.identity = _identity(spec, boundary)
        self.tokens = TokenTable(spec, boundary) if spec.token_channel != "none" else None
        self.last = boundary == b.segments - 2 or self.reads_local_ids   # local: no ids to pass on

    def decode(self, b):
        b = b.to(self.proj.weight.dtype)
        z = self.norm(b)
        x = self.proj(z if self.up is None else F.silu(self.up(z)))
        if self.identity is not None:
            x = x + self.identity.lift(b)
        return x

    def forward(self, inputs):
        if self.tokens is None:
            return self.decode(inputs)
        b, ids = self.split_ids(inputs)
        x = self.decode(b) + self.tokens(ids).to(self.proj.weight.dtype)
        return x if self.last else (x, ids)


# ---- the layers around the boundaries when token ids travel with the stream ----------------------

class EmbeddingWithIds(TokenEmbedding):
    """Token ids [B, T] -> (x0 [B, T, H], ids in the wire's id dtype)."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec.model)
        self.id_dtype = spec.id_dtype

    def forward(self, ids):
        return super().forward(ids), ids.to(self.id_dtype)


class BlockWithIds(TransformerBlock):
    """A Llama block on (hidden, ids) tuples: the ids pass through untouched."""

    def __init__(self, spec: ModelSpec, layer_id: int = 0):
        super().__init__(spec.model, layer_id)

    def forward(self, inputs):
        x, ids = inputs
        return super().forward(x), ids


class TokenTableLayer(LocalIdsReader):
    """The control for the token channel on an uncompressed model (method=none): at each boundary
    position the stream gets the same local table, x + T[ids], and nothing is compressed."""

    def __init__(self, spec: ModelSpec, boundary: int):
        super().__init__(spec)
        self.boundary = boundary
        self.tokens = TokenTable(spec, boundary)
        self.last = boundary == spec.bottleneck.segments - 2 or self.reads_local_ids

    def forward(self, inputs):
        x, ids = self.split_ids(inputs)
        x = x + self.tokens(ids).to(x.dtype)
        return x if self.last else (x, ids)
