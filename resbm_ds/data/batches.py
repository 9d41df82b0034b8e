"""A packed token stream for a pipeline-parallel trainer.

Documents are tokenised, each followed by eos, concatenated, and cut into chunks of seq_len + 1
tokens; a chunk gives inputs = chunk[:-1] and labels = chunk[1:]. No padding, no attention masks:
every position is a real training target (the nanoGPT / GPT-NeoX way).

Sharding across data-parallel ranks is by chunk: in each epoch's (possibly shuffled) order, the
i-th chunk goes to rank i % dp_size. Only whole groups of dp_size chunks are used, so every rank
gets the same number of micro-batches, which DeepSpeed's lock-step pipeline schedule requires.

`PackedBatches` yields `(inputs, labels)` tuples of LongTensors [micro_batch, seq_len]: DeepSpeed's
PipelineEngine feeds batch[0] to the first stage and batch[1] to the loss on the last stage.

Two modes, chosen by the source:
  * local files (default): the whole source is tokenised once and cached as a .npy file under
    $RESBM_CACHE/tokens/ (key: file hashes + tokenizer fingerprint), then memory-mapped. Random
    access makes chunk-level shuffling (seed + epoch) and resuming free.
  * streaming (hub datasets, or a local source with streaming=True): documents are tokenised
    lazily as they arrive; there is no chunk-level shuffle (hub rows can be buffer-shuffled) and
    resuming re-reads the stream up to the saved position.

Local text files: a line holding only "\\f" separates documents (that is how `resbm_ds.corpus`
writes them); a .txt file without such lines is a single document. .jsonl/.json and .parquet
files have one document per row, in the `text_field` column.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..system import is_, path_kind, unreachable
from ..cli import DataError
from ..config import Config
from ..system import sha256_file
from ..system import file_lock
from .cache import cache_root
from .corpus import DOC_SEPARATOR
from .tokenizer import Tokenizer

DATA_VERSION = 1   # bump when tokenisation/packing changes: old token caches stop matching

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextSource:
    """Where documents come from: local files (`path`) or a hub dataset (`name`)."""

    path: str | tuple[str, ...] | None = None   # local file, or several files of one kind
    name: str | None = None                     # hub dataset, e.g. "allenai/c4"
    config: str | None = None                   # hub config, e.g. "en"
    revision: str | None = None                 # hub commit / tag / branch to pin (data.hub_revision)
    split: str = "train"
    text_field: str = "text"
    streaming: bool | None = None               # None: True for hub, False for local files
    shuffle_buffer: int = 10_000                # streaming row shuffle (hub/json/parquet only)

    def __post_init__(self):
        if (self.path is None) == (self.name is None):
            raise ValueError("TextSource needs exactly one of path= (local files) or name= (hub dataset)")
        if isinstance(self.path, list):
            object.__setattr__(self, "path", tuple(self.path))

    @classmethod
    def local(cls, path: str | os.PathLike | list, text_field: str = "text", streaming: bool = False) -> "TextSource":
        paths = tuple(str(p) for p in path) if isinstance(path, (list, tuple)) else str(path)
        return cls(path=paths, text_field=text_field, streaming=streaming)

    @classmethod
    def hub(cls, name: str, config: str | None = None, split: str = "train", text_field: str = "text",
            streaming: bool = True, revision: str | None = None) -> "TextSource":
        return cls(name=name, config=config, split=split, text_field=text_field, streaming=streaming,
                   revision=revision)

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def is_streaming(self) -> bool:
        return (not self.is_local) if self.streaming is None else bool(self.streaming)

    def files(self) -> list[Path]:
        """The local files, checked: they exist and share one known extension."""
        paths = [Path(p).expanduser() for p in ((self.path,) if isinstance(self.path, str) else self.path)]
        if not paths:
            raise ValueError("TextSource.path is empty")
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"data file not found: {p}")
        kinds = {self._builder_of(p) for p in paths}
        if len(kinds) != 1:
            raise ValueError(f"TextSource files mix formats {sorted(kinds)}; use one kind per source")
        return paths

    @staticmethod
    def _builder_of(p: Path) -> str:
        try:
            return _BUILDERS[p.suffix.lower()]
        except KeyError:
            raise ValueError(f"unsupported data file extension {p.suffix!r} ({p}); "
                             f"allowed: {', '.join(sorted(_BUILDERS))}") from None

    def describe(self) -> str:
        if self.is_local:
            return ", ".join(str(p) for p in self.files())
        return (f"hub:{self.name}" + (f"/{self.config}" if self.config else "")
                + (f"@{self.revision}" if self.revision else "") + f"[{self.split}]")


HUB_DEADLINE_S = 10   # to reach the Hugging Face hub, checked before launch


def check_hub_reachable(cfg: Config) -> None:
    """A run that reads from the hub (data.source=hub, or data.tokenizer=hf naming no local
    directory) must reach it (HF_ENDPOINT, default huggingface.co) within HUB_DEADLINE_S before
    launch: unreachable, every rank would wait in the first download. With HF_HUB_OFFLINE=1 the
    libraries read their cache and fail at once where it lacks something."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    d = cfg.data
    key, value = (("data.hub_name", d.hub_name) if d.source == "hub" else
                  ("data.tokenizer_path", d.tokenizer_path)
                  if d.tokenizer == "hf" and d.tokenizer_path and not Path(d.tokenizer_path).expanduser().is_dir()
                  else (None, None))
    if key is None:
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    why = unreachable(endpoint, HUB_DEADLINE_S)
    if why:
        raise DataError(key, value, f"is read from the hub, and it {why}; set HF_ENDPOINT to a mirror, use "
                                    "local files, or set HF_HUB_OFFLINE=1 to read the local cache")


def check_local_file(path: str | os.PathLike, key: str) -> Path:
    """A data file the run can read: a regular file with a known extension, not empty, and (for text
    and JSON) UTF-8 without NUL bytes. Raises DataError naming `key` (data.train_path / val_path)."""
    p = Path(path).expanduser()
    kind = path_kind(p)
    if kind == "a directory":
        raise DataError(key, p, "is a directory; give a file (or a list of files)")
    if kind != "a regular file":
        raise DataError(key, p, f"{is_(kind)}; give a regular file")
    if p.suffix.lower() not in _BUILDERS:
        raise DataError(key, p, f"unsupported extension {p.suffix!r}; allowed: {', '.join(sorted(_BUILDERS))}")
    try:
        f = open(p, "rb")
    except OSError as e:
        raise DataError(key, p, f"cannot be read ({e.strerror})") from None
    with f:
        text = _BUILDERS[p.suffix.lower()] != "parquet"
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        while block := f.read(1 << 20):
            if not text:
                break
            if (nul := block.find(b"\0")) >= 0:
                raise DataError(key, p, f"looks binary (a NUL byte at offset {offset + nul}); text must be UTF-8")
            try:
                decoder.decode(block, final=len(block) < 1 << 20)
            except UnicodeDecodeError as e:
                raise DataError(key, p, f"is not UTF-8 (byte 0x{block[e.start]:02x} at offset {offset + e.start}); "
                                        "convert it, e.g. iconv -f latin1 -t utf-8") from None
            offset += len(block)
        if f.tell() == 0:
            raise DataError(key, p, "is empty")
    return p


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------

def _text_file_documents(path: Path) -> Iterator[str]:
    """Documents of one text file, split at lines holding only DOC_SEPARATOR."""
    from datasets import load_dataset

    # keep_linebreaks: a document's text is exactly the file's text, newlines included.
    ds = load_dataset("text", data_files=[str(path)], split="train", streaming=True, keep_linebreaks=True)
    lines: list[str] = []
    for row in ds:
        line = row["text"]
        if line.rstrip("\r\n") == DOC_SEPARATOR:
            yield "".join(lines).removesuffix("\n")
            lines = []
        else:
            lines.append(line)
    if lines:
        yield "".join(lines).removesuffix("\n")


def iter_documents(source: TextSource, shuffle_seed: int | None = None) -> Iterator[str]:
    """Every document of the source, in order (or row-shuffled by `shuffle_seed` where rows are
    documents and the source streams)."""
    from datasets import load_dataset

    if source.is_local:
        files = source.files()
        builder = source._builder_of(files[0])
        if builder == "text":
            for f in files:   # one file at a time, so documents never run across files
                yield from _text_file_documents(f)
            return
        ds = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
    else:
        ds = load_dataset(source.name, source.config, split=source.split, streaming=source.is_streaming,
                          revision=source.revision)
    if shuffle_seed is not None and source.is_streaming:
        ds = ds.shuffle(seed=shuffle_seed, buffer_size=source.shuffle_buffer)
    for row in ds:
        if source.text_field not in row:
            raise DataError("data.text_field", source.text_field,
                            f"the rows of {source.describe()} have no such field; their fields: {sorted(row)}")
        text = row[source.text_field]
        if text:
            yield text


def _token_batches(docs: Iterator[str], tokenizer: Tokenizer, docs_per_call: int = 64) -> Iterator[list[int]]:
    """Token ids of each document followed by eos, tokenised a few documents per call."""
    buf: list[str] = []
    for doc in docs:
        buf.append(doc)
        if len(buf) == docs_per_call:
            for ids in tokenizer.encode_batch(buf):
                yield ids + [tokenizer.eos_id]
            buf = []
    if buf:
        for ids in tokenizer.encode_batch(buf):
            yield ids + [tokenizer.eos_id]


def tokenize_to_array(source: TextSource, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The whole local source as one token array (memory-mapped from a cached .npy)."""
    files = source.files()
    ident = {"version": DATA_VERSION, "files": [sha256_file(f) for f in files],
             "text_field": source.text_field, "tokenizer": tokenizer.fingerprint}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "tokens"
    path = root / f"{key}.npy"
    with file_lock(root / f"{key}.lock"):
        if not path.is_file():
            t0 = time.time()
            dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
            parts, n_docs = [], 0
            for ids in _token_batches(iter_documents(source), tokenizer):
                parts.append(np.asarray(ids, dtype=dtype))
                n_docs += 1
            tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
            tmp = root / f".{key}.{os.getpid()}.npy"
            np.save(tmp, tokens)
            os.replace(tmp, path)
            (root / f"{key}.json").write_text(json.dumps(
                {**ident, "source": source.describe(), "tokenizer_name": tokenizer.name,
                 "documents": n_docs, "tokens": int(tokens.size)}, indent=2) + "\n")
            print(f"[data] tokenised {source.describe()}: {n_docs} documents, {tokens.size:,} tokens "
                  f"in {time.time() - t0:.1f}s -> {path}", flush=True)
    return np.load(path, mmap_mode="r")


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

class PackedBatches:
    """An iterator of (inputs, labels) LongTensors [micro_batch, seq_len] for one data-parallel rank.

    loop=True restarts at the end (next epoch, chunk order reshuffled with seed + epoch when
    shuffle=True); loop=False stops after one pass, or after max_batches.
    state_dict()/load_state_dict() resume exactly at the next micro-batch.
    """

    def __init__(self, source: TextSource, tokenizer: Tokenizer, seq_len: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0, loop: bool = True,
                 shuffle: bool = True, max_batches: int | None = None,
                 cache_dir: str | os.PathLike | None = None, chunk_range: tuple[int, int] | None = None):
        if seq_len < 1 or micro_batch < 1:
            raise ValueError(f"seq_len ({seq_len}) and micro_batch ({micro_batch}) must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        self.source, self.tokenizer = source, tokenizer
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.loop, self.shuffle, self.max_batches = seed, loop, shuffle, max_batches
        self.chunk_len = seq_len + 1
        if chunk_range is not None and shuffle:
            raise ValueError("chunk_range (a fixed slice of the chunks, for evaluation) needs shuffle=False")
        self.chunk_range = chunk_range

        self.tokens: np.ndarray | None = None
        if source.is_local and not source.is_streaming:
            self.tokens = tokenize_to_array(source, tokenizer, cache_dir)
            first, end = chunk_range or (0, len(self.tokens) // self.chunk_len)
            n_chunks = max(0, min(end, len(self.tokens) // self.chunk_len) - first)
            self.chunks_per_rank = n_chunks // dp_size
            self.batches_per_epoch: int | None = self.chunks_per_rank // micro_batch
            if self.batches_per_epoch == 0:
                raise ValueError(f"{source.describe()} has {len(self.tokens):,} tokens = {n_chunks} chunks of "
                                 f"{self.chunk_len}: not one micro-batch of {micro_batch} per rank for "
                                 f"dp_size={dp_size}")
        else:
            if source.is_local:
                source.files()   # fail now, not at the first next(), on a missing file
            self.batches_per_epoch = None   # unknown until the stream ends
        self._set_position(epoch=0, batch=0, served=0)

    # -- position ----------------------------------------------------------------------------

    def _set_position(self, epoch: int, batch: int, served: int) -> None:
        self.epoch, self.batch_in_epoch, self.batches_served = epoch, batch, served
        if self.tokens is not None:
            self._rank_chunks = self._chunk_order(epoch)
        else:
            self._stream = self._stream_batches(epoch)
            for _ in range(batch):   # no random access: re-read the stream up to the position
                if next(self._stream, None) is None:
                    raise ValueError(f"cannot resume at batch {batch} of epoch {epoch}: the stream "
                                     "is shorter than when the state was saved")

    def _chunk_order(self, epoch: int) -> np.ndarray:
        """This rank's chunk indices for `epoch`: position i of the epoch order goes to rank i % dp."""
        n = self.chunks_per_rank * self.dp_size
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.tokens) // self.chunk_len)[:n]
        else:
            order = np.arange(n) + (self.chunk_range[0] if self.chunk_range else 0)
        return order[self.dp_rank::self.dp_size]

    def _stream_batches(self, epoch: int) -> Iterator[np.ndarray]:
        """Streaming mode: [micro_batch, seq_len + 1] arrays for this rank, one epoch."""
        docs = iter_documents(self.source, shuffle_seed=self.seed + epoch if self.shuffle else None)
        buf: list[int] = []
        group: list[list[int]] = []    # dp_size consecutive chunks; ours is group[dp_rank]
        mine: list[list[int]] = []
        for ids in _token_batches(docs, self.tokenizer):
            buf.extend(ids)
            while len(buf) >= self.chunk_len:
                group.append(buf[:self.chunk_len])
                del buf[:self.chunk_len]
                if len(group) == self.dp_size:    # only whole groups: every rank gets as many
                    mine.append(group[self.dp_rank])
                    group = []
                    if len(mine) == self.micro_batch:
                        yield np.asarray(mine, dtype=np.int64)
                        mine = []

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> "PackedBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_batches is not None and self.batches_served >= self.max_batches:
            raise StopIteration
        chunk = self._next_chunk_batch()
        if chunk is None:                       # end of epoch
            if not self.loop:
                raise StopIteration
            if self.batch_in_epoch == 0:
                raise ValueError(f"{self.source.describe()}: an epoch produced no micro-batch")
            self._set_position(self.epoch + 1, 0, self.batches_served)
            chunk = self._next_chunk_batch()
            if chunk is None:
                raise ValueError(f"{self.source.describe()}: an epoch produced no micro-batch")
        self.batch_in_epoch += 1
        self.batches_served += 1
        x = torch.from_numpy(chunk)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def _next_chunk_batch(self) -> np.ndarray | None:
        if self.tokens is None:
            return next(self._stream, None)
        if self.batch_in_epoch >= self.batches_per_epoch:
            return None
        b, m, L = self.batch_in_epoch, self.micro_batch, self.chunk_len
        idx = self._rank_chunks[b * m:(b + 1) * m]
        return np.stack([self.tokens[i * L:(i + 1) * L] for i in idx]).astype(np.int64)

    def __len__(self) -> int:
        """Micro-batches in one pass (loop=False), where known without reading the stream."""
        if self.batches_per_epoch is None:
            raise TypeError("a streaming PackedBatches does not know its length")
        n = self.batches_per_epoch
        return n if self.max_batches is None else min(n, self.max_batches)

    # -- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Where we are, plus the settings that must match on resume. Identical on every rank
        (dp_rank is informational), so saving one rank's state is enough."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "batches_served": self.batches_served, "seq_len": self.seq_len,
                "micro_batch": self.micro_batch, "dp_size": self.dp_size, "dp_rank": self.dp_rank,
                "seed": self.seed, "shuffle": self.shuffle, "tokenizer": self.tokenizer.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seq_len", "micro_batch", "dp_size", "seed", "shuffle", "tokenizer"):
            mine = self.tokenizer.fingerprint if k == "tokenizer" else getattr(self, k)
            if state.get(k) != mine:
                raise ValueError(f"data state was saved with {k}={state.get(k)!r} but this run has "
                                 f"{k}={mine!r}; the stream would not continue where it stopped")
        self._set_position(int(state["epoch"]), int(state["batch_in_epoch"]), int(state["batches_served"]))


def validation_batches(source: TextSource, tokenizer: Tokenizer, seq_len: int, micro_batch: int,
                       dp_rank: int = 0, dp_size: int = 1, num_batches: int | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       chunk_range: tuple[int, int] | None = None) -> PackedBatches:
    """A fresh, fixed, unshuffled pass over validation text (or the chunks `chunk_range` of it): the
    same batches every evaluation. Call it again for each evaluation (cheap: the tokens are cached
    and memory-mapped)."""
    return PackedBatches(source, tokenizer, seq_len, micro_batch, dp_rank=dp_rank, dp_size=dp_size,
                         seed=0, loop=False, shuffle=False, max_batches=num_batches, cache_dir=cache_dir,
                         chunk_range=chunk_range)


@dataclass(frozen=True)
class EvalPart:
    """The validation chunks [first_chunk, end_chunk) that come from one source."""
    name: str
    first_chunk: int
    end_chunk: int


def eval_parts(tokens: np.ndarray, chunk_len: int, eos_id: int,
               sources: list[tuple[str, int]] | None = None) -> list[EvalPart]:
    """Split a validation token array into per-source chunk ranges. `sources` is [(name, documents)]
    in file order (the default corpus writes val.txt source by source); each document ends with eos.
    A chunk belongs to the source of its first token. Without `sources`: one part, "all"."""
    n = len(tokens) // chunk_len
    if not sources:
        return [EvalPart("all", 0, n)]
    doc_ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1     # one past each document's eos
    if len(doc_ends) != sum(d for _, d in sources):
        raise ValueError(f"the validation text has {len(doc_ends)} documents, the source list says "
                         f"{sum(d for _, d in sources)}")
    parts, first, docs = [], 0, 0
    for name, n_docs in sources:
        docs += n_docs
        end = min(n, -(-int(doc_ends[docs - 1]) // chunk_len))         # chunks starting before the end
        parts.append(EvalPart(name, first, end))
        first = end
    return parts
