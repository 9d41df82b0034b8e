"""Evaluate and sample a consolidated ResBM model on one process, with the run's tokenizer.

    python -m resbm_ds.generate evaluate MODEL [--text FILE] [--max-chunks N]
    python -m resbm_ds.generate sample MODEL --prompt "Once upon" [--max-new-tokens 64]

MODEL is an exported directory (`python -m resbm_ds.export`) or a run directory (its latest
checkpoint is consolidated in memory). `evaluate` packs the text exactly like the trainer's
validation data (documents + eos, chunks of seq_len + 1, no shuffle) and reports the mean
next-token loss and its perplexity as one JSON line; the first N chunks are the chunks that a
data-parallel validation pass over N chunks covers, so the number is comparable with the run's
validation loss.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import DTYPES
from .data.batches import TextSource, validation_batches
from .data.tokenizer import load_saved_tokenizer
from .export import load_model, tokenizer_dir
from .model.causal_lm import ResBMForCausalLM


def load_tokenizer(path):
    """The run's tokenizer for a run or export directory (`<dir>/tokenizer`)."""
    tok_dir = tokenizer_dir(path)
    if tok_dir is None:
        raise FileNotFoundError(f"{path}: no tokenizer/ directory (in it or its parents)")
    return load_saved_tokenizer(tok_dir)


@torch.no_grad()
def evaluate(model: ResBMForCausalLM, tokenizer, text_file, max_chunks: int | None = None,
             seq_len: int | None = None, micro_batch: int = 4) -> dict:
    """Mean next-token loss (and perplexity) over the first `max_chunks` chunks (all by default)."""
    seq_len = seq_len or model.config.data.seq_len
    batches = validation_batches(TextSource.local(str(text_file)), tokenizer, seq_len, micro_batch)
    model.eval()
    nll, tokens, chunks = 0.0, 0, 0
    for x, y in batches:
        if max_chunks is not None:
            x, y = x[: max_chunks - chunks], y[: max_chunks - chunks]
        logits = model(x)
        # Summed in fp32 per batch, accumulated in float64: the mean does not depend on batching.
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        tokens, chunks = tokens + y.numel(), chunks + len(x)
        if max_chunks is not None and chunks >= max_chunks:
            break
    if max_chunks is not None and chunks < max_chunks:
        raise ValueError(f"{text_file}: only {chunks} chunks of {seq_len + 1} tokens, asked for {max_chunks}")
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "chunks": chunks}


@torch.no_grad()
def sample(model: ResBMForCausalLM, tokenizer, prompt: str, max_new_tokens: int = 64,
           temperature: float = 0.8, top_k: int | None = 50, seed: int = 0, stop_at_eos: bool = True) -> str:
    """Continue `prompt` (returns only the new text). temperature 0 = greedy. No KV cache: each
    step reruns the window, which is fine for the small models this trains."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]   # an empty prompt starts a new document
    ctx = torch.tensor([ids])
    window = model.config.model.max_seq_len
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ctx[:, -window:])[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        if stop_at_eos and nxt == tokenizer.eos_id:
            break
        new.append(nxt)
        ctx = torch.cat([ctx, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resbm_ds.generate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("evaluate", "sample"):
        p = sub.add_parser(name)
        p.add_argument("model", help="exported directory, or a run directory (latest checkpoint)")
        p.add_argument("--tag", default=None, help="checkpoint tag when MODEL is a run directory")
        p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                       help="compute dtype (default: the dtype the model was trained in)")
    ev = sub.choices["evaluate"]
    ev.add_argument("--text", default=None, help="text file (default: the run's data.val_path)")
    ev.add_argument("--max-chunks", type=int, default=None, help="evaluate the first N chunks only")
    ev.add_argument("--seq-len", type=int, default=None, help="default: the run's data.seq_len")
    ev.add_argument("--micro-batch", type=int, default=4)
    sa = sub.choices["sample"]
    sa.add_argument("--prompt", default="")
    sa.add_argument("--max-new-tokens", type=int, default=64)
    sa.add_argument("--temperature", type=float, default=0.8)
    sa.add_argument("--top-k", type=int, default=50)
    sa.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    model = load_model(args.model, args.tag)
    if args.dtype:
        model.to(DTYPES[args.dtype])
    tokenizer = load_tokenizer(args.model)
    if args.cmd == "evaluate":
        text = args.text or model.config.data.val_path
        if not text:
            ap.error("no --text and the run config has no data.val_path")
        result = evaluate(model, tokenizer, Path(text), args.max_chunks, args.seq_len, args.micro_batch)
        print(json.dumps({"text": str(text), **result}))
    else:
        out = sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                     args.top_k or None, args.seed)
        print(args.prompt + out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
