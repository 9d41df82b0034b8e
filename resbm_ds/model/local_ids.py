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
alike). These are the only patched internals; `check_deepspeed` names the versions they were read on.
"""
from __future__ import annotations

import deepspeed
import torch
from deepspeed.runtime.pipe.schedule import ForwardPass, LoadMicroBatch
from torch import nn

TESTED_DEEPSPEED = ("0.19.",)   # the pipeline engine internals below were read on these versions


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


def check_deepspeed() -> str | None:
    """Why `install` cannot run on the installed DeepSpeed, or None."""
    if not deepspeed.__version__.startswith(TESTED_DEEPSPEED):
        return (f"reads DeepSpeed's pipeline engine internals, checked on {'/'.join(v + 'x' for v in TESTED_DEEPSPEED)}; "
                f"installed: {deepspeed.__version__}")
    return None


def install(engine, ids: LocalIds) -> None:
    """Make `engine` (a PipelineEngine of any stage) feed `ids` as described in the module docstring."""
    problem = check_deepspeed()
    if problem:
        raise RuntimeError(f"bottleneck.token_ids=local {problem}")
    middle = not (engine.is_first_stage() or engine.is_last_stage())
    load, forward = engine._INSTRUCTION_MAP[LoadMicroBatch], engine._INSTRUCTION_MAP[ForwardPass]

    def set_dataiterator(iterator):        # the engine's own keeps it on the first and last stage only
        engine.training_dataloader = None
        engine.data_iterator = iterator

    def load_micro_batch(self, buffer_id):
        load(self, buffer_id)              # DeepSpeed's: inputs (first stage), labels (last stage)
        ids.by_buffer[buffer_id] = ids.loaded.to(self.device)

    def forward_pass(self, buffer_id):
        if middle:                         # the schedule loads on the first and last stage only
            load_micro_batch(self, buffer_id)
        ids.current = ids.by_buffer[buffer_id]
        return forward(self, buffer_id)

    engine.set_dataiterator = set_dataiterator
    engine.set_batch_fn(ids.keep)
    # _exec_schedule looks instructions up in this map on the instance: an instance copy patches one engine
    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, LoadMicroBatch: load_micro_batch, ForwardPass: forward_pass}
