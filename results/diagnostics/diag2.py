"""Gradient spikes of ResBM 128x (h=1 + ids) in plain torch: variants by env (TABLE_STD, NONORM)."""
import os, sys, torch
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
if os.environ.get("TABLE_STD"):
    for m in layers.modules():
        if type(m).__name__ == "TokenTable":
            torch.nn.init.normal_(m.weight, std=float(os.environ["TABLE_STD"]))
corpus = "/root/.cache/resbm_ds/corpus"
tok = build_tokenizer("sentencepiece-train", None, 4096, [f"{corpus}/train.txt"])
data = PackedBatches(TextSource.local(f"{corpus}/train.txt"), tok, 128, 16, seed=1234)
lr0 = float(sys.argv[1])
opt = torch.optim.AdamW(layers.parameters(), lr=lr0, betas=(0.9, 0.95), weight_decay=0.1)
gmax, losses = 0, []
for step in range(1, int(os.environ.get("STEPS", 150)) + 1):
    for g in opt.param_groups: g["lr"] = lr0 * min(1, step / 30)
    x, y = next(data)
    h = x
    for l in layers[:-1]:
        h = l(h)
    loss = lm_loss(layers[-1](h), y)
    opt.zero_grad(); loss.backward()
    gn = torch.nn.utils.clip_grad_norm_(layers.parameters(), 1.0).item()
    opt.step()
    gmax = max(gmax, gn); losses.append(loss.item())
    if step % 10 == 0:
        print(f"{step} loss(mean10) {sum(losses[-10:])/10:.3f} max_gn(10) {gmax:.3g}", flush=True); gmax = 0
