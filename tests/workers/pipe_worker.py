"""Runs a few pipeline training steps on a fixed synthetic token stream and writes a JSON report.

Used by the core tests under torchrun/deepspeed: `pipe_worker.py OUT STEPS [overrides...]`, or
`pipe_worker.py OUT STEPS --cases=CASES.json` to run several configs ({name: [flags and overrides...]})
one after another in the same process group, each on a fresh engine (one launch instead of one per config).
The token stream is a learnable pattern (repeated random phrases) so the loss can fall in a few
steps; the text pipeline has its own tests.
"""
import hashlib
import json
import sys

import torch
import torch.distributed as dist

from resbm_ds.config import load_config
from resbm_ds.engine import build_engine, close_distributed
from resbm_ds.launch import check_config
from resbm_ds.model.boundary import LocalIdsReader


def ids_hash(ids) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def record_ids(rt) -> dict:
    """Hashes of the token ids, one per forward in order: the first stage's inputs ("inputs") and what
    each token-channel layer of this stage read, sent or local ("b<boundary>")."""
    seen = {}

    def hook(name, ids_of):
        seen[name] = []
        return lambda module, args: seen[name].append(ids_hash(ids_of(module, args[0])))
    if rt.stage == 0:
        rt.module.forward_funcs[0].register_forward_pre_hook(hook("inputs", lambda m, x: x))
    for layer in rt.module.forward_funcs:
        if isinstance(layer, LocalIdsReader) and layer.tokens is not None:
            layer.register_forward_pre_hook(hook(f"b{layer.boundary}", lambda m, x: m.split_ids(x)[1]))
    return seen


def synthetic_batches(cfg, dp_rank, dp_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, V = cfg.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    phrases = torch.randint(0, V, (16, 8), generator=g)
    step = 0
    while True:
        rows = []
        for i in range(B * dp_size):
            idx = torch.randint(0, 16, ((T + 1) // 8 + 1,), generator=g)
            rows.append(phrases[idx].flatten()[: T + 1])
        batch = torch.stack(rows)[dp_rank * B:(dp_rank + 1) * B]
        yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        step += 1


def main():
    out, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if overrides and overrides[0].startswith("--cases="):
        with open(overrides[0][len("--cases="):]) as f:
            cases = json.load(f)
        for name, case_overrides in cases.items():
            run(f"{out}.{name}", steps, case_overrides)
    else:
        run(out, steps, overrides)


def run(out, steps, overrides):
    """One config; leading `--load=DIR`, `--save=DIR` and (in a case) `--steps=N` come before the overrides."""
    flags = {}
    while overrides and overrides[0].split("=")[0] in ("--load", "--save", "--steps"):
        key, value = overrides[0][2:].split("=", 1)
        flags[key], overrides = value, overrides[1:]
    load, save, steps = flags.get("load"), flags.get("save"), int(flags.get("steps", steps))
    cfg = load_config(None, overrides)
    rt = build_engine(check_config(cfg))
    if load:
        rt.engine.load_checkpoint(load, load_module_only=True, load_optimizer_states=False,
                                  load_lr_scheduler_states=False)
    ids_seen = record_ids(rt)
    data = synthetic_batches(cfg, rt.dp_rank, rt.dp_size)
    losses, wire = [], []
    for _ in range(steps):
        loss = rt.engine.train_batch(data_iter=data)
        losses.append(float(loss))
        wire.append(rt.meter.take().as_dict())
    eval_loss = float(rt.engine.eval_batch(data_iter=synthetic_batches(cfg, rt.dp_rank, rt.dp_size, seed=99)))
    if save:
        rt.engine.save_checkpoint(save, tag="t")
    h = hashlib.sha256()
    for name, p in sorted(rt.module.named_parameters()):
        h.update(name.encode()); h.update(p.detach().float().cpu().numpy().tobytes())
    rank = dist.get_rank()
    report = dict(rank=rank, stage=rt.stage, dp_rank=rt.dp_rank, losses=losses, wire=wire,
                  eval_loss=eval_loss, param_hash=h.hexdigest(),
                  parameters=sum(p.numel() for p in rt.module.parameters() if p.requires_grad),
                  param_dtypes=sorted({str(p.dtype) for p in rt.module.parameters()}),
                  local_layers=[type(l).__name__ for l in rt.module.forward_funcs],
                  compression_ratio=cfg.compression_ratio("model"), code_width=cfg.code_width,
                  wire_bytes_per_token=list(cfg.wire_bytes_per_token),
                  link_collectives=rt.link.stats.collectives, ids_seen=ids_seen)
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
    close_distributed()   # before exit: gloo threads left joinable abort the process
