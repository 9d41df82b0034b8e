"""Optimizers: AdamW, or Muon for the hidden matrices plus AdamW for everything else.

Routing is by the module that owns a parameter, never by its name: pipeline layers are named
`0.weight`, `5.self_attn.q_proj.weight`, ..., so DeepSpeed's own rule (">= 2-D unless the name
contains 'embed' or 'lm_head'") would hand the token embedding (`0.weight`) and the LM head to Muon.

The Muon half is DeepSpeed's native `MuonWithAuxAdam`, passed to the engine as a client optimizer
with our own param groups and `param.use_muon` tags. It is the implementation that survives every
precision path we allow:
  - fp32, ZeRO-0: the engine calls it on the real 2-D parameters, and it runs Muon itself;
  - ZeRO-1 (fp32 or bf16): DeepSpeed flattens and shards each param group before any client
    optimizer sees it (a `torch.optim.Muon` there would get 1-D shards and refuse), and instead
    orthogonalises each whole gradient matrix while it builds the shard; the optimizer then only
    applies lr and weight decay.
What it cannot do is refused by `Config._validate_optimizer` rather than run degraded: bf16 at ZeRO-0
(BF16_Optimizer refuses Muon under a pipeline) and gradient clipping at ZeRO-1 (the clip lands on
the orthogonalised update and shrinks the Muon step, to about 2% of train.muon_lr on the test model). tests/test_optim.py checks each allowed combination
against torch.optim.Muon / the reference formula through the real engine.
"""
from __future__ import annotations

import torch
from torch import nn

from . import compat
from .model.boundary import BottleneckDecoder, BottleneckEncoder
from .model.layers import TransformerBlock

# Whose nn.Linear weights are "hidden matrices" in the Muon sense. Keller Jordan: Muon is for the
# hidden weight layers; embeddings, the output head, gains and biases stay on AdamW. Subclasses
# (the baselines' encoders/decoders and blocks) count too.
MUON_OWNERS = (TransformerBlock, BottleneckEncoder, BottleneckDecoder)
ADAM_EPS = 1e-8   # torch.optim.AdamW's default (MuonWithAuxAdam's own default would be 1e-10)


def muon_matrices(module: nn.Module) -> list[nn.Parameter]:
    """The weight of every nn.Linear inside a transformer block or a bottleneck encoder/decoder."""
    found = {}
    for owner in module.modules():
        if isinstance(owner, MUON_OWNERS):
            for sub in owner.modules():
                if isinstance(sub, nn.Linear) and sub.weight.requires_grad:
                    found[id(sub.weight)] = sub.weight
    return list(found.values())


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of Linear layers; none on embeddings, norms and biases."""
    decay, no_decay = [], []
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (decay if isinstance(sub, nn.Linear) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def count_every_stage_in_clip_norm(module: nn.Module):
    """Make DeepSpeed's fp32 ZeRO-0 gradient clipping use the norm over *all* pipeline stages.

    `deepspeed.runtime.utils.clip_grad_norm_` sums squared norms over the pipe group but counts a
    parameter only on stage 0 unless it is tagged `model_parallel` (a Megatron tensor-parallel rule),
    so every stage was clipped with stage 0's norm alone (measured: 1-8% off the reference update on
    the second step of a 2-stage run, for AdamW and Muon alike). Each stage owns distinct
    parameters, so tag them; a tied weight's copy on a later stage (`ds_pipe_replicated`) stays
    untagged and is counted once. Nothing else reads the tag when tensor parallelism is off: ZeRO-1
    and BF16_Optimizer already count every stage.
    """
    compat.tag_model_parallel(module.parameters())


def newton_schulz_dtype(method: str) -> str:
    """The dtype DeepSpeed runs Muon's Newton-Schulz in on this machine: `standard` in bf16; `gram`
    in fp16 where oneDNN has fp16 kernels (AVX512-FP16 / AMX-FP16 CPUs, and GPUs), else in fp32.
    The choice follows the CPU, so it is reported at start-up; ONEDNN_MAX_CPU_ISA=AVX2 pins gram to
    fp32 on any CPU (tests/test_optim.py measures both paths)."""
    from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype
    return str(ns_compute_dtype(method)).removeprefix("torch.")


def build_optimizer(cfg, module: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    count_every_stage_in_clip_norm(module)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(decay_groups(module, t.weight_decay), lr=t.lr, betas=t.betas,
                                 eps=ADAM_EPS)
    if t.optimizer == "sgd":   # no momentum: the update is linear in the gradient (DiLoCo at H=1 is DP)
        return torch.optim.SGD(decay_groups(module, t.weight_decay), lr=t.lr)
    # Imported here: importing DeepSpeed's Muon pulls in its torch.compile'd kernels.
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    matrices = muon_matrices(module)
    muon_ids = {id(p) for p in matrices}
    compat.tag_use_muon(module.parameters(), muon_ids)   # DeepSpeed's ZeRO-1 reads the tag on every parameter
    others = [p for p in module.parameters() if p.requires_grad and id(p) not in muon_ids]
    # Exactly two groups, both non-empty on every pipeline stage (each stage holds blocks and norms):
    # ZeRO-1 all-reduces one grad norm per param group across the stages, so stages with different
    # group counts deadlock (measured: a separate no-decay group did, as only the last stage has a
    # decayed AdamW matrix). One AdamW group therefore has one weight decay, on every AdamW
    # parameter - Moonlight's recipe (github.com/MoonshotAI/Moonlight) does the same.
    # AdamW first: engine.get_lr() reports group 0, so the logged lr follows train.lr.
    groups = [dict(params=others, use_muon=False, lr=t.lr, betas=t.betas, eps=ADAM_EPS,
                   weight_decay=t.weight_decay),
              dict(params=matrices, use_muon=True, lr=t.muon_lr, momentum=t.muon_momentum,
                   weight_decay=t.muon_weight_decay, ns_method=t.muon_ns_method)]
    # adam_optimizer=None: the AdamW half is MuonWithAuxAdam's inline update (torch AdamW's formula,
    # decoupled weight decay), which also runs on ZeRO's flat shards.
    return MuonWithAuxAdam(groups, adam_optimizer=None, adam_w_mode=True)
