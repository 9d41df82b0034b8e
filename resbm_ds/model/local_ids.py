"""Token ids read on every stage from its own copy of the data (bottleneck.token_ids=local).

The token channel's decoders add T[ids] (model/boundary.py). With token_ids=sent the ids ride with
the code across every stage boundary; with token_ids=local nothing but the code crosses, and each
decoder reads the ids of the micro-batch its stage is computing from `LocalIds.current`.

Why that is enough: every rank already holds the same data iterator (the trainer builds one
PackedBatches per rank: same seed, its data-parallel shard, restored from the checkpoint on resume),
and DeepSpeed's first and last stages already draw one micro-batch from it per LoadMicroBatch, which
every schedule (TrainSchedule's 1F1B, InferenceSchedule) issues in the same step as the ForwardPass
of that buffer. `install` makes the engine of any stage

  * keep the iterator on middle stages too (the engine keeps it only on the first and last);
  * remember the inputs of each loaded micro-batch per pipeline buffer (DeepSpeed's `batch_fn` sees
    each batch; the last stage otherwise drops the inputs);
  * load on middle stages at each ForwardPass, where the first and last stages load;
  * point `LocalIds.current` at the buffer's ids before each ForwardPass.

So every stage reads micro-batch k's ids while it computes micro-batch k, whatever the schedule's
interleaving, and the iterator advances alike on every stage (its state, saved per stage, resumes
alike). The engine's internals are patched by `compat.load_on_every_stage`; this module only says
what to do with the ids. They are read on the DeepSpeed versions `compat.TESTED_DEEPSPEED` names,
and another version is refused (`compat.require_tested_deepspeed`).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import compat


class LocalIds:
    """The token ids [B, T] of the micro-batch being computed (`current`), shared by the stage's
    decoders; `by_buffer` holds the ids loaded into each pipeline buffer."""

    def __init__(self):
        self.current: torch.Tensor | None = None
        self.by_buffer: dict[int, torch.Tensor] = {}
        self.loaded: torch.Tensor | None = None

    def keep(self, batch):
        """DeepSpeed's batch_fn: remember the inputs of the batch just drawn, pass it on unchanged."""
        self.loaded = batch[0]
        return batch


def attach_local_ids(root: nn.Module) -> LocalIds | None:
    """Give every layer of `root` that reads ids locally (`reads_local_ids`) one shared LocalIds;
    None when no layer does (token_ids=sent, or no token channel)."""
    readers = [m for m in root.modules() if getattr(m, "reads_local_ids", False)]
    if not readers:
        return None
    ids = LocalIds()
    for m in readers:
        m.local_ids = ids
    return ids


def install(engine, ids: LocalIds) -> None:
    """Make `engine` (a PipelineEngine of any stage) feed `ids` as described in the module docstring."""
    compat.require_tested_deepspeed("bottleneck.token_ids=local")

    def after_load(buffer_id, device):     # DeepSpeed has loaded the buffer: keep its ids
        ids.by_buffer[buffer_id] = ids.loaded.to(device)

    def before_forward(buffer_id):         # the stage is about to compute the buffer
        ids.current = ids.by_buffer[buffer_id]

    compat.load_on_every_stage(engine, ids.keep, after_load, before_forward)
