"""The model as a flat list of DeepSpeed `LayerSpec`s, and a `PipelineModule` cut at the bottlenecks.

Layer list for `segments` = 3 (E = encoder, D = decoder):

    embed | blocks... E | D blocks... E | D blocks... | final_norm head
            segment 0       segment 1       segment 2

The bottleneck positions belong to the model; a launch with S pipeline stages (S divides the
number of segments) cuts after the encoders of every (segments/S)-th boundary, so only codes cross
stages. With fewer stages some boundaries sit inside a stage and cost nothing on the wire; the
global layer indices (and so checkpoint layer files and per-layer init seeds) are the same for every
S, which is what lets a checkpoint trained on one layout load into another.
"""
from __future__ import annotations

from dataclasses import dataclass

from deepspeed.pipe import LayerSpec, TiedLayerSpec

from ..compat import PipelineModuleCutAt
from .baselines import baseline_layers
from .boundary import (BlockWithIds, BottleneckDecoder, BottleneckEncoder, EmbeddingWithIds,
                         TokenTableLayer)
from ..config import ModelSpec
from .layers import FinalNorm, LMHead, TokenEmbedding, TransformerBlock, lm_loss, tied_lm_head
from .local_ids import attach_local_ids


def segment_sizes(num_layers: int, segments: int) -> list[int]:
    """Blocks per segment, as even as possible (earlier segments get the remainder)."""
    base, extra = divmod(num_layers, segments)
    return [base + (i < extra) for i in range(segments)]


@dataclass(frozen=True)
class Boundary:
    """The layers a boundary method contributes; None = the plain Llama layer (or nothing)."""
    encoder: type | None                 # (spec, boundary) -> layer ending a segment
    decoder: type | None                 # (spec, boundary) -> layer starting the next segment
    embedding: type | None = None        # (spec) -> first layer; None = TokenEmbedding
    block: type | None = None            # (spec, block_id) -> blocks before the last boundary


def boundary_layers(spec: ModelSpec) -> Boundary:
    method, ids = spec.bottleneck.method, spec.token_channel != "none"
    # the layers before the last boundary pass the ids on only when they cross (bottleneck.token_ids)
    with_ids = dict(embedding=EmbeddingWithIds, block=BlockWithIds) if spec.sends_token_ids else {}
    if method == "resbm":
        return Boundary(BottleneckEncoder, BottleneckDecoder, **with_ids)
    if method == "none":   # uncompressed; with a token channel, the control (same tables, no code)
        return Boundary(None, TokenTableLayer if ids else None, **with_ids)
    return Boundary(**baseline_layers(spec))        # bottleneck-noskip, subspace: model/baselines.py


def layer_specs(spec: ModelSpec) -> tuple[list, list[int]]:
    """The model's layers in order, and the index just after each segment (where a cut may go)."""
    m, kit = spec.model, boundary_layers(spec)
    # the embedding class and its argument (the baselines' and the token channel's take the ModelSpec)
    embedding, embedding_arg = (kit.embedding, spec) if kit.embedding is not None else (TokenEmbedding, m)
    if m.tie_embeddings:
        specs = [TiedLayerSpec("embed", embedding, embedding_arg, tied_weight_attr=["weight"])]
    else:
        specs = [LayerSpec(embedding, embedding_arg)]
    segment_ends, block_id = [], 0
    sizes = segment_sizes(m.num_layers, spec.bottleneck.segments)
    for seg, n_blocks in enumerate(sizes):
        last = seg == len(sizes) - 1
        if seg > 0 and kit.decoder is not None:
            specs.append(LayerSpec(kit.decoder, spec, seg - 1))
        for _ in range(n_blocks):
            if kit.block is not None and not last:
                specs.append(LayerSpec(kit.block, spec, block_id))
            else:
                specs.append(LayerSpec(TransformerBlock, m, block_id))
            block_id += 1
        if not last and kit.encoder is not None:
            specs.append(LayerSpec(kit.encoder, spec, seg))
        segment_ends.append(len(specs))
    specs.append(LayerSpec(FinalNorm, m))
    if m.tie_embeddings:
        specs.append(TiedLayerSpec("embed", embedding, embedding_arg, forward_fn=tied_lm_head,
                                   tied_weight_attr=["weight"]))
    else:
        specs.append(LayerSpec(LMHead, m))
    return specs, segment_ends


def stage_parts(spec: ModelSpec, num_stages: int) -> list[int]:
    """DeepSpeed's `parts`: layer index where each stage starts, plus the total at the end."""
    specs, segment_ends = layer_specs(spec)
    per_stage = spec.bottleneck.segments // num_stages
    cuts = [segment_ends[per_stage * s - 1] for s in range(1, num_stages)]
    return [0, *cuts, len(specs)]


class ResBMPipeline(PipelineModuleCutAt):
    """A `PipelineModule` whose stage cuts fall exactly between each encoder and its decoder
    (`stage_parts`; compat.PipelineModuleCutAt makes DeepSpeed cut there)."""

    def __init__(self, spec: ModelSpec, topology, **kwargs):
        self.resbm_spec = spec
        specs, _ = layer_specs(spec)
        super().__init__(layers=specs, topology=topology, loss_fn=lm_loss,
                         partition_method="resbm", seed_layers=True, base_seed=spec.seed, **kwargs)
        self.local_ids = attach_local_ids(self)   # token_ids=local: fed by local_ids.install(engine)

    def stage_parts(self) -> list[int]:
        return stage_parts(self.resbm_spec, self.num_stages)

