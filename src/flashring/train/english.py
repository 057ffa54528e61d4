"""A natural-language corpus that needs no network: English prose that installed software ships, BPE-tokenised.

Sources (``--corpus english``):
- the docstrings of every ``.py`` file under the Python installation (``purelib`` site-packages and the stdlib by
  default, or ``--corpus-root``): module, class and function docstrings of at least ``MIN_WORDS`` words that are
  mostly letters and spaces (prose, not code or tables), exact duplicates dropped. On the CPU development machine
  (torch, transformers, triton, numpy...) that is ~48k docstrings, ~21 MB of text;
- optionally the HTML / text / reStructuredText files under ``--text-root`` directories, e.g. an unpacked Debian
  documentation package (``apt-get download linux-doc-6.1``, a 37 MB .deb: the Linux kernel's documentation as
  HTML; ``dpkg -x`` it and pass ``.../usr/share/doc/linux-doc-6.1/html``) with the markup stripped. Both together
  on the CPU development machine: 65k documents, 58 MB of text, 14.5M + 0.6M tokens at BPE 8192, built in 134 s
  on 2 cores.
The split is by source file (every ``val_every``-th file of the sorted list goes to validation). A byte-level BPE
(``tokenizers``, vocabulary ``bpe_vocab``) is trained on the training split; both splits are encoded to uint16
with a document-separator token between documents and cached under ``cache_dir`` with the tokenizer and a
``meta.json`` giving the sizes (files, documents, bytes of text, tokens).
"""
from __future__ import annotations

import ast
import hashlib
import html.parser
import json
import os
import sysconfig
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from .config import DEFAULT_CACHE
from .data import Corpus, split_files, tmp_name

MIN_WORDS = 8
PROSE_SHARE = 0.85          # letters + whitespace share of a kept docstring
TEXT_SUFFIXES = (".html", ".htm", ".txt", ".rst")
SKIP_DIRS = {"_sources", "_static", "_images", "_downloads"}
DOC_TOKEN = "<|doc|>"


def _docstrings(path: str) -> List[str]:
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError, OSError, RecursionError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text and _is_prose(text):
                out.append(text)
    return out


def _is_prose(text: str) -> bool:
    return len(text.split()) >= MIN_WORDS and sum(c.isalpha() or c.isspace() for c in text) >= PROSE_SHARE * len(text)


class _TextOnly(html.parser.HTMLParser):
    SKIP = {"script", "style", "pre", "code"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        self.skipping += tag in self.SKIP

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def _text_file(path: str) -> List[str]:
    """Paragraphs of prose from an HTML / text file (blank-line separated; non-prose paragraphs dropped)."""
    try:
        raw = Path(path).read_text(errors="replace")
    except OSError:
        return []
    if path.endswith((".html", ".htm")):
        parser = _TextOnly()
        parser.feed(raw)
        raw = "".join(parser.parts)
    paragraphs = [" ".join(p.split()) for p in raw.split("\n\n")]
    kept = [p for p in paragraphs if _is_prose(p)]
    return ["\n\n".join(kept)] if kept else []


def _extract(path: str) -> List[str]:
    return _docstrings(path) if path.endswith(".py") else _text_file(path)


def source_files(roots: Sequence[Path], text_roots: Sequence[Path]) -> List[Path]:
    files = set()
    for root in roots:
        files.update(p for p in root.rglob("*.py") if p.is_file() and "__pycache__" not in p.parts)
    for root in text_roots:     # Sphinx's _sources/ hold the same pages again as .txt: skipped, as are assets
        files.update(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                     and not SKIP_DIRS & set(p.relative_to(root).parts))
    return sorted(files)


def _documents(files: Sequence[Path], workers: int) -> List[List[str]]:
    paths = [str(f) for f in files]
    if workers <= 1 or len(paths) < 64:
        return [_extract(p) for p in paths]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_extract, paths, chunksize=64))


def english_corpus(roots: Optional[Sequence[os.PathLike]] = None, text_roots: Sequence[os.PathLike] = (),
                   cache_dir: Optional[os.PathLike] = None, val_every: int = 20, bpe_vocab: int = 8192,
                   workers: Optional[int] = None):
    """Build (once; cached) and load the English corpus. Returns a ``data.Corpus`` of uint16 BPE ids."""
    if not 256 < bpe_vocab <= 65535:
        raise ValueError(f"--bpe-vocab must be in (256, 65535] (uint16 ids, above the 256 byte symbols), got "
                         f"{bpe_vocab}")
    paths = sysconfig.get_paths()
    roots = [Path(r).resolve() for r in (roots or (paths["purelib"], paths["stdlib"]))]
    text_roots = [Path(r).resolve() for r in text_roots]
    for r in roots + text_roots:
        if not r.is_dir():
            raise ValueError(f"{r}: not a directory (corpus source)")
    files = source_files(roots, text_roots)
    if len(files) < val_every:
        raise ValueError(f"found {len(files)} source files under {', '.join(map(str, roots + text_roots))}; need at "
                         f"least val_every={val_every}")
    try:
        import tokenizers
        tok_version = tokenizers.__version__
    except ImportError:
        tok_version = None
    # the key: every setting that shapes the result, and each source file's name, size and mtime
    key = hashlib.sha256(json.dumps([MIN_WORDS, PROSE_SHARE, TEXT_SUFFIXES, sorted(SKIP_DIRS),
                                     sorted(_TextOnly.SKIP), DOC_TOKEN, tok_version, bpe_vocab, val_every,
                                     [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]).encode()
                         ).hexdigest()[:16]
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE) / f"english-{key}"
    meta_path = cache / "meta.json"
    if not meta_path.exists():
        _build(files, cache, val_every, bpe_vocab, workers or min(16, os.cpu_count() or 1), roots, text_roots)
    return corpus_dir(cache)


CORPUS_FILES = ("meta.json", "train.bin", "val.bin")


def corpus_dir(path: os.PathLike) -> Corpus:
    """A built corpus directory (``meta.json``, ``train.bin``, ``val.bin``: what ``--corpus english`` caches) as a
    ``Corpus``. Copy one to another machine and pass it as ``--data DIR`` to train on exactly the same tokens
    there (the cache key depends on the installed files, which differ between machines). Every problem is a
    ValueError naming ``--data`` and the path."""
    path = Path(path)
    missing = [n for n in CORPUS_FILES if not (path / n).is_file()]
    if missing:
        raise ValueError(f"--data {path}: a corpus directory needs {', '.join(CORPUS_FILES)}; missing "
                         f"{', '.join(missing)}")
    try:
        meta = json.loads((path / "meta.json").read_text())
        vocab = int(meta["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--data {path}: unreadable meta.json ({type(exc).__name__}: {exc})") from None
    try:
        sizes = {n: (path / f"{n}.bin").stat().st_size for n in ("train", "val")}
    except OSError as exc:
        raise ValueError(f"--data {path}: cannot read {exc.filename}: {exc.strerror or exc}") from None
    for n, size in sizes.items():
        if size == 0 or size % 2:
            raise ValueError(f"--data {path}: {n}.bin must hold uint16 tokens (a non-zero, even size), got "
                             f"{size} bytes")
        if f"{n}_tokens" in meta and meta[f"{n}_tokens"] != size // 2:
            raise ValueError(f"--data {path}: {n}.bin holds {size // 2} tokens, meta.json says "
                             f"{meta[f'{n}_tokens']} (a truncated copy?)")
    known = all(isinstance(meta.get(n), (int, float)) for n in ("documents", "text_bytes", "files_with_text"))
    desc = (f"English prose ({meta['documents']:,} documents, {meta['text_bytes'] / 1e6:.1f} MB of text from "
            f"{meta['files_with_text']:,} files; BPE {vocab}; {path})" if known else str(path))
    corpus = Corpus(train=np.memmap(path / "train.bin", dtype=np.uint16, mode="r"),
                    val=np.memmap(path / "val.bin", dtype=np.uint16, mode="r"), vocab_size=vocab, source=desc)
    corpus.check_vocab(vocab, "meta.json's vocab_size")      # one pass over the ids: ~20 ms for 15M tokens
    return corpus


def _build(files, cache: Path, val_every: int, bpe_vocab: int, workers: int, roots, text_roots) -> None:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ValueError("--corpus english needs the tokenizers package (pip install tokenizers; transformers "
                         "depends on it)") from None
    cache.mkdir(parents=True, exist_ok=True)
    train_f, val_f = split_files(list(files), val_every)
    seen = set()

    def unique(docs_per_file: Iterable[List[str]]) -> List[str]:
        out = []
        for docs in docs_per_file:
            for d in docs:
                h = hashlib.sha1(d.encode()).digest()
                if h not in seen:
                    seen.add(h)
                    out.append(d)
        return out

    train_docs = _documents(train_f, workers)
    val_docs = _documents(val_f, workers)
    with_text = sum(bool(d) for d in train_docs + val_docs)
    train_docs, val_docs = unique(train_docs), unique(val_docs)      # val loses what train already holds
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, special_tokens=[DOC_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    for name, docs in (("training", train_docs), ("validation", val_docs)):
        if not docs:
            raise ValueError(f"--corpus english: the {name} files ({len(train_f if name == 'training' else val_f)}"
                             f" of {len(files)}) hold no prose that the training files do not already hold; "
                             "give more sources (--corpus-root / --text-root) or a different --val-every")
    # the separator is a special token: text that happens to contain its spelling must not encode as it
    train_docs, val_docs = ([d.replace(DOC_TOKEN, DOC_TOKEN.replace("|", "| ")) for d in docs]
                            for docs in (train_docs, val_docs))
    tok.train_from_iterator(train_docs, trainer=trainer)
    sep = tok.token_to_id(DOC_TOKEN)
    sizes = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        ids: List[int] = []
        for enc in tok.encode_batch(docs):
            ids.extend(enc.ids)
            ids.append(sep)
        arr = np.asarray(ids, dtype=np.uint16)
        tmp = tmp_name(cache / f"{name}.bin")
        arr.tofile(tmp)
        tmp.replace(cache / f"{name}.bin")
        sizes[name] = len(arr)
    tok.save(str(cache / "tokenizer.json"))
    meta = {"roots": [str(r) for r in roots], "text_roots": [str(r) for r in text_roots], "val_every": val_every,
            "vocab_size": tok.get_vocab_size(), "files": len(files), "files_with_text": with_text,
            "documents": len(train_docs) + len(val_docs),
            "text_bytes": sum(len(d.encode()) for d in train_docs + val_docs),
            "train_tokens": sizes["train"], "val_tokens": sizes["val"]}
    tmp = tmp_name(cache / "meta.json")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(cache / "meta.json")            # written last: its presence means the cache is complete
