"""FlashAttention-2 Triton kernels (forward, backward) and their launchers: dense, variable-length and dynamic-sparse.

Arguments travel as tuples, so every signature names what a program needs once:
- a tensor in flash-attn layout: ``T = (ptr, stride_batch, stride_seq, stride_head)``; head dim unit-stride. The
  per-(batch, head) LSE / delta rows use the same form with ``stride_seq = 1``. Packed variable-length tensors
  ``(total, H, D)`` pass ``stride_batch = 0`` and each sequence's start from ``cu_seqlens``.
- ``SEQ = (NHEADS, SEQLEN_Q, SEQLEN_K, CuQ, CuK)``: the allocated lengths, and the cumulative sequence lengths of
  a packed batch (None unless VARLEN);
- ``BAND = (LOWER, UPPER)``: row ``i`` sees column ``j`` iff ``i + LOWER <= j <= i + UPPER`` (``flashring.masks``);
  VARLEN adds each sequence's ``seqlen_k - seqlen_q`` (bottom-right alignment per sequence);
- ``SCORE = (QK_SCALE, CAP_LOG2, SM_SCALE)``: scores are computed in log2 units, ``QK_SCALE = softmax_scale *
  log2(e)`` folded into the scores (one exp2 per element); with softcap ``QK_SCALE = scale / softcap`` and
  ``CAP_LOG2 = softcap * log2(e)``;
- ``SP = (QPos, KPos, QBkt, KBkt, QLen, KLen, Ranges, QRows, KRows)``: dynamic-sparse side tensors
  (``ops.sparse_ranges``; the row tables when the front ends leave q/k/v in place), Nones for dense launches.

Work partitioning (FA2): the forward runs one program per (query block, head, batch) streaming K/V tiles through
SRAM with an online softmax. Key tiles outside the band are never visited; tiles wholly inside it run without any
masking arithmetic, so only tiles straddling the band's edges (the diagonal for causal) or the ragged tail pay for
``tl.where``. The backward is ``_bwd_preprocess`` (delta = rowsum(dO * O)), ``_bwd_dkdv`` (one program per key
block and K/V head, looping over the query heads of its GQA group, so dK/dV are summed without atomics) and
``_bwd_dq`` (one program per query block). P is recomputed from Q, K and the saved LSE. No atomics anywhere, so
gradients are bitwise reproducible.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..masks import EMPTY_ROW_LSE
from .sparse_ranges import SparseMeta, kernel_side
from .launch import Launcher, cdiv, next_power_of_2

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Kernels may only read globals that are constexpr.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
EMPTY_LSE_C = tl.constexpr(EMPTY_ROW_LSE)
INTERP_C = tl.constexpr(INTERPRET)
NO_KEY_C = tl.constexpr(2**31 - 1)           # "no such key" in a min over key indices


# ----------------------------------------------------------------------------------------------------- helpers
@triton.jit
def softcap_tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1), through exp2 so the interpreter and every GPU target share one code path;
    # saturates cleanly to +-1 (exp2 -> inf or 0), never NaN.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    # Every product goes through here. Under TRITON_INTERPRET (triton 3.8) a bf16 tl.dot multiplies the raw bit
    # patterns (numpy has no bf16: errors of 1e10), so the interpreter gets fp32 operands. Values are already
    # rounded to the input dtype, so the result is what an fp32-accumulating tensor core computes.
    if INTERP_C:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if acc is None:
        return tl.dot(a, b, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def nonfinite_rows(v):
    """Rows of a value tile holding an inf or NaN anywhere (0 * x is NaN exactly there), as a bool vector."""
    return tl.sum(v.to(tl.float32) * 0.0, 1) != 0.0


@triton.jit
def next_flagged_key(flags, kj, after):
    """The smallest key index in ``kj`` past ``after`` whose flag is set, else NO_KEY_C (a scalar)."""
    return tl.min(tl.where(flags & (kj > after), kj, NO_KEY_C))


@triton.jit
def _rows(T, b, h, start):
    """Pointer to row ``start`` of (batch b, head h) of a flash-layout tensor ``T = (ptr, sb, ss, sh)``: the one
    place batch/head/sequence offsets are applied, in int64."""
    return T[0] + b.to(tl.int64) * T[1] + start.to(tl.int64) * T[2] + h.to(tl.int64) * T[3]


@triton.jit
def _seq_info(SEQ, SP, b, qrow, krow, SPARSE: tl.constexpr, VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of a (batch, head): dense = the allocation, VARLEN = one sequence of
    the packed batch, SPARSE = the (batch, head)'s kept / real rows."""
    q_start = b * 0
    k_start = b * 0
    seqlen_q = SEQ[1]
    seqlen_k = SEQ[2]
    if VARLEN:
        q_start = tl.load(SEQ[3] + b)
        seqlen_q = tl.load(SEQ[3] + b + 1) - q_start
        k_start = tl.load(SEQ[4] + b)
        seqlen_k = tl.load(SEQ[4] + b + 1) - k_start
    if SPARSE:
        seqlen_q = tl.load(SP[4] + qrow)
        seqlen_k = tl.load(SP[5] + krow)
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _band(BAND, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    lower = BAND[0]
    upper = BAND[1]
    if VARLEN:                                   # bottom-right alignment, per sequence
        lower += seqlen_k - seqlen_q
        upper += seqlen_k - seqlen_q
    return lower, upper


@triton.jit
def _band_range(start, BLOCK: tl.constexpr, OTHER_BLOCK: tl.constexpr, seqlen_other, lower, upper,
                HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr):
    """Tiles of the other axis that rows/cols [start, start+BLOCK) touch, split as [lo, mid_lo) masked,
    [mid_lo, mid_hi) fully visible (no masking, no bounds checks), [mid_hi, hi) masked.

    Written for query rows looking at key columns (band i+lower <= j <= i+upper); the dK/dV pass calls it with
    (lower, upper) -> (-upper, -lower), which is the same band seen from the key side.
    """
    lo = seqlen_other * 0
    hi = seqlen_other
    full_lo = seqlen_other * 0
    full_hi = seqlen_other
    if HAS_LOWER:
        lo = tl.maximum(start + lower, 0)
        lo = (lo // OTHER_BLOCK) * OTHER_BLOCK
        full_lo = tl.maximum(start + BLOCK - 1 + lower, 0)
        full_lo = ((full_lo + OTHER_BLOCK - 1) // OTHER_BLOCK) * OTHER_BLOCK
    if HAS_UPPER:
        hi = tl.minimum(tl.maximum(start + BLOCK + upper, 0), seqlen_other)
        full_hi = tl.minimum(tl.maximum(start + upper + 1, 0), seqlen_other)
    full_hi = (full_hi // OTHER_BLOCK) * OTHER_BLOCK          # the unmasked loop never reads past the sequence
    hi = tl.maximum(hi, lo)
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _tile_range(SP, row, blk, nblk, start, seqlen_other, lower, upper, BLOCK: tl.constexpr,
                OTHER_BLOCK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, SPARSE: tl.constexpr):
    """[lo, mid_lo, mid_hi, hi) of this block over the other axis: loaded (sparse) or computed (band)."""
    if SPARSE:
        r = SP[6] + (row.to(tl.int64) * nblk + blk) * 4
        lo = tl.load(r)
        mid_lo = tl.load(r + 1)
        mid_hi = tl.load(r + 2)
        hi = tl.load(r + 3)
    else:
        lo, mid_lo, mid_hi, hi = _band_range(start, BLOCK, OTHER_BLOCK, seqlen_other, lower, upper,
                                             HAS_LOWER, HAS_UPPER)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _query_block(SEQ, BAND, SP, pid_m, h, b, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, SPARSE: tl.constexpr,
                 SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, VARLEN: tl.constexpr):
    """What a query-block program (forward, dQ) knows before its key loop: its K/V head and side-tensor row, the
    sequence's extent, the band, the key tile ranges, and its rows' original positions / buckets (sparse)."""
    hk = h // GROUP
    qrow = b.to(tl.int64) * SEQ[0] + h                 # (batch, head) row of every (B, H, S) side tensor
    krow = b.to(tl.int64) * (SEQ[0] // GROUP) + hk
    q_start, seqlen_q, k_start, seqlen_k = _seq_info(SEQ=SEQ, SP=SP, b=b, qrow=qrow, krow=krow, SPARSE=SPARSE,
                                                     VARLEN=VARLEN)
    lower, upper = _band(BAND=BAND, seqlen_q=seqlen_q, seqlen_k=seqlen_k, VARLEN=VARLEN)
    start_m = pid_m * BLOCK_M
    lo, mid_lo, mid_hi, hi = _tile_range(SP=SP, row=qrow, blk=pid_m, nblk=tl.num_programs(0), start=start_m,
                                         seqlen_other=seqlen_k, lower=lower, upper=upper, BLOCK=BLOCK_M,
                                         OTHER_BLOCK=BLOCK_N, HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER,
                                         SPARSE=SPARSE)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    qp = offs_m
    qb = offs_m
    if SPARSE:
        if SP_CAUSAL:
            qp = tl.load(SP[0] + qrow * SEQ[1] + offs_m, mask=offs_m < seqlen_q, other=-1)
        if HASH:
            qb = tl.load(SP[2] + qrow * SEQ[1] + offs_m, mask=offs_m < seqlen_q, other=-2)
    return hk, krow * SEQ[2], q_start, seqlen_q, k_start, seqlen_k, lower, upper, lo, mid_lo, mid_hi, hi, \
        offs_m, qp, qb


@triton.jit
def _key_side(SP, k_side, kj, n_ok, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr):
    """Original positions and buckets of key rows ``kj`` (sparse); ``k_side`` = the (batch, head) row offset."""
    kp = kj
    kb = kj
    if SP_CAUSAL:
        kp = tl.load(SP[1] + k_side + kj, mask=n_ok, other=0)
    if HASH:
        kb = tl.load(SP[3] + k_side + kj, mask=n_ok, other=-1)
    return kp, kb


@triton.jit
def _scores(a, b, qi, kj, qp, kp, qb, kb, seqlen_k, lower, upper, SCORE,
            MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, PRECISION: tl.constexpr,
            RAW: tl.constexpr):
    """Scores of one tile in log2 units: dot(a, b), scaled (and soft-capped), masked when MASK. RAW (no softcap):
    the unscaled dot, for a caller that folds the scale into the exponent's FMA (:func:`score_factor`).

    ``qi``/``kj`` (indices), ``qp``/``kp`` (original positions) and ``qb``/``kb`` (buckets) come already broadcast
    to the tile's orientation, so the forward (rows = queries) and the dK/dV pass (rows = keys) share this helper.
    The masks are the fast path of ``flashring.masks.band_visible`` / ``sparse_visible``.
    Returns ``(s, t)``; ``t = tanh(.)`` is kept for the softcap backward (``t = s`` without softcap).
    """
    s = mma(a, b, None, PRECISION)
    if HAS_SOFTCAP:
        t = softcap_tanh(s * SCORE[0])
        s = t * SCORE[1]
    else:
        if not RAW:
            s = s * SCORE[0]
        t = s
    if MASK:
        keep = _visible(qi=qi, kj=kj, qp=qp, kp=kp, qb=qb, kb=kb, seqlen_k=seqlen_k, lower=lower, upper=upper,
                        HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER, SPARSE=SPARSE, SP_CAUSAL=SP_CAUSAL, HASH=HASH)
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _score_factor(SCORE, RAW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """What turns ``_scores(..., RAW=RAW)`` into log2 units: the scale where RAW left it out, else 1."""
    if RAW and not HAS_SOFTCAP:
        c = SCORE[0]
    else:
        c = 1.0
    return c


@triton.jit
def _visible(qi, kj, qp, kp, qb, kb, seqlen_k, lower, upper, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
             SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr):
    """May query ``qi`` see key ``kj`` (any shapes that broadcast): the fast path of ``masks.band_visible`` /
    ``sparse_visible``."""
    keep = kj < seqlen_k
    if SPARSE:
        if SP_CAUSAL:
            keep = keep & (kp <= qp)
        if HASH:
            keep = keep & (kb == qb)
    else:
        if HAS_LOWER:
            keep = keep & (kj >= qi + lower)
        if HAS_UPPER:
            keep = keep & (kj <= qi + upper)
    return keep


@triton.jit
def _rows_seeing_key(key, SP, k_side, offs_m, qp, qb, seqlen_k, lower, upper, HAS_LOWER: tl.constexpr,
                     HAS_UPPER: tl.constexpr, SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr):
    """Which rows ``offs_m`` may see the single key ``key`` (its original position / bucket read when sparse)."""
    kp = key
    kb = key
    if SPARSE:
        if SP_CAUSAL:
            kp = tl.load(SP[1] + k_side + key)
        if HASH:
            kb = tl.load(SP[3] + k_side + key)
    return _visible(qi=offs_m, kj=key, qp=qp, kp=kp, qb=qb, kb=kb, seqlen_k=seqlen_k, lower=lower, upper=upper,
                    HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER, SPARSE=SPARSE, SP_CAUSAL=SP_CAUSAL, HASH=HASH)


@triton.jit
def _flag_rows_seeing(bad_i, row_bad, kj, SP, k_side, offs_m, qp, qb, seqlen_k, lower, upper,
                      HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr,
                      HASH: tl.constexpr, ONE_KEY: tl.constexpr):
    """``bad_i`` with the rows that may see a flagged key of ``kj`` set: one scalar pass per flagged key (none, in
    practice), nothing 2-D. ONE_KEY (a one-key sequence, which Triton specialises into the constant seqlen_k = 1):
    a single pass, no loop, because ptxas 12.8 (triton 3.6, sm_90) segfaults on the loop there under a window."""
    key = tl.min(tl.where(row_bad, kj, NO_KEY_C))
    if ONE_KEY:
        if key < NO_KEY_C:
            seen = _rows_seeing_key(key=key, SP=SP, k_side=k_side, offs_m=offs_m, qp=qp, qb=qb, seqlen_k=seqlen_k,
                                    lower=lower, upper=upper, HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER,
                                    SPARSE=SPARSE, SP_CAUSAL=SP_CAUSAL, HASH=HASH)
            bad_i = bad_i | seen.to(tl.int32)
    else:
        while key < NO_KEY_C:
            seen = _rows_seeing_key(key=key, SP=SP, k_side=k_side, offs_m=offs_m, qp=qp, qb=qb, seqlen_k=seqlen_k,
                                    lower=lower, upper=upper, HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER,
                                    SPARSE=SPARSE, SP_CAUSAL=SP_CAUSAL, HASH=HASH)
            bad_i = bad_i | seen.to(tl.int32)
            key = next_flagged_key(row_bad, kj, key)
    return bad_i


@triton.jit
def _slot_rows(Rows, side, slots, n, ROWS: tl.constexpr, MASK: tl.constexpr):
    """The rows of the un-permuted (B, S, H, D) tensor (and of LSE / delta) that ``slots`` stand for: with ROWS
    (sparse front ends, ``SparseMeta.q_rows`` / ``k_rows``) read from the (B, H, S) row table at (batch, head)
    offset ``side`` (MASK: slots >= n read row 0; callers mask those loads and stores); else the slots."""
    rows = slots
    if ROWS:
        if MASK:
            rows = tl.load(Rows + side + slots, mask=slots < n, other=0)
        else:
            rows = tl.load(Rows + side + slots)
    return rows


# ----------------------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, bad_i, q, qp, qb, K_ptrs, V_ptrs, stride_kn, stride_vn, SP, k_side, offs_m, offs_n,
               d_ok,
               lo, hi, seqlen_k, lower, upper, SCORE, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPARSE: tl.constexpr,
               SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, PRECISION: tl.constexpr, ONE_KEY: tl.constexpr,
               ROWS: tl.constexpr):
    # ROWS == 2: the next key tile's row-table entries are read one iteration ahead (see _dkdv_inner)
    k_next = _slot_rows(Rows=SP[8], side=k_side, slots=lo + offs_n, n=seqlen_k, ROWS=ROWS == 2, MASK=True)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kj = start_n + offs_n
        if ROWS:        # K_ptrs / V_ptrs hold no row offset: each key slot's row comes from the row table
            if ROWS == 2:
                kr = k_next.to(tl.int64)
                k_next = _slot_rows(Rows=SP[8], side=k_side, slots=kj + BLOCK_N, n=seqlen_k, ROWS=True, MASK=True)
            else:
                kr = _slot_rows(Rows=SP[8], side=k_side, slots=kj, n=seqlen_k, ROWS=ROWS, MASK=MASK).to(tl.int64)
            koff = kr[None, :] * stride_kn
            voff = kr[:, None] * stride_vn
        else:
            koff = start_n.to(tl.int64) * stride_kn
            voff = start_n.to(tl.int64) * stride_vn
        kp = kj
        kb = kj
        if MASK:
            n_ok = kj < seqlen_k
            k = tl.load(K_ptrs + koff, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            if SPARSE:
                kp, kb = _key_side(SP=SP, k_side=k_side, kj=kj, n_ok=n_ok, SP_CAUSAL=SP_CAUSAL, HASH=HASH)
        else:
            k = tl.load(K_ptrs + koff, mask=d_ok[:, None], other=0.0)
        s, _t = _scores(q, k, qi=offs_m[:, None], kj=kj[None, :], qp=qp[:, None], kp=kp[None, :], qb=qb[:, None],
                        kb=kb[None, :], seqlen_k=seqlen_k, lower=lower, upper=upper, SCORE=SCORE, MASK=MASK,
                        HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER, HAS_SOFTCAP=HAS_SOFTCAP, SPARSE=SPARSE,
                        SP_CAUSAL=SP_CAUSAL, HASH=HASH, PRECISION=PRECISION, RAW=True)
        # the scale rides in the exponent's FMA (one FP32 instruction per score less than a multiply, then a
        # subtract); m is kept in scaled units, and the scale is > 0, so the max commutes with it
        c = _score_factor(SCORE=SCORE, RAW=True, HAS_SOFTCAP=HAS_SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        # A row whose keys so far are all masked keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(tl.fma(s, c, -m_safe[:, None]))
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # Keys past the sequence are never loaded (masked loads). Inside it, a masked pair's zero weight times a
        # non-finite value (0 * NaN = NaN) would carry that value to a row that may not see it: in masked tiles
        # only, zero the non-finite value rows and flag the rows that may see one (the loop runs once per bad key:
        # never, in practice), to poison them at the end. Nothing 2-D stays alive for it: compiled for sm_90,
        # registers stay at or under 128 (D <= 64, with the configs' maxnreg) and 255 without spills (D = 128),
        # where reducing each value row into a per-key flag and testing it against the scores spilled (NOTES.md).
        if MASK:
            v = tl.load(V_ptrs + voff, mask=(kj[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
            row_bad = nonfinite_rows(v)
            v = tl.where(row_bad[:, None], 0.0, v)
            bad_i = _flag_rows_seeing(bad_i=bad_i, row_bad=row_bad, kj=kj, SP=SP, k_side=k_side, offs_m=offs_m, qp=qp,
                                      qb=qb, seqlen_k=seqlen_k, lower=lower, upper=upper, HAS_LOWER=HAS_LOWER,
                                      HAS_UPPER=HAS_UPPER, SPARSE=SPARSE, SP_CAUSAL=SP_CAUSAL, HASH=HASH,
                                      ONE_KEY=ONE_KEY)
        else:
            v = tl.load(V_ptrs + voff, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = mma(p.to(v.dtype), v, acc, PRECISION)
        m_i = m_new
    return acc, l_i, m_i, bad_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, SEQ, BAND, SCORE, SP,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, VARLEN: tl.constexpr,
              PRECISION: tl.constexpr, REVERSE_M: tl.constexpr, ONE_KEY: tl.constexpr, ROWS: tl.constexpr):
    pid_m = tl.program_id(0)
    if REVERSE_M:           # causal: the blocks with the most key tiles start first, so the last wave is short
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk, k_side, q_start, seqlen_q, k_start, seqlen_k, lower, upper, lo, mid_lo, mid_hi, hi, offs_m, qp, qb = \
        _query_block(SEQ=SEQ, BAND=BAND, SP=SP, pid_m=pid_m, h=h, b=b, GROUP=GROUP, BLOCK_M=BLOCK_M,
                     BLOCK_N=BLOCK_N, HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER, SPARSE=SPARSE, SP_CAUSAL=SP_CAUSAL,
                     HASH=HASH, VARLEN=VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= seqlen_q:          # the grid covers the longest sequence
            return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen_q
    # rows of Q / O / LSE that the block's slots are (ROWS: looked up; slots past the allocation read row 0)
    q_at = _slot_rows(Rows=SP[7], side=(b.to(tl.int64) * SEQ[0] + h) * SEQ[1], slots=offs_m, n=SEQ[1], ROWS=ROWS,
                      MASK=True)
    q = tl.load(_rows(Q, b, h, q_start) + q_at[:, None].to(tl.int64) * Q[2] + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if ROWS:                                     # each key tile's rows are added in _fwd_inner
        K_ptrs = _rows(K, b, hk, k_start) + offs_d[:, None]
        V_ptrs = _rows(V, b, hk, k_start) + offs_d[None, :]
    else:
        K_ptrs = _rows(K, b, hk, k_start) + offs_n[None, :] * K[2] + offs_d[:, None]   # (BLOCK_D, BLOCK_N): K^T
        V_ptrs = _rows(V, b, hk, k_start) + offs_n[:, None] * V[2] + offs_d[None, :]   # (BLOCK_N, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bad_i = tl.zeros([BLOCK_M], dtype=tl.int32)
    # Three passes over the key range: the masked head, the unmasked middle, the masked tail.
    for phase in tl.static_range(3):
        if phase == 0:
            start, stop = lo, mid_lo
        elif phase == 1:
            start, stop = mid_lo, mid_hi
        else:
            start, stop = mid_hi, hi
        acc, l_i, m_i, bad_i = _fwd_inner(
            acc, l_i, m_i, bad_i, q, qp, qb, K_ptrs=K_ptrs, V_ptrs=V_ptrs, stride_kn=K[2], stride_vn=V[2], SP=SP,
            k_side=k_side, offs_m=offs_m, offs_n=offs_n, d_ok=d_ok, lo=start, hi=stop, seqlen_k=seqlen_k,
            lower=lower, upper=upper, SCORE=SCORE, BLOCK_N=BLOCK_N, MASK=phase != 1, HAS_LOWER=HAS_LOWER,
            HAS_UPPER=HAS_UPPER, HAS_SOFTCAP=HAS_SOFTCAP, SPARSE=SPARSE, SP_CAUSAL=SP_CAUSAL, HASH=HASH,
            PRECISION=PRECISION, ONE_KEY=ONE_KEY, ROWS=ROWS)

    # Sparse padding rows (seqlen_q <= row < SEQLEN_Q) get out = 0 / empty LSE, never stale memory (their q is 0,
    # so l_i would not be 0 when the block has valid rows too): the front ends return them for dropped queries.
    empty = (l_i == 0.0) | ~m_ok
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, EMPTY_LSE_C, (m_i + tl.log2(l_safe)) * LN2_C)
    n_store = SEQ[1]                             # rows of the allocation (padding rows included) ...
    if VARLEN:
        n_store = seqlen_q                       # ... but never into the next sequence of a packed batch
    in_alloc = offs_m < n_store
    tl.store(_rows(LSE, b, h, q_start) + q_at, lse, mask=in_alloc)
    out = tl.where(m_ok[:, None], acc / l_safe[:, None], 0.0)
    # rows past seqlen_q (a sparse head's padding: what dropped queries return) stay 0 whatever they "saw"
    out = tl.where((bad_i[:, None] != 0) & m_ok[:, None], float("nan"), out)
    tl.store(_rows(O, b, h, q_start) + q_at[:, None].to(tl.int64) * O[2] + offs_d[None, :],
             out.to(O[0].dtype.element_ty), mask=in_alloc[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------- backward
@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, SEQ, Rows, Lens, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr, ROWS: tl.constexpr):
    """delta = rowsum(dO * O) (- dlse) of BLOCK_M rows of a (batch, head). ROWS (a sparse call's row tables,
    ``Rows`` (B, H, S) and kept counts ``Lens`` (B, H)): the program's rows are slots, and only the kept ones'
    rows are computed (through the table): the sparse kernels never read a dropped row's delta (QK drop 0.8: a
    fifth of the rows' traffic)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = b * 0
    seqlen_q = SEQ[1]
    if VARLEN:
        q_start = tl.load(SEQ[3] + b)
        seqlen_q = tl.load(SEQ[3] + b + 1) - q_start
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if ROWS:
        row = b.to(tl.int64) * SEQ[0] + h
        kept = tl.load(Lens + row)
        if pid_m * BLOCK_M >= kept:
            return
        m_ok = offs_m < kept
        at = tl.load(Rows + row * SEQ[1] + offs_m, mask=m_ok, other=0)
    else:
        m_ok = offs_m < seqlen_q
        at = offs_m
    msk = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(_rows(O, b, h, q_start) + at[:, None].to(tl.int64) * O[2] + offs_d[None, :],
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(_rows(DO, b, h, q_start) + at[:, None].to(tl.int64) * DO[2] + offs_d[None, :],
                 mask=msk, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        # d lse / d s = P, so a gradient on the returned LSE folds into delta: dS = P * (dP - (delta - dlse)).
        delta -= tl.load(_rows(DLSE, b, h, q_start) + at, mask=m_ok, other=0.0)
    tl.store(_rows(DELTA, b, h, q_start) + at, delta, mask=m_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, kp, kb, Q_ptrs, DO_ptrs, Lse_ptr, Delta_ptr, stride_qm, stride_dom, SP, q_side,
                offs_m, offs_n, d_ok, lo, hi, seqlen_q, seqlen_k, lower, upper, SCORE, BLOCK_M: tl.constexpr,
                MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, PRECISION: tl.constexpr,
                ROWS: tl.constexpr):
    # ROWS == 2: the row-table entries of the next query tile are read one iteration ahead, so that Q and dO load
    # through a loop-carried offset and Triton's pipeliner gives them its full depth (3 buffers, as the dense
    # kernel's; read in the same iteration, the table load took a stage and left them 2: TTGIR, triton 3.6, sm_90)
    q_next = _slot_rows(Rows=SP[7], side=q_side, slots=lo + offs_m, n=seqlen_q, ROWS=ROWS == 2, MASK=True)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        qi = start_m + offs_m
        qp = qi
        qb = qi
        if MASK:
            m_ok = qi < seqlen_q
            if SPARSE:
                if SP_CAUSAL:
                    qp = tl.load(SP[0] + q_side + qi, mask=m_ok, other=-1)
                if HASH:
                    qb = tl.load(SP[2] + q_side + qi, mask=m_ok, other=-2)
        else:
            m_ok = qi >= 0
        if ROWS:        # Q_ptrs / DO_ptrs hold no row offset: each query slot's row comes from the row table
            if ROWS == 2:
                q_at = q_next
                q_next = _slot_rows(Rows=SP[7], side=q_side, slots=qi + BLOCK_M, n=seqlen_q, ROWS=True, MASK=True)
            else:
                q_at = _slot_rows(Rows=SP[7], side=q_side, slots=qi, n=seqlen_q, ROWS=ROWS, MASK=MASK)
            qoff = q_at[None, :].to(tl.int64) * stride_qm
            dooff = q_at[:, None].to(tl.int64) * stride_dom
        else:
            q_at = qi
            qoff = start_m.to(tl.int64) * stride_qm
            dooff = start_m.to(tl.int64) * stride_dom
        qT = tl.load(Q_ptrs + qoff, mask=d_ok[:, None] & m_ok[None, :], other=0.0)
        # Rows past seqlen_q read LSE = +inf, so their P is exactly 0 and they add nothing to dK/dV.
        lse2 = tl.load(Lse_ptr + q_at, mask=m_ok, other=float("inf")) * LOG2E_C
        sT, tT = _scores(k, qT, qi=qi[None, :], kj=offs_n[:, None], qp=qp[None, :], kp=kp[:, None], qb=qb[None, :],
                         kb=kb[:, None], seqlen_k=seqlen_k, lower=lower, upper=upper, SCORE=SCORE, MASK=MASK,
                         HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER, HAS_SOFTCAP=HAS_SOFTCAP, SPARSE=SPARSE,
                         SP_CAUSAL=SP_CAUSAL, HASH=HASH, PRECISION=PRECISION, RAW=False)  # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(sT - lse2[None, :])
        do = tl.load(DO_ptrs + dooff, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        dv = mma(pT.to(do.dtype), do, dv, PRECISION)
        delta = tl.load(Delta_ptr + q_at, mask=m_ok, other=0.0)
        dpT = mma(v, tl.trans(do), None, PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        if MASK:       # masked pairs (P = 0) contribute exactly 0, also when dP is NaN (a non-finite value or
            dsT = tl.where(pT == 0.0, 0.0, dsT)     # a poisoned row's delta): free, P is live here anyway
        dk = mma(dsT.to(qT.dtype), tl.trans(qT), dk, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, SEQ, BAND, SCORE, SP,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, VARLEN: tl.constexpr,
              PRECISION: tl.constexpr, ROWS: tl.constexpr):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    krow = b.to(tl.int64) * (SEQ[0] // GROUP) + hk
    q_start, seqlen_q, k_start, seqlen_k = _seq_info(SEQ=SEQ, SP=SP, b=b, qrow=krow * GROUP, krow=krow,
                                                     SPARSE=SPARSE, VARLEN=VARLEN)
    start_n = pid_n * BLOCK_N
    if VARLEN:
        if start_n >= seqlen_k:
            return
    lower, upper = _band(BAND=BAND, seqlen_q=seqlen_q, seqlen_k=seqlen_k, VARLEN=VARLEN)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < seqlen_k
    kp = offs_n
    kb = offs_n
    if SPARSE:
        kp, kb = _key_side(SP=SP, k_side=krow * SEQ[2], kj=offs_n, n_ok=n_ok, SP_CAUSAL=SP_CAUSAL, HASH=HASH)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k_at = _slot_rows(Rows=SP[8], side=krow * SEQ[2], slots=offs_n, n=SEQ[2], ROWS=ROWS, MASK=True)
    k = tl.load(_rows(K, b, hk, k_start) + k_at[:, None].to(tl.int64) * K[2] + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(_rows(V, b, hk, k_start) + k_at[:, None].to(tl.int64) * V[2] + offs_d[None, :], mask=kv_mask,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):                       # GQA: the query heads sharing this K/V head, summed in registers
        h = hk * GROUP + g
        qrow = b.to(tl.int64) * SEQ[0] + h
        if SPARSE:
            seqlen_q = tl.load(SP[4] + qrow)
        # Query rows that see this key block: the band seen from the key side is (-upper, -lower).
        lo, mid_lo, mid_hi, hi = _tile_range(SP=SP, row=qrow, blk=pid_n, nblk=tl.num_programs(0), start=start_n,
                                             seqlen_other=seqlen_q, lower=-upper, upper=-lower, BLOCK=BLOCK_N,
                                             OTHER_BLOCK=BLOCK_M, HAS_LOWER=HAS_UPPER, HAS_UPPER=HAS_LOWER,
                                             SPARSE=SPARSE)
        if ROWS:                                 # each query tile's rows are added in _dkdv_inner
            Q_ptrs = _rows(Q, b, h, q_start) + offs_d[:, None]
            DO_ptrs = _rows(DO, b, h, q_start) + offs_d[None, :]
        else:
            Q_ptrs = _rows(Q, b, h, q_start) + offs_m[None, :] * Q[2] + offs_d[:, None]
            DO_ptrs = _rows(DO, b, h, q_start) + offs_m[:, None] * DO[2] + offs_d[None, :]
        for phase in tl.static_range(3):
            if phase == 0:
                start, stop = lo, mid_lo
            elif phase == 1:
                start, stop = mid_lo, mid_hi
            else:
                start, stop = mid_hi, hi
            dk, dv = _dkdv_inner(dk, dv, k, v, kp, kb, Q_ptrs=Q_ptrs, DO_ptrs=DO_ptrs,
                                 Lse_ptr=_rows(LSE, b, h, q_start), Delta_ptr=_rows(DELTA, b, h, q_start),
                                 stride_qm=Q[2], stride_dom=DO[2], SP=SP, q_side=qrow * SEQ[1], offs_m=offs_m,
                                 offs_n=offs_n, d_ok=d_ok, lo=start, hi=stop, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                                 lower=lower, upper=upper, SCORE=SCORE, BLOCK_M=BLOCK_M, MASK=phase != 1,
                                 HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER, HAS_SOFTCAP=HAS_SOFTCAP, SPARSE=SPARSE,
                                 SP_CAUSAL=SP_CAUSAL, HASH=HASH, PRECISION=PRECISION, ROWS=ROWS)
    # Sparse padding keys (seqlen_k <= row < SEQLEN_K) get zero gradients: they are the dropped tokens (stored at
    # their own rows through the row table, or handed back by a caller that compacted them itself).
    dk = tl.where(n_ok[:, None], dk * SCORE[2], 0.0)
    dv = tl.where(n_ok[:, None], dv, 0.0)
    n_store = SEQ[2]
    if VARLEN:
        n_store = seqlen_k
    st_mask = (offs_n[:, None] < n_store) & d_ok[None, :]
    tl.store(_rows(DK, b, hk, k_start) + k_at[:, None].to(tl.int64) * DK[2] + offs_d[None, :],
             dk.to(DK[0].dtype.element_ty), mask=st_mask)
    tl.store(_rows(DV, b, hk, k_start) + k_at[:, None].to(tl.int64) * DV[2] + offs_d[None, :],
             dv.to(DV[0].dtype.element_ty), mask=st_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, qp, qb, K_ptrs, V_ptrs, stride_kn, stride_vn, SP, k_side, offs_m, offs_n,
              d_ok, lo, hi, seqlen_k, lower, upper, SCORE, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SPARSE: tl.constexpr,
              SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, PRECISION: tl.constexpr, ROWS: tl.constexpr):
    k_next = _slot_rows(Rows=SP[8], side=k_side, slots=lo + offs_n, n=seqlen_k, ROWS=ROWS == 2, MASK=True)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kj = start_n + offs_n
        kp = kj
        kb = kj
        if MASK:
            n_ok = kj < seqlen_k
            if SPARSE:
                kp, kb = _key_side(SP=SP, k_side=k_side, kj=kj, n_ok=n_ok, SP_CAUSAL=SP_CAUSAL, HASH=HASH)
        else:
            n_ok = kj >= 0
        if ROWS:        # as in _fwd_inner
            if ROWS == 2:
                kr = k_next.to(tl.int64)
                k_next = _slot_rows(Rows=SP[8], side=k_side, slots=kj + BLOCK_N, n=seqlen_k, ROWS=True, MASK=True)
            else:
                kr = _slot_rows(Rows=SP[8], side=k_side, slots=kj, n=seqlen_k, ROWS=ROWS, MASK=MASK).to(tl.int64)
            koff = kr[None, :] * stride_kn
            voff = kr[None, :] * stride_vn
        else:
            koff = start_n.to(tl.int64) * stride_kn
            voff = start_n.to(tl.int64) * stride_vn
        kT = tl.load(K_ptrs + koff, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        vT = tl.load(V_ptrs + voff, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s, t = _scores(q, kT, qi=offs_m[:, None], kj=kj[None, :], qp=qp[:, None], kp=kp[None, :], qb=qb[:, None],
                       kb=kb[None, :], seqlen_k=seqlen_k, lower=lower, upper=upper, SCORE=SCORE, MASK=MASK,
                       HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER, HAS_SOFTCAP=HAS_SOFTCAP, SPARSE=SPARSE,
                       SP_CAUSAL=SP_CAUSAL, HASH=HASH, PRECISION=PRECISION, RAW=False)
        p = tl.exp2(s - lse2[:, None])
        dp = mma(do, vT, None, PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        if MASK:       # as in _dkdv_inner
            ds = tl.where(p == 0.0, 0.0, ds)
        dq = mma(ds.to(kT.dtype), tl.trans(kT), dq, PRECISION)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, SEQ, BAND, SCORE, SP,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, VARLEN: tl.constexpr,
            PRECISION: tl.constexpr, REVERSE_M: tl.constexpr, ROWS: tl.constexpr):
    pid_m = tl.program_id(0)
    if REVERSE_M:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk, k_side, q_start, seqlen_q, k_start, seqlen_k, lower, upper, lo, mid_lo, mid_hi, hi, offs_m, qp, qb = \
        _query_block(SEQ=SEQ, BAND=BAND, SP=SP, pid_m=pid_m, h=h, b=b, GROUP=GROUP, BLOCK_M=BLOCK_M,
                     BLOCK_N=BLOCK_N, HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER, SPARSE=SPARSE, SP_CAUSAL=SP_CAUSAL,
                     HASH=HASH, VARLEN=VARLEN)
    if VARLEN:
        if pid_m * BLOCK_M >= seqlen_q:
            return
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < seqlen_q
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q_at = _slot_rows(Rows=SP[7], side=(b.to(tl.int64) * SEQ[0] + h) * SEQ[1], slots=offs_m, n=SEQ[1], ROWS=ROWS,
                      MASK=True)
    q = tl.load(_rows(Q, b, h, q_start) + q_at[:, None].to(tl.int64) * Q[2] + offs_d[None, :], mask=qd_mask,
                other=0.0)
    do = tl.load(_rows(DO, b, h, q_start) + q_at[:, None].to(tl.int64) * DO[2] + offs_d[None, :], mask=qd_mask,
                 other=0.0)
    lse2 = tl.load(_rows(LSE, b, h, q_start) + q_at, mask=m_ok, other=float("inf")) * LOG2E_C
    delta = tl.load(_rows(DELTA, b, h, q_start) + q_at, mask=m_ok, other=0.0)
    if ROWS:                                     # each key tile's rows are added in _dq_inner
        K_ptrs = _rows(K, b, hk, k_start) + offs_d[:, None]
        V_ptrs = _rows(V, b, hk, k_start) + offs_d[:, None]
    else:
        K_ptrs = _rows(K, b, hk, k_start) + offs_n[None, :] * K[2] + offs_d[:, None]
        V_ptrs = _rows(V, b, hk, k_start) + offs_n[None, :] * V[2] + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for phase in tl.static_range(3):
        if phase == 0:
            start, stop = lo, mid_lo
        elif phase == 1:
            start, stop = mid_lo, mid_hi
        else:
            start, stop = mid_hi, hi
        dq = _dq_inner(dq, q, do, lse2, delta, qp, qb, K_ptrs=K_ptrs, V_ptrs=V_ptrs, stride_kn=K[2], stride_vn=V[2],
                       SP=SP, k_side=k_side, offs_m=offs_m, offs_n=offs_n, d_ok=d_ok, lo=start, hi=stop,
                       seqlen_k=seqlen_k, lower=lower, upper=upper, SCORE=SCORE, BLOCK_N=BLOCK_N, MASK=phase != 1,
                       HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER, HAS_SOFTCAP=HAS_SOFTCAP, SPARSE=SPARSE,
                       SP_CAUSAL=SP_CAUSAL, HASH=HASH, PRECISION=PRECISION, ROWS=ROWS)
    dq = tl.where(m_ok[:, None], dq * SCORE[2], 0.0)       # sparse padding rows: zero, as for dK/dV
    n_store = SEQ[1]
    if VARLEN:
        n_store = seqlen_q
    tl.store(_rows(DQ, b, h, q_start) + q_at[:, None].to(tl.int64) * DQ[2] + offs_d[None, :],
             dq.to(DQ[0].dtype.element_ty), mask=(offs_m[:, None] < n_store) & d_ok[None, :])


# ---------------------------------------------------------------------------------------------------- launchers
# Tile configurations, as data: (largest head dim, config) for CUDA fp16/bf16, first match wins. Measured on an
# H100 (bf16, N=8k, `flashring bench tune`; benchmarks/NOTES.md): forward D<=64 128x64/8 warps/3 stages 431 (full) /
# 396 (causal) TFLOP/s, 128x128 364 / 343; D<=128 128x128/8/3 458 (causal), 128x64/8/3 436, 128x64/4/3 168 (spills).
# Backward D<=64 64x64/4/3 366 / 292, 64x64/4/2 339 / 266; D<=128 64x64/4/2 336 / 315, 8 warps 158-180.
# maxnreg=128 (D <= 64): two 256-thread programs per SM. Compiled for sm_90 (benchmarks/compile_probe.py) the
# non-finite value handling of the masked tiles took the causal kernel from 116 to 142 registers, one program per
# SM; capped at 128, ptxas fits it without spilling.
FWD_CONFIGS = ((64, dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=128)),
               (128, dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)),
               (256, dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)))
BWD_CONFIGS = ((64, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
               (128, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
               (256, dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)))
# fp32 on CUDA: 4-byte operands; the bf16 tiles (128x128 K and V, 3 stages = 384 KB at BLOCK_D=128) would not fit
# Hopper's 228 KB of shared memory. 64x32 / 32x32 tiles stay <= 192 KB even at BLOCK_D=256.
FP32_CONFIGS = (dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
                dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1))
# Interpreter: tile shapes only matter for coverage; unequal M/N tiles exercise both band loops' edges.
INTERP_CONFIGS = (dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
                  dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1))


# Short causal forwards (H100, bf16, D=128, N=1k, `flashring bench tune`, 2026-11-23): 64x64/4 warps/3 stages 278
# TFLOP/s, the 128x128 default 180 (the "causal 1k cliff"), 128x64/8/3 239: with only 1-8 key tiles per query block
# the smaller tiles give 4x the programs and a short pipeline prologue. At 2k the 128x128 default did 281 (anchor
# run) and 64x64 221 (dense run of a69f62a), so the rule stops at 1k.
SHORT_CAUSAL_FWD = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
# Longer causal forwards at D 65-128: 128x64/8 warps/3 stages. Same tune run at 8k: 422 TFLOP/s vs 404 for
# 128x128; compiled for sm_90 it is also the one that keeps the masked tiles' non-finite handling spill-free
# (218 registers, 128 KB of shared memory; 128x128: 56 B of stack), benchmarks/NOTES.md.
CAUSAL_FWD_128 = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device, backward: bool,
                   seqlen_q: int = 0, causal: bool = False) -> dict:
    if device.type != "cuda":
        return dict(INTERP_CONFIGS[backward])
    if dtype == torch.float32:
        return dict(FP32_CONFIGS[backward])
    if not backward and causal and 64 < head_dim <= 128:
        return dict(SHORT_CAUSAL_FWD if seqlen_q <= 1024 else CAUSAL_FWD_128)
    return dict(next(cfg for d, cfg in (BWD_CONFIGS if backward else FWD_CONFIGS) if head_dim <= d))


# The sparse row-table kernels can read the next tile's row-table entries one iteration ahead (ROWS == 2): read in
# the same iteration (ROWS == 1), the table load takes one of the pipeliner's stages and leaves K / V (forward) or
# Q / dO (dK/dV) 2 buffers instead of the dense kernels' 3 (TTGIR, triton 3.6, sm_90). Kernel time on one H100,
# B=1, H=32, D=64, causal, 8k / 16k, QK drop 0.5 / 0.8 and hash 8 / 16 (session 14): forward 0.92-0.99x with it,
# so ahead up to D=64; the backward 0.92-0.95x at QK 0.5 but 1.07-1.18x at drop 0.8 and hash 16, where a program
# walks few tiles and pays the extra prologue load, so in the iteration. At D=128 the loop-carried entries spill
# (forward 304 B, dK/dV 712 B of stack). Head dims up to which each pass reads ahead; a launch config's ROWS_AHEAD
# key overrides (benchmarks/sparse_tiles.py times both).
ROWS_AHEAD_MAX_D = dict(fwd=64, bwd=0)


def row_mode(sp_flags: dict, cfg: dict, head_dim: int, backward: bool, key: str = "ROWS_AHEAD") -> dict:
    """``sp_flags`` with ROWS as the kernels take it (0 none, 1 row tables read in the iteration, 2 one ahead);
    ``cfg[key]`` (else ``cfg["ROWS_AHEAD"]``) overrides :data:`ROWS_AHEAD_MAX_D`."""
    default = head_dim <= ROWS_AHEAD_MAX_D["bwd" if backward else "fwd"]
    ahead = cfg.get(key, cfg.get("ROWS_AHEAD", default))
    return dict(sp_flags, ROWS=(2 if ahead else 1) if sp_flags["ROWS"] else 0)


def precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products ("ieee"), not tf32: the documented fp32 precision is fp32's own.
    return "ieee" if dtype == torch.float32 else "tf32"


def unit_last(x: torch.Tensor) -> torch.Tensor:
    # Kernels address headdim with unit stride; any other stride layout is used as is.
    return x if x.stride(-1) == 1 else x.contiguous()


def tensor_arg(t: torch.Tensor) -> tuple:
    """``(ptr, stride_batch, stride_seq, stride_head)``; a packed (total, H, D) tensor has no batch stride."""
    if t.dim() == 3:
        return (t, 0, t.stride(0), t.stride(1))
    return (t, t.stride(0), t.stride(1), t.stride(2))


def _rows_arg(t: torch.Tensor) -> tuple:
    """LSE / delta rows: ``(B, H, S)`` or packed ``(H, total)``, in ``_rows`` form (unit sequence stride)."""
    if t.dim() == 2:
        return (t, 0, 1, t.stride(0))
    return (t, t.stride(0), 1, t.stride(1))


def _band_args(lower: Optional[int], upper: Optional[int]):
    return (0 if lower is None else int(lower), 0 if upper is None else int(upper)), \
        dict(HAS_LOWER=lower is not None, HAS_UPPER=upper is not None)


def score_args(softmax_scale: float, softcap: float) -> tuple:
    if softcap > 0:
        return (softmax_scale / softcap, softcap * LOG2E, softmax_scale)
    return (softmax_scale * LOG2E, 0.0, softmax_scale)


class Varlen:
    """A packed batch: ``cu_q`` / ``cu_k`` int32 ``(batch + 1,)`` cumulative lengths and the longest lengths."""

    def __init__(self, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int):
        self.cu_q, self.cu_k, self.max_q, self.max_k = cu_q, cu_k, int(max_q), int(max_k)

    @property
    def batch(self) -> int:
        return self.cu_q.shape[0] - 1


def _layout(q, k, varlen: Optional[Varlen]):
    """(batch, rows per batch of the allocation, heads, K/V rows, K/V heads, SEQ tuple) of a launch."""
    if varlen is None:
        b, sq, h, _ = q.shape
        sk, hk = k.shape[1], k.shape[2]
        return b, sq, h, sk, hk, (h, sq, sk, None, None)
    h, hk = q.shape[1], k.shape[1]
    return varlen.batch, varlen.max_q, h, varlen.max_k, hk, (h, q.shape[0], k.shape[0], varlen.cu_q, varlen.cu_k)


# Every launch goes through ops.launch.Launcher (Triton's generic launch path costs ~45 us of host time each).
LAUNCH_FWD, LAUNCH_BWD_PRE, LAUNCH_BWD_DKDV, LAUNCH_BWD_DQ = (
    Launcher(k) for k in (_attn_fwd, _bwd_preprocess, _bwd_dkdv, _bwd_dq))


def fwd(q, k, v, softmax_scale: float, lower: Optional[int] = None, upper: Optional[int] = None,
        softcap: float = 0.0, sparse: Optional[SparseMeta] = None, varlen: Optional[Varlen] = None,
        config: Optional[dict] = None, out_dtype: Optional[torch.dtype] = None):
    """Forward launch: ``(out, lse)``; lse ``(B, H, Sq)`` (varlen: ``(H, total_q)``) fp32, natural log. With
    ``varlen``, lower/upper are relative to each sequence's bottom-right diagonal (``masks.window_offsets``)."""
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    b, sq, h, sk, hk, seq = _layout(q, k, varlen)
    d = q.shape[-1]
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((h, q.shape[0]) if varlen else (b, h, sq), dtype=torch.float32, device=q.device)
    cfg = dict(config or default_config(d, q.dtype, q.device, backward=False, seqlen_q=sq,
                                        causal=upper is not None and upper <= 0))
    cfg.setdefault("REVERSE_M", False)
    band, band_flags = _band_args(lower, upper)
    side, sp_flags = kernel_side(sparse, h // hk, cfg["BLOCK_M"], cfg["BLOCK_N"], from_keys=False)
    sp_flags = row_mode(sp_flags, {k: cfg.pop(k) for k in ("ROWS_AHEAD",) if k in cfg}, d, backward=False)
    LAUNCH_FWD[(cdiv(sq, cfg["BLOCK_M"]), h, b)](
        tensor_arg(q), tensor_arg(k), tensor_arg(v), tensor_arg(out), _rows_arg(lse), seq, band,
        score_args(softmax_scale, softcap), side, GROUP=h // hk, HEAD_DIM=d,
        BLOCK_D=max(16, next_power_of_2(d)), HAS_SOFTCAP=softcap > 0, VARLEN=varlen is not None,
        PRECISION=precision(q.dtype), ONE_KEY=sk == 1 and varlen is None, **band_flags, **sp_flags, **cfg)
    return out, lse


def preprocess(out: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor], seq: tuple,
               varlen: Optional[Varlen] = None, sparse: Optional[SparseMeta] = None) -> torch.Tensor:
    """delta = rowsum(dO * O) - dlse, shaped like ``lse``, in one launch (``seq``: :func:`_layout`'s). With a sparse
    call's row tables only the kept tokens' rows are computed; the others' stay unwritten (never read)."""
    h = seq[0]
    b, sq = (out.shape[0], out.shape[1]) if varlen is None else (varlen.batch, varlen.max_q)
    delta = torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    rows = sparse is not None and sparse.q_rows is not None
    LAUNCH_BWD_PRE[(cdiv(sq, 64), h, b)](
        tensor_arg(out), tensor_arg(do), _rows_arg(dlse if dlse is not None else delta), _rows_arg(delta), seq,
        sparse.q_rows if rows else delta, sparse.q_len.contiguous() if rows else delta, HEAD_DIM=out.shape[-1],
        BLOCK_D=max(16, next_power_of_2(out.shape[-1])), BLOCK_M=64, HAS_DLSE=dlse is not None,
        VARLEN=varlen is not None, ROWS=rows)
    return delta


def bwd(do, q, k, v, out, lse, softmax_scale: float, lower: Optional[int] = None, upper: Optional[int] = None,
        softcap: float = 0.0, dlse: Optional[torch.Tensor] = None, grad_dtype: Optional[torch.dtype] = None,
        sparse: Optional[SparseMeta] = None, varlen: Optional[Varlen] = None, config: Optional[dict] = None):
    """Backward launches: ``(dq, dk, dv)``."""
    do, q, k, v, out = (unit_last(t) for t in (do, q, k, v, out))
    b, sq, h, sk, hk, seq = _layout(q, k, varlen)
    d = q.shape[-1]
    block_d = max(16, next_power_of_2(d))
    lse = lse.contiguous()
    delta = preprocess(out, do, lse, dlse, seq, varlen, sparse)
    dq, dk, dv = (torch.empty(t.shape, dtype=grad_dtype or t.dtype, device=t.device) for t in (q, k, v))
    cfg = dict(config or default_config(d, q.dtype, q.device, backward=True))
    reverse_m = cfg.pop("REVERSE_M", False)                 # the dQ program's order (dK/dV has its own)
    # ROWS_AHEAD for both backward kernels, ROWS_AHEAD_DKDV / ROWS_AHEAD_DQ for one (benchmarks/sparse_tiles.py)
    rows_cfg = {k: cfg.pop(k) for k in ("ROWS_AHEAD", "ROWS_AHEAD_DKDV", "ROWS_AHEAD_DQ") if k in cfg}
    band, band_flags = _band_args(lower, upper)
    common = dict(GROUP=h // hk, HEAD_DIM=d, BLOCK_D=block_d, HAS_SOFTCAP=softcap > 0, VARLEN=varlen is not None,
                  PRECISION=precision(q.dtype), **band_flags, **cfg)
    score = score_args(softmax_scale, softcap)
    ins = (tensor_arg(q), tensor_arg(k), tensor_arg(v), tensor_arg(do), _rows_arg(lse), _rows_arg(delta))
    side, sp_flags = kernel_side(sparse, h // hk, cfg["BLOCK_M"], cfg["BLOCK_N"], from_keys=True)
    sp_flags = row_mode(sp_flags, rows_cfg, d, backward=True, key="ROWS_AHEAD_DKDV")
    LAUNCH_BWD_DKDV[(cdiv(sk, cfg["BLOCK_N"]), hk, b)](*ins, tensor_arg(dk), tensor_arg(dv), seq, band, score,
                                                        side, **sp_flags, **common)
    side, sp_flags = kernel_side(sparse, h // hk, cfg["BLOCK_M"], cfg["BLOCK_N"], from_keys=False)
    sp_flags = row_mode(sp_flags, rows_cfg, d, backward=True, key="ROWS_AHEAD_DQ")
    LAUNCH_BWD_DQ[(cdiv(sq, cfg["BLOCK_M"]), h, b)](*ins, tensor_arg(dq), seq, band, score, side, **sp_flags,
                                                     REVERSE_M=reverse_m, **common)
    return dq, dk, dv
