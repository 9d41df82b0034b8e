"""Plain-torch diagnosis of dead compressed baselines: stream statistics at the first encoder."""
import sys, torch, numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from resbm_ds.config import load_config
from resbm_ds.model.pipeline import layer_specs
from resbm_ds.model.layers import lm_loss
from resbm_ds.data.batches import PackedBatches, TextSource
from resbm_ds.data.tokenizer import build_tokenizer
torch.manual_seed(0)
cfg = load_config("bench-convergence", sys.argv[2:]).validate(world_size=1)
specs, _ = layer_specs(cfg)
layers = torch.nn.ModuleList([s.build() for s in specs])
import os
if os.environ.get("EMB_STD"): torch.nn.init.normal_(layers[0].weight, std=float(os.environ["EMB_STD"]))
enc = [l for l in layers if "Encoder" in type(l).__name__][0]
stats = {}
def hook(m, i, o):
    x = i[0][0] if isinstance(i[0], tuple) else i[0]
    b = o[0] if isinstance(o, tuple) else o
    x = x.detach().float().reshape(-1, x.shape[-1]); b = b.detach().float().reshape(-1, b.shape[-1])
    mean = x.mean(0)
    stats.update(rms=x.pow(2).mean().sqrt().item(), shared=(mean.pow(2).sum() / x.pow(2).sum(1).mean()).item(),
                 code_std_tok=b.std(0).mean().item(), code_mean=b.mean(0).abs().mean().item())
enc.register_forward_hook(hook)
import glob
corpus = "/root/.cache/resbm_ds/corpus"
tok = build_tokenizer("sentencepiece-train", None, 4096, [f"{corpus}/train.txt"])
data = PackedBatches(TextSource.local(f"{corpus}/train.txt"), tok, 128, 16, seed=1234)
opt = torch.optim.AdamW(layers.parameters(), lr=float(sys.argv[1]), betas=(0.9, 0.95), weight_decay=0.1)
first = [p for l in layers[:3] for p in l.parameters()]
for step in range(1, int(os.environ.get("STEPS", 80)) + 1):
    lr = float(sys.argv[1]) * min(1, step / 30)
    for g in opt.param_groups: g["lr"] = lr
    x, y = next(data)
    h = x
    for l in layers[:-1]:
        h = l(h)
    logits = layers[-1](h)
    loss = lm_loss(logits, y)
    opt.zero_grad(); loss.backward()
    gn1 = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in first if p.grad is not None)).item()
    gn = torch.nn.utils.clip_grad_norm_(layers.parameters(), 1.0).item()
    opt.step()
    if step % 10 == 0:
        print(f"{step} loss {loss.item():.3f} gn {gn:.3g} gn_seg1 {gn1:.3g} stream_rms {stats['rms']:.3g} shared {stats['shared']:.3f} code_std {stats['code_std_tok']:.3g} code_mean {stats['code_mean']:.3g}", flush=True)
