"""Tokenizers behind one small interface.

Three kinds, chosen by `build_tokenizer(kind, ...)`:

  "sentencepiece-train"  train a sentencepiece BPE model on local text files (seconds on 2 cores),
                         cached under $RESBM_CACHE/tokenizers/<key>/, key = hash(input files'
                         sha256, vocab size, settings). The default: it needs no hub.
  "sentencepiece"        load an existing sentencepiece `.model` file.
  "hf"                   a transformers tokenizer by hub name or local directory, through
                         `AutoTokenizer.from_pretrained` (the real hub code path).

The trained tokenizer is set up for byte-exact round trips, decode(encode(s)) == s, because the
model sees raw text and we want to be able to print exactly what it read and wrote:
identity normalisation (no NFKC), no whitespace squeezing, no dummy "▁" prefix, byte fallback for
characters outside the vocabulary, whitespace-only pieces allowed. One known exception: the
character U+2581 "▁" itself, which sentencepiece uses to stand for a space, decodes to " ".
`split_digits` keeps numbers digit by digit, which helps small models with arithmetic-like text.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..cli import DataError
from ..system import sha256_file
from ..system import file_lock
from .cache import cache_root

KINDS = ("sentencepiece-train", "sentencepiece", "hf")

# Everything that changes the trained model goes into the cache key.
SPM_SETTINGS = {
    "model_type": "bpe",
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "byte_fallback": True,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "character_coverage": 0.9999,
    # Sample at most this many lines (shuffled) so training takes seconds, not minutes; the
    # default corpus has ~500k lines. The shuffle is seeded, so the model is reproducible.
    "input_sentence_size": 300_000,
    "shuffle_input_sentence": True,
    "max_sentence_length": 4192,
    "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
}
SPM_SEED = 1234


class Tokenizer(abc.ABC):
    """What the data pipeline and the trainer need from a tokenizer, and nothing more."""

    name: str          # human-readable, e.g. "sentencepiece:/path/spm.model"
    fingerprint: str   # changes whenever encode() could change; keys the token caches
    vocab_size: int    # embedding rows needed: every id is < vocab_size
    eos_id: int        # appended after every document

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special tokens added."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Several texts at once; implementations use their native (multi-threaded) batch call."""
        return [self.encode(t) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        path = Path(model_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.model_file = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        self.name = f"sentencepiece:{path}"
        self.fingerprint = "spm-" + _spm_fingerprint(path)
        self.vocab_size = self._sp.vocab_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"sentencepiece model {path} has no eos token (trained with eos_id=-1); "
                             "the data pipeline needs one to mark document ends")
        self._threads = max(1, min(8, os.cpu_count() or 1))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=self._threads)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _spm_fingerprint(path: Path) -> str:
    """Hash of the model minus what its trainer_spec records about the training run (paths,
    threads): the same model trained elsewhere then shares token caches."""
    data = path.read_bytes()
    try:
        from sentencepiece import sentencepiece_model_pb2   # needs protobuf

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(data)
        proto.trainer_spec.ClearField("input")
        proto.trainer_spec.ClearField("model_prefix")
        proto.trainer_spec.ClearField("num_threads")
        data = proto.SerializeToString(deterministic=True)
    except ImportError:
        pass
    return hashlib.sha256(data).hexdigest()[:16]


class HFTokenizer(Tokenizer):
    def __init__(self, name_or_path: str, revision: str | None = None):
        from transformers import AutoTokenizer

        name_or_path = os.path.expanduser(name_or_path)   # hub names never start with "~"
        if name_or_path.startswith(("/", "./", "../")) and not os.path.exists(name_or_path):
            raise FileNotFoundError(f"hf tokenizer directory not found: {name_or_path}")
        self._tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        # We feed whole documents, far longer than any model_max_length; silence that warning.
        self._tok.model_max_length = int(1e12)
        self.name = f"hf:{name_or_path}" + (f"@{revision}" if revision else "")
        self.vocab_size = len(self._tok)   # includes added tokens, unlike .vocab_size
        if self._tok.eos_token_id is None:
            raise ValueError(f"hf tokenizer {name_or_path!r} has no eos_token_id; the data pipeline "
                             "needs one to mark document ends")
        self.eos_id = int(self._tok.eos_token_id)
        backend = getattr(self._tok, "backend_tokenizer", None)
        ident = backend.to_str() if backend is not None else json.dumps(self._tok.get_vocab(), sort_keys=True)
        self.fingerprint = "hf-" + hashlib.sha256(ident.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)


def spm_cache_key(train_files: list[str], vocab_size: int) -> str:
    import sentencepiece as spm

    ident = {"files": [sha256_file(f) for f in train_files], "vocab_size": vocab_size,
             "settings": SPM_SETTINGS, "seed": SPM_SEED, "sentencepiece": spm.__version__}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def train_sentencepiece(train_files: list[str], vocab_size: int,
                        cache_dir: str | os.PathLike | None = None) -> Path:
    """Train (or find in the cache) a BPE model; returns the path of its `.model` file."""
    import sentencepiece as spm

    if not train_files:
        raise ValueError("sentencepiece-train needs at least one training text file (train_files is empty)")
    for f in train_files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {f}")
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    key = spm_cache_key(train_files, vocab_size)
    final = root / key
    model = final / "spm.model"
    with file_lock(root / f"{key}.lock"):
        if model.is_file():
            print(f"[tokenizer] cached sentencepiece model {model}", flush=True)
            return model
        print(f"[tokenizer] training sentencepiece BPE, vocab {vocab_size}, on "
              f"{', '.join(map(str, train_files))}", flush=True)
        t0 = time.time()
        root.mkdir(parents=True, exist_ok=True)
        if final.exists():   # a directory without its model: left over from an old crash
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        try:
            spm.set_random_generator_seed(SPM_SEED)
            try:
                spm.SentencePieceTrainer.train(
                    input=[str(f) for f in train_files], model_prefix=str(tmp / "spm"),
                    vocab_size=vocab_size, num_threads=max(1, os.cpu_count() or 1), minloglevel=2,
                    **SPM_SETTINGS)
            except RuntimeError as e:   # e.g. "Vocabulary size too high (4096). Please set it to a value <= 58."
                raise DataError("data.train_path", ", ".join(map(str, train_files)),
                                f"sentencepiece cannot train a {vocab_size}-token vocabulary (model.vocab_size) "
                                f"on it: {str(e).splitlines()[0].split('] ')[-1].rstrip('.')}; give more text or a smaller "
                                "model.vocab_size") from None
            (tmp / "meta.json").write_text(json.dumps(
                {"train_files": [str(f) for f in train_files], "vocab_size": vocab_size,
                 "settings": SPM_SETTINGS, "seed": SPM_SEED, "seconds": round(time.time() - t0, 2)},
                indent=2) + "\n")
            os.replace(tmp, final)   # atomic: a half-written model is never visible
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"[tokenizer] trained in {time.time() - t0:.1f}s -> {model}", flush=True)
        return model


def save_tokenizer(tok: Tokenizer, dest: Path) -> None:
    """Write a run's tokenizer to `dest` (a run's or export's `tokenizer/`): spm.model for
    sentencepiece, a `save_pretrained` directory for transformers tokenizers."""
    dest.mkdir(parents=True, exist_ok=True)
    if isinstance(tok, SentencePieceTokenizer):
        shutil.copyfile(tok.model_file, dest / "spm.model")
    else:
        tok._tok.save_pretrained(dest)


def save_transformers_tokenizer(tok: Tokenizer, dest: Path) -> None:
    """Write `tok` in transformers format to `dest`, so `AutoTokenizer.from_pretrained(dest)` loads it.

    A sentencepiece model becomes a fast (`tokenizers`) tokenizer through transformers' own
    converter, which follows the model's normalizer settings (here: none, no dummy prefix, byte
    fallback), so ids and round trips equal sentencepiece's (tests/test_hf.py checks a run's text).
    No special token is added on encode: the model was trained on plain text with eos between
    documents. A transformers tokenizer is saved as it is."""
    from transformers import PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    if not isinstance(tok, SentencePieceTokenizer):
        tok._tok.save_pretrained(dest)
        return
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_file.read_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=False)
    sp = tok._sp
    special = {name: sp.id_to_piece(i) for name, i in
               (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())) if i >= 0}
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   model_max_length=int(1e12), **special)
    fast.save_pretrained(dest)


def load_saved_tokenizer(src: Path) -> Tokenizer:
    """The tokenizer `save_tokenizer` wrote to `src`."""
    if (src / "spm.model").is_file():
        return build_tokenizer("sentencepiece", str(src / "spm.model"))
    return build_tokenizer("hf", str(src))


def build_tokenizer(kind: str, path_or_name: str | None = None, vocab_size: int = 4096,
                    train_files: list[str] | None = None, *,
                    cache_dir: str | os.PathLike | None = None, revision: str | None = None) -> Tokenizer:
    """Make a tokenizer.

    kind="sentencepiece-train": train on `train_files` with `vocab_size` (cached; `path_or_name`
    unused). kind="sentencepiece": load the `.model` at `path_or_name`. kind="hf":
    `AutoTokenizer.from_pretrained(path_or_name)`; `vocab_size` is then whatever the tokenizer has.
    """
    if kind == "sentencepiece-train":
        return SentencePieceTokenizer(train_sentencepiece(list(train_files or []), vocab_size, cache_dir))
    if kind == "sentencepiece":
        if not path_or_name:
            raise ValueError("tokenizer kind 'sentencepiece' needs path_or_name: the .model file")
        return SentencePieceTokenizer(path_or_name)
    if kind == "hf":
        if not path_or_name:
            raise ValueError("tokenizer kind 'hf' needs path_or_name: a hub name or a local directory")
        return HFTokenizer(path_or_name, revision)
    raise ValueError(f"unknown tokenizer kind {kind!r}; allowed: {', '.join(repr(k) for k in KINDS)}")
