"""Stable partition of each (batch, head)'s tokens by a small integer key: a counting sort in two launches.

The sparse front ends order every (batch, head)'s tokens: QK-sparse puts the kept tokens first (key 0 = kept, 1 =
dropped), hash-sparse sorts by bucket; both keep position order inside a key. With ``torch.sort`` and the ops
around it (stacking, the inverse's scatter, int32 casts, positions, the range guard) that was ~16 launches and
~0.6 ms of host time per hash-sparse call on the H100 machines, where a sparse forward+backward was host-bound
(session 9's profile: 2.9 ms host for 1.3 ms of GPU work). Here, for keys below ``NB`` (a power of two <= 128):

1. ``_histogram``: program (chunk, row) counts each key in its ``BLOCK`` tokens -> ``counts (rows, nchunk, NB)``
   and flags keys outside ``[0, n_keys)``;
2. ``_scatter``: program (chunk, row) reads the row's counts, so a token's slot is (tokens of smaller keys in the
   row) + (tokens of its key in earlier chunks) + (its rank among equal keys in its chunk, a cumsum of the
   one-hot ``(BLOCK, NB)`` tile), and writes the slot's token (``perm``), its shifted position (``pos``; dropped
   tokens ``PAD_POS``) and its key (``bkt``), plus the row's length (kept tokens; hash: all).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch import Launcher, cdiv, next_power_of_2
from .sparse_ranges import PAD_POS

MAX_KEYS = 128           # keys per row the one-hot tiles hold (BLOCK x NB int32: 32 K elements at most)
# The scatter program reads its row's whole (chunks, NB) count table: compiled for sm_90 it spilled 48 B at 128 x
# 128 and kilobytes past that (review, session 10), and the reads grow with chunks^2. Past this many cells the
# front ends sort instead (applies): with 16 buckets that is S <= 1M per row, with 128 buckets S <= 16384.
MAX_COUNT_CELLS = 8192
PAD_POS_C = tl.constexpr(PAD_POS)


@triton.jit
def _token_keys(Ids, row, chunk, S, H, stride_b, stride_s, stride_h, BLOCK: tl.constexpr, KEEP: tl.constexpr):
    """(token positions, in-range mask, keys) of one chunk of row = b * H + h; KEEP: bool ids, key 0 = kept."""
    b = (row // H).to(tl.int64)
    h = (row % H).to(tl.int64)
    s = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = s < S
    ids = tl.load(Ids + b * stride_b + s.to(tl.int64) * stride_s + h * stride_h, mask=ok, other=0)
    if KEEP:
        key = tl.where(ids != 0, 0, 1)
    else:
        key = ids.to(tl.int64)
    return s, ok, key


@triton.jit
def _histogram(Ids, Counts, Bad, S, H, stride_b, stride_s, stride_h, n_keys, NCHUNK, NB: tl.constexpr,
               BLOCK: tl.constexpr, KEEP: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    s, ok, key = _token_keys(Ids=Ids, row=row, chunk=chunk, S=S, H=H, stride_b=stride_b, stride_s=stride_s,
                             stride_h=stride_h, BLOCK=BLOCK, KEEP=KEEP)
    onehot = ((key[:, None] == tl.arange(0, NB)[None, :]) & ok[:, None]).to(tl.int32)
    cell = row.to(tl.int64) * NCHUNK + chunk
    tl.store(Counts + cell * NB + tl.arange(0, NB), tl.sum(onehot, 0))
    tl.store(Bad + cell, tl.sum((ok & ((key < 0) | (key >= n_keys))).to(tl.int32), 0))


@triton.jit
def _scatter(Ids, Counts, Perm, Pos, Bkt, Lens, S, H, stride_b, stride_s, stride_h, shift, NCHUNK,
             NB: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, KEEP: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    rows64 = row.to(tl.int64)
    c = tl.arange(0, CHUNKS)
    counts = tl.load(Counts + (rows64 * NCHUNK + c[:, None]) * NB + tl.arange(0, NB)[None, :],
                     mask=c[:, None] < NCHUNK, other=0)                                  # (CHUNKS, NB)
    total = tl.sum(counts, 0)
    earlier = tl.sum(tl.where(c[:, None] < chunk, counts, 0), 0)
    first = tl.cumsum(total, 0) - total + earlier          # this chunk's first slot of each key
    s, ok, key = _token_keys(Ids=Ids, row=row, chunk=chunk, S=S, H=H, stride_b=stride_b, stride_s=stride_s,
                             stride_h=stride_h, BLOCK=BLOCK, KEEP=KEEP)
    onehot = ((key[:, None] == tl.arange(0, NB)[None, :]) & ok[:, None]).to(tl.int32)
    slot = tl.sum((tl.cumsum(onehot, 0) - onehot + first[None, :]) * onehot, 1)
    at = rows64 * S + slot
    tl.store(Perm + at, s.to(tl.int64), mask=ok)
    if KEEP:
        tl.store(Pos + at, tl.where(key == 0, s + shift, PAD_POS_C), mask=ok)
        length = tl.sum(tl.where(tl.arange(0, NB) == 0, total, 0), 0)
    else:
        tl.store(Pos + at, s + shift, mask=ok)
        tl.store(Bkt + at, key.to(tl.int32), mask=ok)
        length = S
    if chunk == 0:
        tl.store(Lens + row, length)


LAUNCH_HISTOGRAM, LAUNCH_SCATTER = Launcher(_histogram), Launcher(_scatter)


def _tiles(s: int, nb: int) -> Tuple[int, int]:
    """(BLOCK, chunks) of a row of ``s`` tokens with ``nb`` one-hot columns."""
    block = 256 if s <= 256 * 128 else next_power_of_2(cdiv(s, 128))
    block = min(block, max(16, next_power_of_2(s)), 32768 // nb)
    return block, cdiv(s, block)


def _keys(n_keys: int, keep: bool) -> int:
    return 2 if keep else max(2, next_power_of_2(n_keys))


def applies(n_keys: Optional[int], seqlen: int, keep: bool = False) -> bool:
    """Whether :func:`partition` takes rows of ``seqlen`` tokens with keys below ``n_keys`` (None: unknown; the
    caller sorts): at most MAX_KEYS keys and MAX_COUNT_CELLS count cells per row."""
    if not keep and (n_keys is None or not 1 <= n_keys <= MAX_KEYS):
        return False
    nb = _keys(n_keys, keep)
    return nb * max(2, next_power_of_2(_tiles(seqlen, nb)[1])) <= MAX_COUNT_CELLS


def partition(ids: torch.Tensor, n_keys: int, shift: int, keep: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Per (batch, head) of ``ids`` ``(B, S, H)`` (keep: bool, True first; else integer keys in ``[0, n_keys)``),
    the stable order by key: ``perm`` (slot -> token, int64), ``lens`` (B, H) int32 (kept tokens; else S),
    ``pos`` (token + shift; dropped: PAD_POS) and ``bkt`` (the keys; None for keep) int32, all ``(B, H, S)``
    contiguous, and ``bad`` (one int32 per chunk: keys outside ``[0, n_keys)``, for the caller's guard)."""
    b, s, h = ids.shape
    rows = b * h
    nb = _keys(n_keys, keep)
    block, nchunk = _tiles(s, nb)
    dev = ids.device
    counts = torch.empty((rows, nchunk, nb), dtype=torch.int32, device=dev)
    bad = torch.empty((rows, nchunk), dtype=torch.int32, device=dev)
    perm = torch.empty((b, h, s), dtype=torch.int64, device=dev)
    pos = torch.empty((b, h, s), dtype=torch.int32, device=dev)
    bkt = None if keep else torch.empty((b, h, s), dtype=torch.int32, device=dev)
    lens = torch.empty((b, h), dtype=torch.int32, device=dev)
    if rows == 0 or s == 0:
        return perm, lens.fill_(0), pos, bkt, bad
    grid = (nchunk, rows)
    strides = ids.stride()
    LAUNCH_HISTOGRAM[grid](ids, counts, bad, s, h, *strides, 2 if keep else n_keys, nchunk, NB=nb, BLOCK=block,
                           KEEP=keep, num_warps=4)
    LAUNCH_SCATTER[grid](ids, counts, perm, pos, pos if keep else bkt, lens, s, h, *strides, shift, nchunk, NB=nb,
                         BLOCK=block, CHUNKS=max(2, next_power_of_2(nchunk)), KEEP=keep, num_warps=4)
    return perm, lens, pos, bkt, bad
