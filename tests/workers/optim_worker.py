"""What the optimizer really does inside the DeepSpeed pipeline engine; writes a JSON report per rank.

`optim_worker.py OUT STEPS [--save=DIR] [overrides...]` under torchrun.

Every rank also builds the *whole* model in plain PyTorch (same per-layer seeds as DeepSpeed's
`seed_layers`, same start weights) and trains it on the same global batches with the same gradient
clipping: the Muon matrices with the reference Muon formula in fp32 (the algorithm of
torch.optim.Muon / Keller Jordan), everything else with torch.optim.AdamW. For the first REF_STEPS
steps each local parameter's engine update (read from DeepSpeed's fp32 master copy) is compared
with the reference update; on the first step the Muon matrices are also compared with what
`torch.optim.Muon` itself does with the same gradient, and the engine's update is analysed on its
own: singular values for the Muon matrices, |update| / lr for the AdamW parameters.
"""
import faulthandler
import json
import math
import signal
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.runtime import utils as ds_utils
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn

from pipe_worker import synthetic_batches   # a sibling script: its directory is on sys.path (run as a script, or pytest's pythonpath)

from resbm_ds.config import load_config  # noqa: E402
from resbm_ds.engine import build_engine, close_distributed
from resbm_ds.launch import check_config  # noqa: E402
from resbm_ds.model.layers import lm_loss  # noqa: E402
from resbm_ds.optim import decay_groups, muon_matrices  # noqa: E402
from resbm_ds.model.local_ids import attach_local_ids  # noqa: E402
from resbm_ds.model.pipeline import layer_specs  # noqa: E402

REF_STEPS = 2


def reference_model(cfg, dtype):
    """The full layer list, built with the seeds DeepSpeed's PipelineModule uses (base_seed + index),
    rounded to the engine's dtype as the engine's master weights are, then kept in fp32."""
    layers = []
    for idx, spec in enumerate(layer_specs(cfg.spec)[0]):
        ds_utils.set_random_seed(cfg.seed + idx)
        layers.append(spec.build())
    model = nn.Sequential(*layers)
    ids = attach_local_ids(model)      # bottleneck.token_ids=local: the decoders read the input's ids
    if ids is not None:
        model.register_forward_pre_hook(lambda module, args: setattr(ids, "current", args[0]))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def newton_schulz5(g, steps=5):
    """Keller Jordan's quintic Newton-Schulz (torch.optim.Muon runs it in bf16), here in fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.size(0) > g.size(1) else g
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.size(0) > g.size(1) else x


class ReferenceMuon:
    """torch.optim.Muon's update (Nesterov momentum, NS5, lr * sqrt(max(1, rows/cols))), in fp32."""

    def __init__(self, params, lr, momentum, weight_decay):
        self.params, self.lr, self.beta, self.wd = params, lr, momentum, weight_decay
        self.bufs = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self):
        for p, buf in zip(self.params, self.bufs):
            buf.lerp_(p.grad, 1 - self.beta)
            update = p.grad.lerp(buf, self.beta)
            p.mul_(1 - self.lr * self.wd)
            p.add_(newton_schulz5(update), alpha=-self.lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def reference_optimizers(cfg, model):
    t = cfg.train
    if t.optimizer == "adamw":
        return [torch.optim.AdamW(decay_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=1e-8)]
    matrices = muon_matrices(model)
    ids = {id(p) for p in matrices}
    adam = [p for p in model.parameters() if id(p) not in ids]
    return [ReferenceMuon(matrices, t.muon_lr, t.muon_momentum, t.muon_weight_decay),
            torch.optim.AdamW(adam, lr=t.lr, betas=t.betas, eps=1e-8, weight_decay=t.weight_decay)]


def torch_muon_update(cfg, weight, grad):
    """What torch.optim.Muon itself does to `weight` given `grad` on its first step."""
    t = cfg.train
    w = nn.Parameter(weight.clone())
    w.grad = grad.clone()
    torch.optim.Muon([w], lr=t.muon_lr, momentum=t.muon_momentum, nesterov=True, ns_steps=5,
                     weight_decay=t.muon_weight_decay, adjust_lr_fn="original").step()
    return weight - w.detach()


def reference_step(cfg, model, opts, streams):
    """One optimizer step on the global batch (GAS micro-batches from every data-parallel rank);
    returns the clipped gradients it stepped with."""
    micro = [next(s) for _ in range(cfg.grad_accum_steps) for s in streams]
    for x, y in micro:
        (lm_loss(model(x), y) / len(micro)).backward()
    clip = cfg.ds.get("gradient_clipping", 0.0)
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)
    return grads


def update_stats(du, lr, kind, shape):
    """The engine's first update (weight decay removed) divided by its nominal step size."""
    u = du / lr
    if kind == "muon":
        u = u / math.sqrt(max(1.0, shape[0] / shape[1]))
        s = torch.linalg.svdvals(u)
        return dict(sv=[round(float(x), 4) for x in s])
    a = u.abs().flatten()
    moved = a[a > 1e-3]   # elements with a gradient (embedding rows of absent tokens do not move)
    return dict(moved=int(moved.numel()), total=int(a.numel()),
                adam_unit_frac=float(((moved > 0.95) & (moved < 1.05)).float().mean()) if len(moved) else 0.0)


def master_weights(local):
    """fp32 master copies (DeepSpeed's, under ZeRO-1 / BF16_Optimizer; the parameter itself otherwise)."""
    out = {}
    for n, p in local.items():
        hp = safe_get_full_fp32_param(p)   # collective over the data-parallel group under ZeRO
        out[n] = (p if hp is None else hp).detach().float().clone()
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def main():
    faulthandler.register(signal.SIGUSR1, all_threads=False)   # `kill -USR1 PID` shows where a rank hangs
    out, steps, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    save = next((a[len("--save="):] for a in args if a.startswith("--save=")), None)
    args = [a for a in args if not a.startswith("--save=")]
    cfg = load_config(None, args)
    rt = build_engine(check_config(cfg))
    t = cfg.train
    local = dict(rt.module.named_parameters())
    muon_ids = {id(p) for p in muon_matrices(rt.module)} if t.optimizer == "muon" else set()
    decayed = ({id(p) for p in rt.module.parameters()} if t.optimizer == "muon"
               else {id(p) for p in decay_groups(rt.module, t.weight_decay)[0]["params"]})

    ref = reference_model(cfg, next(iter(local.values())).dtype)
    ref_params = dict(ref.named_parameters())
    ref_opts = reference_optimizers(cfg, ref)
    ref_streams = [synthetic_batches(cfg, r, rt.dp_size) for r in range(rt.dp_size)]
    start = master_weights(local)
    for n in local:   # the reference really starts where the engine starts
        assert torch.equal(ref_params[n].detach(), start[n]), n

    data = synthetic_batches(cfg, rt.dp_rank, rt.dp_size)
    losses, checks = [], {}
    before = start
    for step in range(steps):
        ref_before = {n: ref_params[n].detach().clone() for n in local}
        losses.append(float(rt.engine.train_batch(data_iter=data)))
        if step >= REF_STEPS:
            continue
        after = master_weights(local)
        grads = reference_step(cfg, ref, ref_opts, ref_streams)
        for n, p in local.items():
            kind = "muon" if id(p) in muon_ids else "adam"
            lr = t.muon_lr if kind == "muon" else t.lr
            wd = t.muon_weight_decay if kind == "muon" else t.weight_decay if id(p) in decayed else 0.0
            du, dr = before[n] - after[n], ref_before[n] - ref_params[n].detach()
            c = checks.setdefault(n, dict(kind=kind, use_muon=getattr(p, "use_muon", None)))
            c[f"rel_err{step}"] = rel(du, dr)
            c[f"cos{step}"] = float(F.cosine_similarity(du.flatten(), dr.flatten(), dim=0))
            if step == 0:
                c.update(update_stats(du - lr * wd * before[n], lr, kind, p.shape))
                if kind == "muon":
                    c["rel_err_torch_muon"] = rel(du, torch_muon_update(cfg, ref_before[n], grads[n]))
        before = after
    if save:
        rt.engine.save_checkpoint(save, tag="t")
    rank = dist.get_rank()
    report = dict(rank=rank, stage=rt.stage, dp_rank=rt.dp_rank, losses=losses, checks=checks,
                  optimizer=type(rt.engine.optimizer).__name__,
                  basic_optimizer=type(rt.engine.basic_optimizer).__name__,
                  local_layers=[type(l).__name__ for l in rt.module.forward_funcs])
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
    close_distributed()   # before exit: gloo threads left joinable abort the process
