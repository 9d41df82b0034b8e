"""Optimizer construction: parameter groups by module role, not by name patterns."""
from __future__ import annotations

import torch
from torch import nn


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


def build_optimizer(cfg, module: nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer != "adamw":
        raise ValueError(f"train.optimizer={t.optimizer!r}: allowed: ['adamw']")
    return torch.optim.AdamW(decay_groups(module, t.weight_decay), lr=t.lr, betas=t.betas)
