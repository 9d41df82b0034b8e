"""The pipeline's single-process twin: the same layers, from the same `layer_specs`, in one module.

A DeepSpeed pipeline checkpoint holds one file per layer, named by the layer's global index, so
`layers.XX` of this model is file XX whatever the stage count (export.py consolidates by a loop
over files). It is a plain `nn.Module`: no DeepSpeed engine or process group is needed to load or
run it, and a fresh one starts from the same weights as a fresh pipeline.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import TiedLayerSpec
from torch import nn

from ..config import ModelSpec
from .layers import tied_lm_head
from .local_ids import attach_local_ids
from .pipeline import layer_specs


class ResBMForCausalLM(nn.Module):
    """The whole ResBM model on one process: token ids [B, T] -> logits [B, T, vocab].

    `layers[i]` is global pipeline layer i. A tied head is an empty placeholder whose output is
    computed with the embedding's weight, so the weight exists (and is saved) once.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        # the run's Config where a loader knows it (export.load_model / consolidate): tools read its
        # data settings (generate's default text and seq_len); the layers never do
        self.trained_with = None
        self.tied_head: int | None = None
        layers = []
        with torch.random.fork_rng():
            for i, layer_spec in enumerate(layer_specs(spec)[0]):
                # The pipeline's per-layer seeds (seed_layers, base_seed=spec.seed): a fresh model
                # starts from the same weights as a fresh pipeline.
                torch.manual_seed(spec.seed + i)
                if isinstance(layer_spec, TiedLayerSpec) and layer_spec.forward_fn is not None:
                    self.tied_head = i
                    layers.append(nn.Identity())
                else:
                    layers.append(layer_spec.build())
        self.layers = nn.ModuleList(layers)
        self.local_ids = attach_local_ids(self)   # bottleneck.token_ids=local: the decoders read `ids`

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.local_ids is not None:
            self.local_ids.current = ids
        x = ids
        for i, layer in enumerate(self.layers):
            x = tied_lm_head(self.layers[0], x) if i == self.tied_head else layer(x)
        return x

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
