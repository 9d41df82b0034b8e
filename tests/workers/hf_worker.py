"""Pipeline runs for the Hugging Face interop tests: `hf_worker.py PLAN.json` under torchrun.

The plan lists jobs, run one after another in this process (one engine each, to pay the launch
once). A job builds an engine from a config file + overrides (model.init_from_hf loads the
transformers weights inside build_engine) and can:
  - `ids`: evaluate a fixed batch (a saved [B, T] tensor) and save the last stage's logits
    (`<out>/<name>.before.pt`, and `.after.pt` after training),
  - `train_steps` on random tokens,
  - `run_dir`: save a checkpoint laid out like the trainer's (`run_dir/checkpoints/step{N}` +
    `latest`, `run_dir/config.yaml`).
Each rank writes `<out>/<name>.rank{r}.json`.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from resbm_ds.config import load_config
from resbm_ds.engine import build_engine, close_distributed
from resbm_ds.launch import check_config


def random_batches(cfg, dp_rank, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + dp_rank)
    while True:
        shape = (cfg.micro_batch_size, cfg.data.seq_len + 1)
        chunk = torch.randint(0, cfg.model.vocab_size, shape, generator=g)
        yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def logits_of(rt, ids):
    labels = torch.roll(ids, -1, dims=1)
    loss, logits = rt.engine.eval_batch(iter([(ids, labels)]), return_logits=True, num_micro_batches=1)
    return logits


def run_job(job, out: Path):
    cfg = load_config(job.get("config"), job.get("overrides", []))
    rt = build_engine(check_config(cfg))
    rank = dist.get_rank()
    report = {"rank": rank, "stage": rt.stage, "dp_rank": rt.dp_rank,
              "local_layers": [type(f).__name__ if isinstance(f, torch.nn.Module) else "tied_head"
                               for f in rt.module.forward_funcs]}
    save_logits = rt.stage == rt.num_stages - 1 and rt.dp_rank == 0
    ids = torch.load(job["ids"]) if job.get("ids") else None
    if ids is not None:
        logits = logits_of(rt, ids)
        if save_logits:
            torch.save(logits.float(), out / f"{job['name']}.before.pt")

    steps = job.get("train_steps", 0)
    if steps:
        data = random_batches(cfg, rt.dp_rank)
        report["losses"] = [float(rt.engine.train_batch(data_iter=data)) for _ in range(steps)]
        if ids is not None:
            logits = logits_of(rt, ids)
            if save_logits:
                torch.save(logits.float(), out / f"{job['name']}.after.pt")

    if job.get("run_dir"):
        run = Path(job["run_dir"])
        rt.engine.save_checkpoint(str(run / "checkpoints"), tag=f"step{steps}")
        if rank == 0:
            (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    dist.barrier()
    return report


def main():
    plan = json.loads(Path(sys.argv[1]).read_text())
    out = Path(plan["out"])
    for job in plan["jobs"]:
        report = run_job(job, out)
        (out / f"{job['name']}.rank{report['rank']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    close_distributed()   # before exit: gloo threads left joinable abort the process
