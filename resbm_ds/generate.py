"""Evaluate and sample a trained model on one process, with its tokenizer.

    python -m resbm_ds.generate evaluate MODEL [--text FILE] [--max-chunks N]
    python -m resbm_ds.generate sample MODEL --prompt "Once upon" [--max-new-tokens 64]

MODEL is a run directory (its latest checkpoint is consolidated in memory), an exported directory
(`python -m resbm_ds.export`) or a transformers directory (`export --hf`, or any Llama / Qwen2 /
Mistral `save_pretrained` directory with its tokenizer). Every model runs as a transformers model
(hf/modeling.py for ResBM), so sampling uses transformers' `generate()` with its KV cache.

`evaluate` packs the text exactly like the trainer's validation data (documents + eos, chunks of
seq_len + 1, no shuffle) and reports the mean next-token loss and its perplexity as one JSON line;
the text defaults to the run's validation text (the default corpus' val.txt when the run used
it), and the first N chunks are the chunks that a data-parallel validation pass over N chunks
covers, so the number is comparable with the run's validation loss.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from .cli import ArgumentParser, ConfigError, cli, existing_file, float_in, int_at_least
from .config import Config
from .data.batches import TextSource, validation_batches
from .data.sources import text_sources
from .data.tokenizer import build_tokenizer, load_saved_tokenizer
from .export import is_exported, load_model, tokenizer_dir
from .hf.modeling import ResBMHFForCausalLM
from .model.causal_lm import ResBMForCausalLM
from .wire_bytes import DTYPES


def load_tokenizer(path):
    """The tokenizer of a run or export directory (`<dir>/tokenizer`), or of a transformers directory."""
    if is_transformers_dir(path):
        return build_tokenizer("hf", str(path))
    tok_dir = tokenizer_dir(path)
    if tok_dir is None:
        raise FileNotFoundError(f"{path}: no tokenizer/ directory (in it or its parents)")
    return load_saved_tokenizer(tok_dir)


def is_transformers_dir(path) -> bool:
    return (Path(path) / "config.json").is_file() and not is_exported(path)


def load_transformers_model(path, tag: str | None = None) -> tuple[PreTrainedModel, Config | None]:
    """A run, an export or a transformers directory as a transformers model, and the resbm-ds
    Config it was trained with (None for a transformers directory: it keeps the model, not the run)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such run, export or transformers directory")
    if is_transformers_dir(path):
        return AutoModelForCausalLM.from_pretrained(str(path)), None
    twin = load_model(path, tag)
    return ResBMHFForCausalLM.from_resbm(twin), twin.trained_with


def as_transformers(model) -> PreTrainedModel:
    return ResBMHFForCausalLM.from_resbm(model) if isinstance(model, ResBMForCausalLM) else model


@torch.no_grad()
def evaluate(model, tokenizer, text, max_chunks: int | None = None, seq_len: int | None = None,
             micro_batch: int = 4) -> dict:
    """Mean next-token loss (and perplexity) over the first `max_chunks` chunks (all by default)
    of `text` (a file path or a TextSource). `model`: a ResBMForCausalLM or a transformers model."""
    model = as_transformers(model)
    if seq_len is None:
        run = model.resbm.trained_with if isinstance(model, ResBMHFForCausalLM) else None
        if run is None:
            raise ConfigError("--seq-len", None, "needed for a transformers model (a transformers directory keeps "
                                                 "the model, not the run's data.seq_len)")
        seq_len = run.data.seq_len
    source = text if isinstance(text, TextSource) else TextSource.local(str(text))
    batches = validation_batches(source, tokenizer, seq_len, micro_batch)
    model.eval()
    nll, tokens, chunks = 0.0, 0, 0
    for x, y in batches:
        if max_chunks is not None:
            x, y = x[: max_chunks - chunks], y[: max_chunks - chunks]
        logits = model(x, use_cache=False).logits
        # Summed in fp32 per batch, accumulated in float64: the mean does not depend on batching.
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        tokens, chunks = tokens + y.numel(), chunks + len(x)
        if max_chunks is not None and chunks >= max_chunks:
            break
    if max_chunks is not None and chunks < max_chunks:
        raise ValueError(f"{source.describe()}: only {chunks} chunks of {seq_len + 1} tokens, asked for {max_chunks}")
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "chunks": chunks}


@torch.no_grad()
def sample(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
           top_k: int | None = 50, seed: int = 0, stop_at_eos: bool = True) -> str:
    """Continue `prompt` with transformers' `generate()` and its KV cache (returns only the new
    text). temperature 0 = greedy. A prompt longer than the model's window keeps its end."""
    model = as_transformers(model).eval()
    window = model.config.max_position_embeddings
    if max_new_tokens >= window:
        raise ConfigError("--max-new-tokens", max_new_tokens, f"must be below the model's window ({window})")
    ids = (tokenizer.encode(prompt) or [tokenizer.eos_id])[-(window - max_new_tokens):]  # empty: a new document
    ctx = torch.tensor([ids])
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or 0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(ctx, attention_mask=torch.ones_like(ctx), max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_id if stop_at_eos else None,
                             pad_token_id=tokenizer.eos_id, top_p=None, **sampling)
    new = out[0, len(ids):].tolist()
    if stop_at_eos and tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)


def default_text(cfg: Config | None) -> TextSource:
    """The run's validation text: data.val_path, the default corpus' val.txt, or the hub split."""
    if cfg is None:
        raise ConfigError("--text", None, "needed for a transformers model (a transformers directory keeps the "
                                          "model, not the run's validation text)")
    try:
        return text_sources(cfg)[1]
    except (ConfigError, FileNotFoundError) as e:
        raise ConfigError("--text", None, f"the run's validation text is not available here ({e}); "
                                          "pass --text FILE") from None


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m resbm_ds.generate", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("evaluate", "sample"):
        p = sub.add_parser(name)
        p.add_argument("model", help="run directory (latest checkpoint), export or transformers directory")
        p.add_argument("--tag", default=None, help="checkpoint tag when MODEL is a run directory")
        p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                       help="compute dtype (default: the dtype the model was trained in)")
    ev = sub.choices["evaluate"]
    ev.add_argument("--text", type=existing_file, default=None, help="text file (default: the run's validation text)")
    ev.add_argument("--max-chunks", type=int_at_least(1), default=None, help="evaluate the first N chunks only")
    ev.add_argument("--seq-len", type=int_at_least(1), default=None, help="default: the run's data.seq_len")
    ev.add_argument("--micro-batch", type=int_at_least(1), default=4)
    sa = sub.choices["sample"]
    sa.add_argument("--prompt", default="")
    sa.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    sa.add_argument("--temperature", type=float_in(0, 100), default=0.8, help="0: greedy")
    sa.add_argument("--top-k", type=int_at_least(0), default=50, help="0: no top-k cut")
    sa.add_argument("--seed", type=int_at_least(0), default=0)
    return run(ap.parse_args(argv))


def run(args) -> int:
    model, cfg = load_transformers_model(args.model, args.tag)
    if args.dtype:
        model.to(DTYPES[args.dtype])
    tokenizer = load_tokenizer(args.model)
    if args.cmd == "evaluate":
        text = TextSource.local(args.text) if args.text else default_text(cfg)
        result = evaluate(model, tokenizer, text, args.max_chunks, args.seq_len, args.micro_batch)
        print(json.dumps({"text": text.describe(), **result}))
    else:
        out = sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                     args.top_k or None, args.seed)
        print(args.prompt + out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
