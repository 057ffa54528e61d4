"""Dynamic sparse attention's side tensors and the per-block tile ranges the kernels loop over.

The sparse front ends (``flashring.sparse``) hand the kernels tokens compacted (QK-sparse) or sorted by
(bucket, position) (hash-sparse) per (batch, head), plus their original positions and buckets. Visibility is
``flashring.masks.sparse_visible`` on those; because rows are sorted, the columns a block of rows can see form
one contiguous range of column tiles, found by binary search: ``[lo, hi)`` holds every tile with a visible pair,
``[mid_lo, mid_hi)`` only tiles whose every pair is visible (they run without masking arithmetic). One launch
builds the table for all blocks; tests/test_sparse.py checks it against ``sparse_visible``.

The portable kernels read rows through the front ends' row tables; the Gluon kernels (TMA loads whole boxes, no
row gather on Hopper) get slot-order copies instead (:func:`slot_copy` / :func:`slot_return`, one Triton launch
per two tensors) at D=128, and at D=64 read the rows through the tables themselves (cp.async in their producer
warps; ``ops.hopper.gather_rows_async`` / ``gather_wanted``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .launch import Launcher, cdiv, next_power_of_2

PAD_POS = 1 << 30          # position (and bucket) of padding entries: sorts after every real token


class SparseMeta(NamedTuple):
    """Side tensors of dynamic sparse attention on compacted (QK-sparse) or bucket-sorted (hash-sparse) tokens.

    q_pos ``(B, H, Sq)`` / k_pos ``(B, Hk, Sk)`` int32: original positions; within each (batch, head) the first
    ``len`` entries are valid and sorted by (bucket, position); the rest hold ``PAD_POS``. q_len ``(B, H)`` /
    k_len ``(B, Hk)`` int32. q_bkt / k_bkt: int32 buckets in the same layout, or None (QK-sparse).

    q_rows ``(B, H, Sq)`` / k_rows ``(B, Hk, Sk)`` (int64, contiguous; optional): the row of the un-permuted
    ``(B, S, H, D)`` tensors that each slot stands for, a permutation per (batch, head). Given, the kernels read
    q/k/v/dout and write out/dq/dk/dv at those rows, and lse / delta are in row (original) order: the tensors are
    never gathered into slot order (a launch each way per tensor: 8 of a hash-sparse fwd+bwd's 15 launches, host
    time that made the call host-bound on the H100 machines, session 9). Absent, the tensors are in slot order.
    """
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_len: torch.Tensor
    k_len: torch.Tensor
    q_bkt: Optional[torch.Tensor]
    k_bkt: Optional[torch.Tensor]
    causal: bool
    q_rows: Optional[torch.Tensor] = None
    k_rows: Optional[torch.Tensor] = None

    def tensors(self) -> list:
        """The side tensors that are given (what autograd saves, so an in-place change raises)."""
        return [t for t in self if isinstance(t, torch.Tensor)]


@triton.jit
def _move_rows(X, Y, x_st, y_st, b, h, src, dst, keep, put, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``src`` of (batch b, head h) of X to rows ``dst`` of Y (strides ``(batch, seq, head)``); rows not
    ``keep`` read as zeros, rows not ``put`` not written."""
    cols = tl.arange(0, BLOCK_D)
    cols_ok = (cols < HEAD_DIM)[None, :]
    x = tl.load(X + b * x_st[0] + h * x_st[2] + src[:, None] * x_st[1] + cols[None, :], mask=keep[:, None] & cols_ok,
                other=0.0)
    tl.store(Y + b * y_st[0] + h * y_st[2] + dst[:, None] * y_st[1] + cols[None, :], x, mask=put[:, None] & cols_ok)


@triton.jit
def _permute_rows_kernel(X0, Y0, X1, Y1, Side, Rows, Lens, S, H, x0_st, x1_st, y_st, HEAD_DIM: tl.constexpr,
                         BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, SCATTER: tl.constexpr, ROWS: tl.constexpr,
                         PAD_TO: tl.constexpr, TWO: tl.constexpr, SIDES: tl.constexpr):
    """Program (i, h, b) moves slots [i*BLOCK_S, (i+1)*BLOCK_S) of (batch b, head h) of one or (TWO) two tensors
    that share a permutation: gather ``y[b, s, h] = x[b, rows[s], h]`` (not ROWS: ``x[b, s, h]``), SCATTER ``y[b,
    rows[s], h] = x[b, s, h]``; rows of HEAD_DIM contiguous elements. The slots at or past ``lens[b, h]``
    (padding) are not read; gathering, they are written as zeros up to the next multiple of PAD_TO (the Gluon
    kernels' tile: what they may load) and not at all past it; scattering, their rows get zeros. SIDES
    (gathering): ``Side = (lse, lse_out, delta, delta_out)``, (B, H, S) contiguous rows gathered alike, the
    padding's LSE +inf and delta 0 (what the sparse backward reads for dropped slots)."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    slots = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = slots < S
    if ROWS:
        rows = tl.load(Rows + (b * H + h) * S + slots, mask=ok, other=0)
    else:
        rows = slots
    n = tl.load(Lens + b * H + h)
    keep = ok & (slots < n)
    if SCATTER:
        put = ok
    else:
        put = ok & (slots < (n + PAD_TO - 1) // PAD_TO * PAD_TO)
    if SCATTER:
        src = slots.to(tl.int64)
        dst = rows.to(tl.int64)
    else:
        src = rows.to(tl.int64)
        dst = slots.to(tl.int64)
    _move_rows(X=X0, Y=Y0, x_st=x0_st, y_st=y_st, b=b, h=h, src=src, dst=dst, keep=keep, put=put,
               HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    if TWO:
        _move_rows(X=X1, Y=Y1, x_st=x1_st, y_st=y_st, b=b, h=h, src=src, dst=dst, keep=keep, put=put,
                   HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)
    if SIDES:
        at = (b * H + h) * S
        lse = tl.load(Side[0] + at + src, mask=keep, other=0.0)
        tl.store(Side[1] + at + dst, tl.where(keep, lse, float("inf")), mask=ok)
        delta = tl.load(Side[2] + at + src, mask=keep, other=0.0)
        tl.store(Side[3] + at + dst, tl.where(keep, delta, 0.0), mask=ok)


# The slot copies on CUDA: this launch moves whole rows; torch's gather / scatter with an index expanded over D
# took 1.10-1.25x the total of a sparse forward + backward (H100, session 15, benchmarks/sparse_tiles.py).
LAUNCH_PERMUTE_ROWS = Launcher(_permute_rows_kernel)
SLOT_PAD_TO = 128       # slot_copy: padding slots past the next multiple of this are left unwritten (never loaded)


def _permute(xs: Sequence[torch.Tensor], rows: Optional[torch.Tensor], scatter: bool, lens: torch.Tensor,
             sides: Sequence[torch.Tensor] = ()) -> list:
    """One launch per pair of ``xs`` (same shape and dtype), ``sides`` (lse, delta) with the first pair."""
    out, side_out = [], [torch.empty_like(t) for t in sides]
    for i in range(0, len(xs), 2):
        pair = [x if x.stride(-1) == 1 else x.contiguous() for x in xs[i:i + 2]]
        b, s, h, d = pair[0].shape
        ys = [torch.empty((b, s, h, d), dtype=x.dtype, device=x.device) for x in pair]
        x1, y1 = (pair[1], ys[1]) if len(pair) == 2 else (pair[0], ys[0])
        side = (sides[0], side_out[0], sides[1], side_out[1]) if sides and i == 0 else (pair[0],) * 4
        block_s = 64
        LAUNCH_PERMUTE_ROWS[(cdiv(s, block_s), h, b)](
            pair[0], ys[0], x1, y1, side, pair[0] if rows is None else rows, lens, s, h, tuple(pair[0].stride()[:3]),
            tuple(x1.stride()[:3]), tuple(ys[0].stride()[:3]), HEAD_DIM=d, BLOCK_S=block_s,
            BLOCK_D=max(16, next_power_of_2(d)), SCATTER=scatter, ROWS=rows is not None, PAD_TO=SLOT_PAD_TO,
            TWO=len(pair) == 2, SIDES=bool(sides) and i == 0, num_warps=4)
        out += ys
    return out if not sides else (out, side_out)


def slot_copy(xs: Sequence[torch.Tensor], rows: Optional[torch.Tensor], lens: torch.Tensor,
              sides: Sequence[torch.Tensor] = (), kernel: Optional[bool] = None):
    """Each ``x`` of ``xs`` (``(B, S, H, D)``, sharing the permutation) in slot order (:func:`gather_rows`; ``rows``
    None: in slot order already), the slots at or past ``lens`` ``(B, H)`` (padding: dropped tokens' rows) zero
    up to the next multiple of :data:`SLOT_PAD_TO` and unspecified past it, where no Gluon tile reaches (fewer
    bytes written when most tokens are dropped). Zeros, because a masked pair's zero weight times an inf / NaN in
    a dropped row would otherwise reach the kept rows of its tile (the portable kernels never load those rows).
    ``sides`` ``(lse, delta)``, (B, H, S) rows: gathered too, the padding's LSE +inf and delta 0; then returns
    ``(ys, [lse, delta])``. One launch per two tensors (host time: a launch costs ~38 us on the GPU machines).
    ``kernel``: the Triton launch (default: on CUDA; the torch form otherwise)."""
    if kernel or (kernel is None and xs[0].is_cuda):
        return _permute(xs, rows, scatter=False, lens=lens, sides=sides)
    pad = torch.arange(xs[0].shape[1], device=xs[0].device) >= lens.unsqueeze(-1)      # (B, H, S)
    ys = [(x if rows is None else gather_rows(x, rows)).masked_fill(pad.transpose(1, 2).unsqueeze(-1), 0) for x in xs]
    if not sides:
        return ys
    side = [t if rows is None else gather_rows(t, rows) for t in sides]
    return ys, [side[0].masked_fill(pad, float("inf")), side[1].masked_fill(pad, 0.0)]


def slot_return(xs: Sequence[torch.Tensor], rows: Optional[torch.Tensor], lens: torch.Tensor) -> list:
    """Gluon kernels' slot-order results (sharing the permutation) back in row order (:func:`scatter_rows`), the
    padding slots' rows zero without reading them (dropped tokens: out 0, gradients 0); one launch per two. CUDA
    (or the interpreter); ``rows`` None: as they are."""
    if rows is None:
        return list(xs)
    return _permute(xs, rows, scatter=True, lens=lens)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Slot order (torch): ``y[b, s, h] = x[b, rows[b, h, s], h]`` for x ``(B, S, H, D)``, or ``y[b, h, s] = x[b, h,
    rows[b, h, s]]`` for x ``(B, H, S)`` (LSE rows); ``rows`` ``(B, H, S)`` is each (batch, head)'s permutation. The
    chunked CPU path's and the LSE rows'; the Gluon kernels' copies are :func:`slot_copy`."""
    if x.dim() == 3:
        return x.gather(-1, rows)
    return x.gather(1, rows.transpose(1, 2).unsqueeze(-1).expand(x.shape))


def scatter_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`gather_rows`: slot s of ``x`` goes back to row ``rows[b, h, s]``."""
    if x.dim() == 3:
        return torch.empty_like(x).scatter_(-1, rows, x)
    return torch.empty_like(x).scatter_(1, rows.transpose(1, 2).unsqueeze(-1).expand(x.shape), x)


@triton.jit
def _sort_key(Pos, Bkt, idx, mask, HASH: tl.constexpr):
    # (bucket, position) packed into one int64 that sorts like the pair; padding (PAD_POS, PAD_POS) sorts last.
    key = tl.load(Pos + idx, mask=mask, other=0).to(tl.int64)
    if HASH:
        key += tl.load(Bkt + idx, mask=mask, other=0).to(tl.int64) << 31
    return key


@triton.jit
def _search(Pos, Bkt, n, steps, target, RIGHT: tl.constexpr, HASH: tl.constexpr):
    """torch.searchsorted(keys[:n], target, right=RIGHT) for a vector of targets: ``steps`` = n.bit_length()
    halvings of [lo, hi), one gathered key load each."""
    lo = tl.zeros(target.shape, dtype=tl.int32)
    hi = lo + n
    for _ in range(steps):
        active = lo < hi
        mid = (lo + hi) // 2
        key = _sort_key(Pos=Pos, Bkt=Bkt, idx=mid, mask=active, HASH=HASH)
        if RIGHT:
            go_right = key <= target
        else:
            go_right = key < target
        lo = tl.where(active & go_right, mid + 1, lo)
        hi = tl.where(active & ~go_right, mid, hi)
    return lo


@triton.jit
def _tile_ranges_kernel(RowPos, RowBkt, RowLen, ColPos, ColBkt, ColLen, Ranges, NHEADS, NBLK, S_ROWS, S_COLS,
                        STEPS, ROW_DIV, COL_DIV, ROWS_BLOCK: tl.constexpr, COLS_BLOCK: tl.constexpr,
                        BLOCK: tl.constexpr, CAUSAL: tl.constexpr, HASH: tl.constexpr, FROM_KEYS: tl.constexpr):
    """Program (i, h, b) fills row blocks [i*BLOCK, (i+1)*BLOCK) of query head h. The row/column side tensors are
    indexed by head // ROW_DIV / COL_DIV (GQA: the K/V side serves GROUP query heads), so the K/V side is never
    expanded in memory. ``FROM_KEYS``: rows are keys, columns queries (the dK/dV pass)."""
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rrow = b * (NHEADS // ROW_DIV) + h // ROW_DIV
    crow = b * (NHEADS // COL_DIV) + h // COL_DIV
    blk = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = blk < NBLK
    RowPos += rrow * S_ROWS
    ColPos += crow * S_COLS
    if HASH:
        RowBkt += rrow * S_ROWS
        ColBkt += crow * S_COLS
    start = blk * ROWS_BLOCK
    end = tl.minimum(start + ROWS_BLOCK, tl.load(RowLen + rrow)) - 1
    empty = end < start
    first = _sort_key(Pos=RowPos, Bkt=RowBkt, idx=tl.minimum(start, S_ROWS - 1), mask=ok, HASH=HASH)
    last = _sort_key(Pos=RowPos, Bkt=RowBkt, idx=tl.maximum(end, 0), mask=ok, HASH=HASH)
    n_cols = tl.load(ColLen + crow)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    lo = zero
    hi = zero + n_cols
    full_lo = zero
    full_hi = zero + n_cols
    if HASH:
        b_first = first >> 31
        b_last = last >> 31
        bucket_first = _search(ColPos, ColBkt, S_COLS, STEPS, b_first << 31, RIGHT=False, HASH=HASH)
        if FROM_KEYS:       # columns are queries: visible ones come at or after the key (same bucket)
            hi = _search(ColPos, ColBkt, S_COLS, STEPS, (b_last + 1) << 31, RIGHT=False, HASH=HASH)
            full_hi = _search(ColPos, ColBkt, S_COLS, STEPS, (b_first + 1) << 31, RIGHT=False, HASH=HASH)
            if CAUSAL:
                lo = _search(ColPos, ColBkt, S_COLS, STEPS, first, RIGHT=False, HASH=HASH)
                full_lo = _search(ColPos, ColBkt, S_COLS, STEPS, last, RIGHT=False, HASH=HASH)
            else:
                lo = bucket_first
                full_lo = bucket_first
        else:               # columns are keys: visible ones come at or before the query (same bucket)
            lo = bucket_first
            full_lo = bucket_first
            if CAUSAL:
                hi = _search(ColPos, ColBkt, S_COLS, STEPS, last, RIGHT=True, HASH=HASH)
                full_hi = _search(ColPos, ColBkt, S_COLS, STEPS, first, RIGHT=True, HASH=HASH)
            else:
                hi = _search(ColPos, ColBkt, S_COLS, STEPS, (b_last + 1) << 31, RIGHT=False, HASH=HASH)
                full_hi = _search(ColPos, ColBkt, S_COLS, STEPS, (b_first + 1) << 31, RIGHT=False, HASH=HASH)
        full_hi = tl.where(b_first == b_last, full_hi, full_lo)       # several buckets: every tile masked
    elif CAUSAL:
        if FROM_KEYS:       # queries with position >= the block's first (some visible) / last key (all visible)
            lo = _search(ColPos, ColBkt, S_COLS, STEPS, first, RIGHT=False, HASH=HASH)
            full_lo = _search(ColPos, ColBkt, S_COLS, STEPS, last, RIGHT=False, HASH=HASH)
        else:               # keys with position <= the block's last (some) / first query (all)
            hi = _search(ColPos, ColBkt, S_COLS, STEPS, last, RIGHT=True, HASH=HASH)
            full_hi = _search(ColPos, ColBkt, S_COLS, STEPS, first, RIGHT=True, HASH=HASH)
    hi = tl.minimum(hi, n_cols)
    lo = (lo // COLS_BLOCK) * COLS_BLOCK
    hi = tl.maximum(hi, lo)
    full_lo = ((full_lo + COLS_BLOCK - 1) // COLS_BLOCK) * COLS_BLOCK
    full_hi = (tl.minimum(full_hi, n_cols) // COLS_BLOCK) * COLS_BLOCK
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)
    r = Ranges + ((b * NHEADS + h) * NBLK + blk) * 4
    tl.store(r, tl.where(empty, 0, lo), mask=ok)
    tl.store(r + 1, tl.where(empty, 0, mid_lo), mask=ok)
    tl.store(r + 2, tl.where(empty, 0, mid_hi), mask=ok)
    tl.store(r + 3, tl.where(empty, 0, hi), mask=ok)


LAUNCH_TILE_RANGES = Launcher(_tile_ranges_kernel)   # see ops.launch: host time per launch


def tile_ranges(sp: SparseMeta, group: int, rows_block: int, cols_block: int, from_keys: bool) -> torch.Tensor:
    """int32 ``(B, H, nblk, 4)``: per block of ``rows_block`` rows of query head h, ``[lo, mid_lo, mid_hi, hi)``
    over column positions (multiples of ``cols_block``). Rows are queries (``from_keys=False``: forward and dQ)
    or keys (dK/dV). One launch, no GQA expansion."""
    if from_keys:
        rows, cols, row_div, col_div = (sp.k_pos, sp.k_bkt, sp.k_len), (sp.q_pos, sp.q_bkt, sp.q_len), group, 1
    else:
        rows, cols, row_div, col_div = (sp.q_pos, sp.q_bkt, sp.q_len), (sp.k_pos, sp.k_bkt, sp.k_len), 1, group
    b, h = sp.q_pos.shape[:2]
    s_rows, s_cols = rows[0].shape[-1], cols[0].shape[-1]
    nblk = cdiv(s_rows, rows_block)
    ranges = torch.empty(b, h, nblk, 4, dtype=torch.int32, device=sp.q_pos.device)
    block = min(128, next_power_of_2(nblk))
    hashed = sp.q_bkt is not None
    LAUNCH_TILE_RANGES[(cdiv(nblk, block), h, b)](
        rows[0], rows[1] if hashed else rows[0], rows[2], cols[0], cols[1] if hashed else cols[0], cols[2], ranges,
        h, nblk, s_rows, s_cols, s_cols.bit_length(), row_div, col_div, ROWS_BLOCK=rows_block,
        COLS_BLOCK=cols_block, BLOCK=block, CAUSAL=sp.causal, HASH=hashed, FROM_KEYS=from_keys, num_warps=4)
    return ranges


def kernel_side(sp: Optional[SparseMeta], group: int, block_q: int, block_k: int, from_keys: bool):
    """The attention kernels' ``SP`` tuple ``(QPos, KPos, QBkt, KBkt, QLen, KLen, Ranges, QRows, KRows)`` and flags
    for one launch; dense launches get Nones and ``SPARSE=False``."""
    if sp is None:
        return (None,) * 9, dict(SPARSE=False, SP_CAUSAL=False, HASH=False, ROWS=False)
    if (sp.q_rows is None) != (sp.k_rows is None):
        raise ValueError("q_rows and k_rows must be given together (row tables) or both be None")
    for name, t, like in (("q_rows", sp.q_rows, sp.q_pos), ("k_rows", sp.k_rows, sp.k_pos)):
        if t is not None and (t.shape != like.shape or not t.is_contiguous()):      # the kernels index row * S + slot
            raise ValueError(f"{name} must be a contiguous {tuple(like.shape)} table, got {tuple(t.shape)} "
                             f"with strides {t.stride()}")
    if from_keys:
        ranges = tile_ranges(sp, group, block_k, block_q, from_keys=True)
    else:
        ranges = tile_ranges(sp, group, block_q, block_k, from_keys=False)
    side = (sp.q_pos, sp.k_pos, sp.q_bkt, sp.k_bkt, sp.q_len, sp.k_len, ranges, sp.q_rows, sp.k_rows)
    return side, dict(SPARSE=True, SP_CAUSAL=sp.causal, HASH=sp.q_bkt is not None, ROWS=sp.q_rows is not None)
