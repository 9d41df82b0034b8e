"""A Llama-style decoder-only transformer, one `nn.Module` per pipeline layer.

Each class here is used as a DeepSpeed `LayerSpec`: the pipeline calls `layer(x)` with the previous
layer's output, so every forward takes and returns one tensor. Positions and the causal mask are
computed where they are needed (RoPE tables, `is_causal=True`), never sent between stages.
Module names follow Hugging Face's Llama (`self_attn.q_proj`, `mlp.gate_proj`, ...) so that weights
map one-to-one.

Generation (hf/modeling.py) needs what a pipeline never does: a KV cache, positions that do not
start at 0, and padding. The layer interface stays one tensor in, one out; for the length of one
forward, the caller hands each `Attention` a `Decoding` (see `decoding()`), and attention without
one is the training path, unchanged.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import ModelConfig


def init_linear(linear: nn.Linear, std: float):
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class TokenEmbedding(nn.Embedding):
    """Token ids [B, T] -> hidden states [B, T, H]. Its `weight` is shared with a tied LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.vocab_size, cfg.hidden_size)
        nn.init.normal_(self.weight, mean=0.0, std=cfg.init_std if cfg.embed_std is None else cfg.embed_std)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)           # Llama's "rotate half" layout
    return emb.cos(), emb.sin()


def rope_at(head_dim: int, positions: torch.Tensor, theta: float):
    """cos/sin [B, 1, T, head_dim] at explicit positions [B, T] (equal to rope_tables' rows)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


@dataclass
class Decoding:
    """One forward's generation state for one attention layer.

    cache:     a transformers `Cache` (keys/values of earlier tokens, appended to by this forward),
               or None; `layer_idx` is this layer's slot in it.
    positions: the new tokens' positions [B, T] (RoPE).
    mask:      bool [B, 1, T, T_past + T], True = may attend; None = plain causal (no padding, and
               either no past or a single new token).
    """
    cache: object | None
    layer_idx: int
    positions: torch.Tensor
    mask: torch.Tensor | None


@contextlib.contextmanager
def decoding(attentions, cache, positions, mask):
    """Give every Attention in `attentions` (in cache-slot order) its Decoding for one forward."""
    for i, attn in enumerate(attentions):
        attn.decoding = Decoding(cache, i, positions, mask)
    try:
        yield
    finally:
        for attn in attentions:
            attn.decoding = None


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query attention (SDPA does the GQA broadcast)."""

    decoding: Decoding | None = None      # set only for the length of one generation forward

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self._rope = None   # (seq_len, cos, sin), rebuilt when the length or device changes

    def rope(self, seq_len, device):
        if self._rope is None or self._rope[0] != seq_len or self._rope[1].device != device:
            self._rope = (seq_len, *rope_tables(self.head_dim, seq_len, self.rope_theta, device))
        return self._rope[1], self._rope[2]

    def forward(self, x):
        heads = "b t (h d) -> b h t d"
        q = rearrange(self.q_proj(x), heads, h=self.n_heads)
        k = rearrange(self.k_proj(x), heads, h=self.n_kv)
        v = rearrange(self.v_proj(x), heads, h=self.n_kv)
        d = self.decoding
        if d is None:
            cos, sin = self.rope(x.shape[1], x.device)
        else:
            cos, sin = rope_at(self.head_dim, d.positions, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if d is not None:
            if d.cache is not None:
                k, v = d.cache.update(k, v, d.layer_idx)
            # Without a mask: causal when the new tokens are all there is, none for one new token
            # (it may see every cached one).
            mask, causal = d.mask, d.mask is None and q.shape[2] == k.shape[2]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        # GPT-2 style: output projections scaled down so the residual stream grows slowly with depth.
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        for lin in (self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj,
                    self.mlp.gate_proj, self.mlp.up_proj):
            init_linear(lin, cfg.init_std)
        for lin in (self.self_attn.o_proj, self.mlp.down_proj):
            init_linear(lin, out_std)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class FinalNorm(nn.RMSNorm):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, eps=cfg.norm_eps)


class LMHead(nn.Module):
    """Untied output projection H -> vocab."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        init_linear(self.lm_head, cfg.init_std)

    def forward(self, x):
        return self.lm_head(x)


def tied_lm_head(embedding: TokenEmbedding, x):
    """forward_fn of the tied head: reuse the embedding matrix as the output projection."""
    return F.linear(x, embedding.weight)


def lm_loss(logits, labels):
    """Mean next-token cross-entropy, computed in fp32 whatever the model dtype."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))
