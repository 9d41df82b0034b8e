"""What a model that knows only token frequencies scores on the evaluation, and one that knows only
the previous token: the unigram and bigram cross-entropies of the exact tokens every evaluation
reads (each label given its input), with counts from the training split.

A run that ends near `unigram_ce` learned frequencies and nothing else (it is broken, not beaten);
one near `bigram_ce` is in the regime where knowing the current token is most of what there is to
know. The convergence suite writes both into results.json and onto its plots.

The bigram model is interpolated Kneser-Ney (discount 0.75), the usual strong count baseline.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import Config

DISCOUNT = 0.75


def label_pairs(tokens: np.ndarray, chunk_len: int, first_chunk: int, end_chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of every position of the chunks [first_chunk, end_chunk), as the trainer cuts them."""
    block = np.asarray(tokens[first_chunk * chunk_len:end_chunk * chunk_len], dtype=np.int64).reshape(-1, chunk_len)
    return block[:, :-1].ravel(), block[:, 1:].ravel()


class CountModels:
    """Unigram (add-one) and interpolated Kneser-Ney bigram probabilities from a token stream."""

    def __init__(self, train_tokens: np.ndarray, vocab: int):
        t = np.asarray(train_tokens, dtype=np.int64)
        self.vocab = vocab
        self.unigram = np.bincount(t, minlength=vocab).astype(np.float64)
        pair = t[:-1] * vocab + t[1:]
        keys, counts = np.unique(pair, return_counts=True)
        self.pair_counts = dict(zip(keys.tolist(), counts.tolist()))
        prev = keys // vocab
        self.context_total = np.bincount(prev, weights=counts, minlength=vocab)     # c(a, .)
        self.context_types = np.bincount(prev, minlength=vocab).astype(np.float64)  # N1+(a, .)
        continuation = np.bincount(keys % vocab, minlength=vocab).astype(np.float64)   # N1+(., b)
        self.p_continuation = (continuation + 1) / (continuation.sum() + vocab)     # add-one: never 0

    def unigram_ce(self, labels: np.ndarray) -> float:
        p = (self.unigram + 1) / (self.unigram.sum() + self.vocab)
        return float(-np.log(p[labels]).mean())

    def bigram_ce(self, inputs: np.ndarray, labels: np.ndarray) -> float:
        c_ab = np.array([self.pair_counts.get(k, 0) for k in (inputs * self.vocab + labels).tolist()], dtype=np.float64)
        c_a = self.context_total[inputs]
        seen = c_a > 0
        lam = np.where(seen, DISCOUNT * self.context_types[inputs] / np.maximum(c_a, 1), 1.0)
        p = np.where(seen, np.maximum(c_ab - DISCOUNT, 0) / np.maximum(c_a, 1), 0.0) + lam * self.p_continuation[labels]
        return float(-np.log(p).mean())


def eval_reference(cfg: Config) -> dict:
    """tokens, unigram_ce and bigram_ce of the evaluation `cfg` runs (train.eval_batches, per source
    for the default corpus), overall and per source, for one data-parallel rank of 1."""
    from ..data.batches import tokenize_to_array
    from ..data.sources import evaluation_parts, make_tokenizer, text_sources

    train_src, val_src = text_sources(cfg)
    tok = make_tokenizer(cfg, train_src)
    models = CountModels(tokenize_to_array(train_src, tok), cfg.model.vocab_size)
    val = tokenize_to_array(val_src, tok)
    chunk, per_batch = cfg.data.seq_len + 1, cfg.micro_batch_size
    out, pairs = {"by_source": {}}, []
    for part, n in evaluation_parts(cfg, val_src, tok, dp=1):
        first = part.first_chunk if part else 0
        x, y = label_pairs(val, chunk, first, first + n * per_batch)
        pairs.append((x, y))
        if part:
            out["by_source"][part.name] = dict(tokens=int(y.size), unigram_ce=models.unigram_ce(y),
                                               bigram_ce=models.bigram_ce(x, y))
    x, y = np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    out.update(tokens=int(y.size), unigram_ce=models.unigram_ce(y), bigram_ce=models.bigram_ce(x, y),
               bigram_model=f"interpolated Kneser-Ney, discount {DISCOUNT}", counts_from="the training split")
    if not out["by_source"]:
        del out["by_source"]
    assert math.isfinite(out["bigram_ce"])
    return out
