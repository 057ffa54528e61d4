"""Training data that needs no network, and the batches each rank trains on.

Default corpus: the bytes of the Python standard library's ``.py`` files (about 1,800 files, 31 MB on CPython
3.11; ``site-packages`` excluded), one ASCII file-separator byte (0x1C) between files. The split is by file and
deterministic: the sorted file list, every ``val_every``-th file to validation. Both splits are cached as raw
uint8 files (read back as numpy memmaps) on first use, under a key of the file list and sizes.

``--data PATH``: a ``.npy`` token array (uint8/uint16), a ``.bin`` raw token file (``dtype`` uint16 unless told
uint8, the nanoGPT convention), or any other file read as bytes. A single file is split by position: the last
``val_fraction`` of it is validation.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..ring import shard_sequence
from .config import DEFAULT_CACHE

FILE_SEP = b"\x1c"  # ASCII "file separator": marks a document boundary in the byte stream


@dataclass
class Corpus:
    train: np.ndarray  # 1-D uint8 or uint16 (memmap or array)
    val: np.ndarray
    vocab_size: int
    source: str
    train_files: Optional[List[str]] = None  # stdlib corpus: which files went where (relative paths)
    val_files: Optional[List[str]] = None
    max_id: Optional[int] = None             # the largest token id, once read (one pass over the data)

    def largest_id(self) -> int:
        if self.max_id is None:
            self.max_id = max((int(a.max()) for a in (self.train, self.val) if len(a)), default=-1)
        return self.max_id

    def check_vocab(self, vocab_size: int, origin: str, hint: str = "") -> None:
        """ValueError unless every token id is below ``vocab_size`` (which ``origin`` set): an id outside the
        vocabulary would otherwise surface as an IndexError deep inside the embedding. ``hint`` ends the message;
        ``{need}`` in it becomes the smallest vocabulary size that fits."""
        if vocab_size > np.iinfo(self.train.dtype).max:
            return                           # e.g. bytes and a vocabulary of 256 or more: nothing to read
        top = self.largest_id()
        if top >= vocab_size:
            data = self.source if self.train_files is not None else f"--data {self.source}"
            raise ValueError(f"{data} holds token id {top}, but {origin} is {vocab_size} (ids must be below the "
                             f"vocabulary size){hint.format(need=top + 1)}")


def _stdlib_files(root: Path) -> List[Path]:
    files = [p for p in root.rglob("*.py") if p.is_file()
             and not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(files: List[Path], val_every: int) -> Tuple[List[Path], List[Path]]:
    """Every ``val_every``-th file of the (sorted) list goes to validation: indices val_every-1, 2*val_every-1..."""
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 (every Nth file goes to validation), got {val_every}")
    val = [f for i, f in enumerate(files) if i % val_every == val_every - 1]
    train = [f for i, f in enumerate(files) if i % val_every != val_every - 1]
    return train, val


def tmp_name(path: Path) -> Path:
    # per-process name: under torchrun every rank may build the same cache at once; the last rename wins and
    # every rename installs a complete file
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_split(files: List[Path], path: Path) -> None:
    tmp = tmp_name(path)
    with open(tmp, "wb") as out:
        for f in files:
            out.write(f.read_bytes())
            out.write(FILE_SEP)
    tmp.replace(path)  # atomic: a crashed build never leaves a half-written cache behind


def stdlib_corpus(root: Optional[os.PathLike] = None, cache_dir: Optional[os.PathLike] = None,
                  val_every: int = 20) -> Corpus:
    """Byte corpus of the ``.py`` files under ``root`` (default: this Python's stdlib), cached under cache_dir."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"]).resolve()
    files = _stdlib_files(root)
    if len(files) < val_every:
        raise ValueError(f"found {len(files)} .py files under {root}; need at least val_every={val_every} to split "
                         "by file")
    train_f, val_f = split_files(files, val_every)
    rel = lambda fs: [f.relative_to(root).as_posix() for f in fs]  # noqa: E731
    # cache key: the root, the split rule and every file's name and size (a changed stdlib gets a new cache)
    key = hashlib.sha256(json.dumps([str(root), val_every, [(r, f.stat().st_size) for r, f in zip(rel(files), files)]])
                         .encode()).hexdigest()[:16]
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE) / f"pycorpus-{key}"
    meta_path = cache / "meta.json"
    if not meta_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        _write_split(train_f, cache / "train.bin")
        _write_split(val_f, cache / "val.bin")
        meta = {"root": str(root), "val_every": val_every, "train_files": rel(train_f), "val_files": rel(val_f)}
        tmp = tmp_name(meta_path)
        tmp.write_text(json.dumps(meta))
        tmp.replace(meta_path)  # written last: its presence means both splits are complete
    meta = json.loads(meta_path.read_text())
    return Corpus(train=np.memmap(cache / "train.bin", dtype=np.uint8, mode="r"),
                  val=np.memmap(cache / "val.bin", dtype=np.uint8, mode="r"), vocab_size=256,
                  source=f"python stdlib .py files under {root} (cache {cache})",
                  train_files=meta["train_files"], val_files=meta["val_files"])


def file_corpus(path: os.PathLike, val_fraction: float = 0.1, dtype: Optional[str] = None,
                vocab_size: Optional[int] = None) -> Corpus:
    """A user's file: ``.npy`` tokens, ``.bin`` raw tokens (``dtype``, default uint16) or text read as bytes.
    Every problem with the file is a ValueError naming ``--data`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data {path}: the file does not exist (or is not a file)")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if path.stat().st_size == 0:
        raise ValueError(f"--data {path}: the file is empty")
    try:
        tokens = _read_tokens(path, dtype)
    except OSError as exc:
        raise ValueError(f"--data {path}: cannot read it: {exc.strerror or exc}") from None
    if len(tokens) == 0:
        raise ValueError(f"--data {path}: holds no tokens")
    max_id = None
    if vocab_size is None:
        # uint16 ids: smallest multiple of 64 above the largest id (one O(n) pass over the memmap)
        max_id = int(tokens.max())
        vocab_size = 256 if tokens.dtype == np.uint8 else -(-(max_id + 1) // 64) * 64
    n_val = int(len(tokens) * val_fraction)
    return Corpus(train=tokens[: len(tokens) - n_val], val=tokens[len(tokens) - n_val:], vocab_size=vocab_size,
                  source=str(path), max_id=max_id)


def _read_tokens(path: Path, dtype: Optional[str]) -> np.ndarray:
    """The file's tokens as a 1-D uint8 / uint16 memmap (see :func:`file_corpus`)."""
    if path.suffix == ".npy":
        if dtype is not None:
            raise ValueError(f"--data {path}: a .npy file records its own dtype; --data-dtype applies to .bin files")
        try:
            tokens = np.load(path, mmap_mode="r")
        except (ValueError, EOFError) as exc:   # not an .npy array: a pickle, text, garbage, a truncated copy
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
            raise ValueError(f"--data {path}: not a readable .npy token array ({why})") from None
        if tokens.dtype not in (np.uint8, np.uint16) or tokens.ndim != 1:
            raise ValueError(f"--data {path}: expected a 1-D uint8 or uint16 token array, got {tokens.ndim}-D "
                             f"{tokens.dtype}")
        return tokens
    if path.suffix == ".bin":
        dtype = dtype or "uint16"
        if dtype not in ("uint8", "uint16"):
            raise ValueError(f"dtype for a .bin token file must be uint8 or uint16, got {dtype!r}")
        if dtype == "uint16" and path.stat().st_size % 2:
            raise ValueError(f"--data {path} has an odd number of bytes, so it is not a uint16 token file; pass "
                             "--data-dtype uint8 if it holds bytes")
        return np.memmap(path, dtype=np.dtype(dtype), mode="r")
    if dtype not in (None, "uint8"):
        raise ValueError(f"--data {path} is read as bytes (uint8); --data-dtype applies to .bin files only")
    return np.memmap(path, dtype=np.uint8, mode="r")


class WindowSampler:
    """Random ``(B, S + 1)`` windows of a token array with a seeded numpy generator; state() / load_state()
    make a resumed run draw exactly the batches the uninterrupted run would have drawn."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seqlen: int, seed: int, name: str = "train"):
        if len(tokens) < seqlen + 2:
            raise ValueError(f"the {name} split has {len(tokens)} tokens, too few for windows of seqlen {seqlen} "
                             f"(needs at least {seqlen + 2}); use a smaller --seqlen or more data")
        self.tokens, self.batch_size, self.seqlen, self.seed = tokens, batch_size, seqlen, seed
        self.rng = np.random.default_rng(seed)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 ``(B, S)`` each, targets shifted by one token."""
        starts = self.rng.integers(0, len(self.tokens) - self.seqlen - 1, size=self.batch_size)
        win = np.stack([np.asarray(self.tokens[s: s + self.seqlen + 1], dtype=np.int64) for s in starts])
        win = torch.from_numpy(win)  # (B, S + 1)
        return win[:, :-1], win[:, 1:]

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def load_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class Batches:
    """``(inputs, targets, positions)`` for this rank, on its device: a :class:`WindowSampler` batch, and under
    ring attention this rank's zigzag shard of each sequence (tokens, targets and their global positions, which
    the rotary embedding needs: a shard holds two non-contiguous pieces of the sequence)."""

    def __init__(self, sampler: WindowSampler, device: torch.device, group=None, ring: bool = False):
        self.sampler, self.device, self.group, self.ring = sampler, device, group, ring
        self.positions = torch.arange(sampler.seqlen, device=device)[None]              # (1, S)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = (t.to(self.device, non_blocking=True) for t in self.sampler.next())
        return self.place(x, y)

    def place(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, pos = x.to(self.device), y.to(self.device), self.positions
        if self.ring:
            x, y, pos = (shard_sequence(t, group=self.group, layout="zigzag", dim=1) for t in (x, y, pos))
        return x, y, pos
