"""What a config costs before anything is launched: parameters in total, per pipeline stage, in the
boundaries and in the side channel, counted on the meta device.

Every layer of `pipeline.layer_specs` is built under `torch.device("meta")`: shapes only, no memory
and no initialisation, so a 7B-parameter config is counted in well under a second on a laptop. The
stage cuts are `pipeline.stage_parts`, the ones `ResBMPipeline` hands DeepSpeed, so a stage's count
is what that stage's rank holds.

    total         trainable parameters of the whole model (a tied embedding once)
    stages        trainable parameters per stage (a tied embedding on every stage that holds it)
    boundary      the boundary method's encoders and decoders, without their token tables
    side_channel  the token tables (bottleneck.token_channel), wherever they sit
    frozen        values in buffers (frozen token tables, fixed bases): memory without optimizer state

Only what DeepSpeed would train is a parameter; a frozen table is reported as `frozen`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.pipe import TiedLayerSpec

from ..config import ModelSpec
from .boundary import TokenTable
from .pipeline import boundary_layers, layer_specs, stage_parts

# What the boundary and its side channel may add to a stage: the default stays within it at the
# paper's shape (H=4096, 8 stages) at V=32,000 and V=128,256 (tests/test_accounting.py).
OVERHEAD_BUDGET = 0.05


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    stages: tuple[int, ...]
    boundary: int
    side_channel: int
    frozen: int
    stage_overhead: tuple[int, ...]   # boundary + side channel on each stage

    @property
    def overhead_share(self) -> float:
        """The largest stage's boundary + side-channel parameters over the rest of that stage
        (what the stage would hold without them), to hold against OVERHEAD_BUDGET."""
        return max(o / (s - o) for s, o in zip(self.stages, self.stage_overhead))

    @property
    def budget_words(self) -> str:
        verdict = "within" if self.overhead_share <= OVERHEAD_BUDGET else "over"
        return f"+{100 * self.overhead_share:.1f}% of a stage, {verdict} the {100 * OVERHEAD_BUDGET:g}% budget"


def _trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameter_counts(spec: ModelSpec, num_stages: int) -> ParameterCounts:
    """Count `spec`'s model on the meta device, cut into `num_stages` (a run's pipeline.stages)."""
    specs, _ = layer_specs(spec)
    kit = boundary_layers(spec)
    boundary_types = {t for t in (kit.encoder, kit.decoder) if t is not None}
    parts = stage_parts(spec, num_stages)
    stages, overhead = [0] * num_stages, [0] * num_stages
    total = boundary = side = frozen = 0
    seen_tied = set()
    for i, layer_spec in enumerate(specs):
        with torch.device("meta"):
            layer = layer_spec.build()
        n = _trainable(layer)
        tables = sum(_trainable(m) for m in layer.modules() if isinstance(m, TokenTable))
        own = n - tables if layer_spec.typename in boundary_types else 0
        stage = next(s for s in range(num_stages) if parts[s] <= i < parts[s + 1])
        stages[stage] += n
        overhead[stage] += own + tables
        if isinstance(layer_spec, TiedLayerSpec):
            if layer_spec.key in seen_tied:
                continue
            seen_tied.add(layer_spec.key)
        total, boundary, side = total + n, boundary + own, side + tables
        frozen += sum(b.numel() for b in layer.buffers())
    return ParameterCounts(total, tuple(stages), boundary, side, frozen, tuple(overhead))


def cost_lines(spec: ModelSpec, num_stages: int, wire_bytes_per_token: tuple[int, int], dense_bytes: int) -> list[str]:
    """The pre-launch accounting, exact: parameters (`parameter_counts`) and wire bytes per token
    per boundary (the run's `Config.wire_bytes_per_token`, and `dense_bytes` of a dense bf16 one)."""
    c = parameter_counts(spec, num_stages)
    fwd, bwd = wire_bytes_per_token
    frozen = f"; {c.frozen:,} values in frozen buffers" if c.frozen else ""
    S = num_stages
    where = (f"at each of the {S - 1} boundaries between stages" if S > 1 else
             "at a boundary between stages (none with 1 stage)")
    return [f"parameters: {c.total:,} total (counted on the meta device); per stage "
            f"{', '.join(f'{n:,}' for n in c.stages)}; boundary encoders/decoders {c.boundary:,}; "
            f"side channel ({spec.token_channel} token tables) {c.side_channel:,}; boundary + side channel "
            f"= {c.budget_words} (the stage that holds the most){frozen}",
            f"wire: {fwd:,} bytes per token forward, {bwd:,} backward, {where} "
            f"(dense bf16: {dense_bytes:,})"]


def cost_summary(spec: ModelSpec, num_stages: int) -> str:
    """One clause for the plan line: the counts in millions."""
    c = parameter_counts(spec, num_stages)
    return (f"{c.total / 1e6:,.1f}M parameters ({' / '.join(f'{n / 1e6:,.1f}' for n in c.stages)}M per stage; "
            f"boundary {c.boundary / 1e6:,.2f}M, side channel {c.side_channel / 1e6:,.2f}M, "
            f"{c.budget_words})")
