"""Training entry point: `python -m resbm_ds.train --config FILE [--resume] [section.key=value ...]`.

Run it under `deepspeed --num_gpus N`, `torchrun --nproc_per_node N`, or `srun` (one task per rank).
Everything is checked before the process group starts (config, data paths, world size); then each
rank builds its slice of the pipeline, and the loop runs DeepSpeed's `train_batch` / `eval_batch`.

Outputs in `train.out_dir`:
  config.yaml         the resolved configuration
  metrics.jsonl       one JSON row per step (loss, lr, tokens, tokens/s, wire bytes) and per eval
  monitor/            DeepSpeed monitor (TensorBoard + CSV) with the same scalars
  tokenizer/          the tokenizer the run used
  checkpoints/<tag>   DeepSpeed checkpoints; `latest` names the newest complete one
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist
import yaml
from torch.optim.lr_scheduler import LambdaLR

from .config import Config, ConfigError, load_config
from .data.batches import PackedBatches, TextSource, validation_batches
from .data.corpus import ensure_corpus
from .data.tokenizer import build_tokenizer, save_tokenizer
from .metrics import METRICS_FILE, Metrics, read_metrics
from .engine import Runtime, build_engine, close_distributed, validate_before_launch
from .optim import newton_schulz_dtype
from .slurm_layout import report_layout


class TrainingError(RuntimeError):
    """A run that cannot continue (NaN loss, bad resume state): reported once, exits non-zero."""


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at the last step."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---- data ------------------------------------------------------------------------------------

def text_sources(cfg: Config) -> tuple[TextSource, TextSource]:
    """Train/validation text; checked before any process starts (a missing path is an error)."""
    d = cfg.data
    if d.source == "hub":
        return (TextSource.hub(d.hub_name, d.hub_config, d.hub_split, d.text_field),
                TextSource.hub(d.hub_name, d.hub_config, d.hub_val_split, d.text_field))
    if d.source != "local":
        raise ConfigError("data.source", d.source, "allowed: ['local', 'hub']")
    if d.train_path is None:
        corpus = ensure_corpus()     # the default corpus: fetched once, then cached
        train_path, val_path = corpus / "train.txt", corpus / "val.txt"
    else:
        train_path, val_path = Path(d.train_path), Path(d.val_path or d.train_path)
    for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
        if not Path(path).exists():
            raise ConfigError(key, str(path), "no such file or directory")
    return TextSource.local(str(train_path), d.text_field), TextSource.local(str(val_path), d.text_field)


def make_tokenizer(cfg: Config, train: TextSource):
    d = cfg.data
    files = [str(p) for p in train.files()] if train.is_local else []
    if d.tokenizer == "sentencepiece-train" and not files:
        raise ConfigError("data.tokenizer", d.tokenizer, "training a tokenizer needs local text; "
                          "with data.source=hub use 'hf' or 'sentencepiece' and data.tokenizer_path")
    tok = build_tokenizer(d.tokenizer, d.tokenizer_path, cfg.model.vocab_size, files)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"must be >= the tokenizer's vocabulary ({tok.vocab_size})")
    return tok


# ---- checkpoints -----------------------------------------------------------------------------

def save_checkpoint(rt: Runtime, ckpt_dir: Path, step: int, train_data: PackedBatches):
    """All ranks write their files under a new tag; only then does rank 0 point `latest` at it,
    atomically (write + rename). A run killed mid-save therefore resumes from the previous tag."""
    tag = f"step{step}"
    rt.engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False,
                              client_state={"step": step, "data": train_data.state_dict()})
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
    dist.barrier()


def resume(rt: Runtime, ckpt_dir: Path, train_data: PackedBatches) -> int:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return 0
    path, client = rt.engine.load_checkpoint(str(ckpt_dir), tag=latest.read_text().strip())
    if path is None or not client:
        raise TrainingError(f"could not load checkpoint {latest.read_text().strip()} from {ckpt_dir}")
    train_data.load_state_dict(client["data"])
    return int(client["step"])


def wire_totals(rt: Runtime) -> tuple[int, int, int]:
    """Bytes sent forward / backward at p2p, and in collectives between stages (wire/meter.py), across
    every stage boundary of every pipeline this step. The reduction itself goes through
    deepspeed.comm, so the meter counts it too (in the next step's `other`)."""
    counts = rt.meter.take()
    t = torch.tensor([counts.sent_fwd, counts.sent_bwd, counts.other], dtype=torch.float64)
    ds_comm.all_reduce(t)
    return int(t[0]), int(t[1]), int(t[2])


# ---- main ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m resbm_ds.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML/JSON file or preset name (resbm_ds/configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)   # passed by `deepspeed`
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.hidden_size=512")
    return p.parse_args(argv)


def prepare(args) -> tuple[Config, TextSource, TextSource]:
    """Everything that can fail on bad input, before any process group exists."""
    cfg = validate_before_launch(load_config(args.config, args.overrides))
    train_src, val_src = text_sources(cfg)
    return cfg, train_src, val_src


def train(cfg: Config, train_src: TextSource, val_src: TextSource, resume_run: bool):
    out = Path(cfg.train.out_dir)
    tok = make_tokenizer(cfg, train_src)
    scheduler = lambda opt: LambdaLR(opt, lambda s: lr_factor(s, cfg))  # noqa: E731
    rt = build_engine(cfg, lr_scheduler=scheduler, extra_ds=monitor_config(out))
    report_layout(rt)   # each rank: its node, stage and data-parallel rank; rank 0 checks the layout
    rank0 = dist.get_rank() == 0
    t, S, dp = cfg.train, rt.num_stages, rt.dp_size
    data = PackedBatches(train_src, tok, cfg.data.seq_len, cfg.micro_batch_size, rt.dp_rank, dp, seed=cfg.seed)
    ckpt_dir = out / "checkpoints"
    start = resume(rt, ckpt_dir, data) if resume_run else 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        save_tokenizer(tok, out / "tokenizer")
        muon = (f", Muon Newton-Schulz {t.muon_ns_method} in {newton_schulz_dtype(t.muon_ns_method)}"
                if t.optimizer == "muon" else "")
        print(f"[resbm] {S} stages x {dp} data-parallel, {cfg.bottleneck.method} boundary h={cfg.code_width} "
              f"({cfg.compression_ratio():.3g}x vs dense bf16), {cfg.precision}, ZeRO-{cfg.zero_stage}; "
              f"{'resuming at step ' + str(start) if start else 'from scratch'}{muon}", flush=True)
        if cfg.tied_allreduce_bytes:
            code = sum(cfg.wire_bytes_per_token) * cfg.micro_batch_size * cfg.grad_accum_steps * cfg.data.seq_len
            print(f"[resbm] note: model.tie_embeddings=true across {S} stages: DeepSpeed all-reduces the "
                  f"embedding gradient between the first and last stage, {cfg.tied_allreduce_bytes:,} bytes per "
                  f"step outside the boundary (which carries {code:,}); counted as wire_bytes_other. "
                  "model.tie_embeddings=false avoids it.", flush=True)
    metrics = Metrics(out / METRICS_FILE, rt.engine, start, rank0)

    tokens_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * dp * cfg.data.seq_len
    boundaries = (S - 1) * dp
    bar = progress_bar(rank0, start, t.steps)
    loss = float("nan")
    for step in range(start + 1, t.steps + 1):
        lr = rt.engine.get_lr()[0]
        t0 = time.perf_counter()
        loss = float(rt.engine.train_batch(data_iter=data))
        dt = time.perf_counter() - t0
        fwd, bwd, other = wire_totals(rt)
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {step}; stopping (lower train.lr, check the data)")
        row = dict(step=step, loss=loss, lr=lr, tokens=step * tokens_per_step,
                   tokens_per_s=tokens_per_step / dt, step_time_s=dt, wire_bytes_fwd=fwd,
                   wire_bytes_bwd=bwd, wire_bytes_other=other,
                   wire_bytes_per_boundary=(fwd + bwd) // max(1, boundaries))
        if step % t.log_every == 0 or step == t.steps:
            metrics.log(row)
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                            wire_MB=f"{(fwd + bwd) / 1e6:.2f}")
        if step % t.eval_every == 0 or step == t.steps:
            val = evaluate(rt, cfg, val_src, tok)
            rt.meter.take()   # evaluation traffic is not part of the next step's figures
            metrics.log(dict(step=step, val_loss=val, tokens=step * tokens_per_step))
            if bar:
                bar.write(f"step {step}: val_loss {val:.4f}")
        if step % t.save_every == 0 or step == t.steps:
            save_checkpoint(rt, ckpt_dir, step, data)
    if bar:
        bar.close()
    if rank0 and start < t.steps:
        summarize(out, cfg, S, dp)
    return loss


def evaluate(rt: Runtime, cfg: Config, val_src: TextSource, tok) -> float:
    batches = validation_batches(val_src, tok, cfg.data.seq_len, cfg.micro_batch_size,
                                 rt.dp_rank, rt.dp_size, num_batches=cfg.train.eval_batches)
    return float(rt.engine.eval_batch(data_iter=batches, num_micro_batches=cfg.train.eval_batches))


def monitor_config(out: Path) -> dict:
    return {"tensorboard": {"enabled": True, "output_path": str(out / "monitor"), "job_name": "tb"},
            "csv_monitor": {"enabled": True, "output_path": str(out / "monitor"), "job_name": "csv"}}


def progress_bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def summarize(out: Path, cfg: Config, S: int, dp: int):
    """The closing lines: final loss, throughput, bytes per boundary and the measured ratio."""
    steps, vals = read_metrics(out)
    last = steps[-1]
    tail = steps[len(steps) // 2:] or steps
    tok_s = sum(r["tokens_per_s"] for r in tail) / len(tail)
    lines = [f"final loss {last['loss']:.4f}" + (f", val_loss {vals[-1]['val_loss']:.4f}" if vals else ""),
             f"tokens/s {tok_s:,.0f} (mean of the last {len(tail)} steps)"]
    if S > 1:
        per = (S - 1) * dp * cfg.micro_batch_size * cfg.grad_accum_steps * cfg.data.seq_len   # boundary-tokens
        measured = last["wire_bytes_fwd"] / per, last["wire_bytes_bwd"] / per
        lines.append(f"wire: {measured[0]:g} bytes/token forward, {measured[1]:g} backward per boundary (measured) "
                     f"-> {cfg.compression_ratio('model', measured):.1f}x fewer than a dense {cfg.precision} "
                     f"boundary, {cfg.compression_ratio('bf16', measured):.1f}x vs dense bf16")
        lines.append(f"wire: {last.get('wire_bytes_other', 0):,} bytes per step in collectives between stages "
                     "(loss broadcast, clip norm, metrics; wire/meter.py)")
    else:
        lines.append("wire: 1 stage, nothing crosses a link")
    print("[resbm] " + "\n[resbm] ".join(lines), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, train_src, val_src = prepare(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finished = False
    try:
        train(cfg, train_src, val_src, args.resume)
        finished = True
    except (TrainingError, ConfigError) as e:
        print(f"error (rank {os.environ.get('RANK', '0')}): {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        close_distributed(barrier=finished)   # no barrier on error paths: a peer may be gone
    return 0


if __name__ == "__main__":
    sys.exit(main())
