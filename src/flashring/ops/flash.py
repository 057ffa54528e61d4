"""Dense FlashAttention-2 kernels (Triton), their launchers, and the device dispatch.

Layout everywhere: ``(batch, seqlen, nheads, headdim)`` with arbitrary strides (only headdim must be unit-stride).
Masking is the diagonal band of ``flashring._masks``: row ``i`` sees column ``j`` iff ``i + LOWER <= j <= i + UPPER``.

Work partitioning (FA2):
- forward: one program per (query block, head, batch); K/V tiles streamed through SRAM with an online softmax in
  base 2 (``QK_SCALE = softmax_scale * log2(e)`` folded into the scores, one ``exp2`` per element). Key tiles outside
  the band are never visited; tiles wholly inside it run without any masking arithmetic, so only the tiles that
  straddle the band's edges (the diagonal for causal) or the ragged tail pay for ``tl.where``.
- backward: ``_bwd_preprocess`` (delta = rowsum(dO * O)), ``_bwd_dkdv`` (one program per key block and K/V head,
  looping over the query heads of its GQA group, so dK/dV are summed without atomics) and ``_bwd_dq`` (one program
  per query block). P is recomputed from Q, K and the saved LSE; no (seqlen_q, seqlen_k) tensor exists. No atomics
  anywhere, so gradients are bitwise reproducible.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._masks import EMPTY_ROW_LSE
from .. import reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Kernels may only read globals that are constexpr.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
_EMPTY_LSE = tl.constexpr(EMPTY_ROW_LSE)
_INTERP = tl.constexpr(INTERPRET)

# Which implementation CPU tensors use: "torch" (chunked PyTorch, fast on CPU) or "triton" (the kernels under
# TRITON_INTERPRET=1; the test-suite exercises both). CUDA tensors always use the Triton kernels.
CPU_BACKEND = "triton" if INTERPRET else "torch"


# ----------------------------------------------------------------------------------------------------- kernels
# Two masking modes share every kernel:
# - band (dense): row i sees column j iff i + LOWER <= j <= i + UPPER (HAS_LOWER/HAS_UPPER), tile ranges computed
#   in-kernel by _band_range;
# - SPARSE (dynamic sparse attention on compacted / bucket-sorted tokens): per-(batch, head) lengths, original
#   positions (causality is decided on them: SP_CAUSAL) and, with HASH, bucket ids (query and key must share one).
#   The launcher precomputes each block's tile ranges [lo, mid_lo, mid_hi, hi) with searchsorted (a few bytes per
#   block), so skipped tiles cost nothing and fully visible tiles still run unmasked.
@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1), through exp2 so the interpreter and every GPU target share one code path;
    # saturates cleanly to +-1 (exp2 -> inf or 0), never NaN.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    # Every product goes through here. Under TRITON_INTERPRET (triton 3.8) a bf16 tl.dot multiplies the raw bit
    # patterns (numpy has no bf16; seen here: errors of 1e10), so the interpreter gets fp32 operands. Values are
    # already rounded to the input dtype, so the result is what an fp32-accumulating tensor core computes.
    if _INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if acc is None:
        return tl.dot(a, b, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _scores(a, b, qi, kj, qp, kp, qb, kb, seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2,
            MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of one tile in log2 units: dot(a, b), scaled (and soft-capped), masked when MASK.

    ``qi``/``kj`` (indices), ``qp``/``kp`` (original positions) and ``qb``/``kb`` (buckets) come already broadcast
    to the tile's orientation, so the forward (rows = queries) and the dK/dV pass (rows = keys) share this helper.
    Returns ``(s, t)``; ``t = tanh(.)`` is kept for the softcap backward (``t = s`` without softcap).
    """
    s = _mma(a, b, None, PRECISION)
    if HAS_SOFTCAP:
        # softcap * tanh(scale * s / softcap): QK_SCALE = scale / softcap, CAP_LOG2 = softcap * log2(e).
        t = _tanh(s * QK_SCALE)
        s = t * CAP_LOG2
    else:
        s = s * QK_SCALE
        t = s
    if MASK:
        keep = kj < seqlen_k
        if SPARSE:
            if SP_CAUSAL:
                keep = keep & (kp <= qp)
            if HASH:
                keep = keep & (kb == qb)
        else:
            if HAS_LOWER:
                keep = keep & (kj >= qi + LOWER)
            if HAS_UPPER:
                keep = keep & (kj <= qi + UPPER)
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def _band_range(start, BLOCK: tl.constexpr, OTHER_BLOCK: tl.constexpr, SEQLEN_OTHER, LOWER, UPPER,
                HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr):
    """Tiles of the other axis that rows/cols [start, start+BLOCK) touch, split as [lo, mid_lo) masked,
    [mid_lo, mid_hi) fully visible (no masking, no bounds checks), [mid_hi, hi) masked.

    Written for query rows looking at key columns (band i+LOWER <= j <= i+UPPER); the dK/dV pass calls it with
    (LOWER, UPPER) -> (-UPPER, -LOWER), which is the same band seen from the key side.
    """
    lo = SEQLEN_OTHER * 0
    hi = SEQLEN_OTHER
    full_lo = SEQLEN_OTHER * 0
    full_hi = SEQLEN_OTHER
    if HAS_LOWER:
        lo = tl.maximum(start + LOWER, 0)
        lo = (lo // OTHER_BLOCK) * OTHER_BLOCK
        full_lo = tl.maximum(start + BLOCK - 1 + LOWER, 0)
        full_lo = ((full_lo + OTHER_BLOCK - 1) // OTHER_BLOCK) * OTHER_BLOCK
    if HAS_UPPER:
        hi = tl.minimum(tl.maximum(start + BLOCK + UPPER, 0), SEQLEN_OTHER)
        full_hi = tl.minimum(tl.maximum(start + UPPER + 1, 0), SEQLEN_OTHER)
    full_hi = (full_hi // OTHER_BLOCK) * OTHER_BLOCK          # the unmasked loop never reads past the tensor
    hi = tl.maximum(hi, lo)
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _block_setup(Len, Ranges, row, pid, NBLK, SEQLEN_SELF, SEQLEN_OTHER, start,
                 BLOCK: tl.constexpr, OTHER_BLOCK: tl.constexpr, LOWER, UPPER,
                 HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, SPARSE: tl.constexpr):
    """This block's own length and its tile ranges over the other axis: loaded (sparse) or computed (band)."""
    if SPARSE:
        seqlen_self = tl.load(Len + row)
        r = Ranges + (row.to(tl.int64) * NBLK + pid) * 4
        lo = tl.load(r)
        mid_lo = tl.load(r + 1)
        mid_hi = tl.load(r + 2)
        hi = tl.load(r + 3)
    else:
        seqlen_self = SEQLEN_SELF
        lo, mid_lo, mid_hi, hi = _band_range(start, BLOCK, OTHER_BLOCK, SEQLEN_OTHER, LOWER, UPPER,
                                             HAS_LOWER, HAS_UPPER)
    return seqlen_self, lo, mid_lo, mid_hi, hi


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, qp, qb, K_ptrs, V_ptrs, KPos, KBkt, stride_kn, stride_vn, offs_m, offs_n,
                    d_ok, lo, hi, seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                    BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr,
                    HASH: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kj = start_n + offs_n
        koff = start_n.to(tl.int64) * stride_kn
        voff = start_n.to(tl.int64) * stride_vn
        kp = kj
        kb = kj
        if MASK:
            k = tl.load(K_ptrs + koff, mask=d_ok[:, None] & (kj[None, :] < seqlen_k), other=0.0)
            if SPARSE:
                if SP_CAUSAL:
                    kp = tl.load(KPos + kj, mask=kj < seqlen_k, other=0)
                if HASH:
                    kb = tl.load(KBkt + kj, mask=kj < seqlen_k, other=-1)
        else:
            k = tl.load(K_ptrs + koff, mask=d_ok[:, None], other=0.0)
        s, _t = _scores(q, k, offs_m[:, None], kj[None, :], qp[:, None], kp[None, :], qb[:, None], kb[None, :],
                        seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2, MASK, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP,
                        SPARSE, SP_CAUSAL, HASH, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose keys so far are all masked keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(V_ptrs + voff, mask=(kj[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        else:
            v = tl.load(V_ptrs + voff, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = _mma(p.to(v.dtype), v, acc, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, QPos, KPos, QBkt, KBkt, QLen, KLen, Ranges,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              stride_ob, stride_om, stride_oh,
              NHEADS, SEQLEN_Q, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    b64 = b.to(tl.int64)
    qrow = b64 * NHEADS + h                      # (batch, head) row of every (B, H, S) side tensor
    krow = b64 * (NHEADS // GROUP) + hk
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    seqlen_q, lo, mid_lo, mid_hi, hi = _block_setup(QLen, Ranges, qrow, pid_m, tl.num_programs(0), SEQLEN_Q,
                                                    SEQLEN_K, start_m, BLOCK_M, BLOCK_N, LOWER, UPPER,
                                                    HAS_LOWER, HAS_UPPER, SPARSE)
    seqlen_k = SEQLEN_K
    qp = offs_m
    qb = offs_m
    if SPARSE:
        seqlen_k = tl.load(KLen + krow)
        KPos += krow * SEQLEN_K
        if HASH:
            KBkt += krow * SEQLEN_K
        if SP_CAUSAL:
            qp = tl.load(QPos + qrow * SEQLEN_Q + offs_m, mask=offs_m < seqlen_q, other=-1)
        if HASH:
            qb = tl.load(QBkt + qrow * SEQLEN_Q + offs_m, mask=offs_m < seqlen_q, other=-2)
    m_ok = offs_m < seqlen_q

    Q += b64 * stride_qb + h.to(tl.int64) * stride_qh
    K += b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V += b64 * stride_vb + hk.to(tl.int64) * stride_vh
    q = tl.load(Q + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    K_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None]       # (BLOCK_D, BLOCK_N): K^T tile
    V_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]       # (BLOCK_N, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, qp, qb, K_ptrs, V_ptrs, KPos, KBkt, stride_kn, stride_vn,
                                    offs_m, offs_n, d_ok, lo, mid_lo, seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                                    BLOCK_N, True, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, SPARSE, SP_CAUSAL, HASH,
                                    PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, qp, qb, K_ptrs, V_ptrs, KPos, KBkt, stride_kn, stride_vn,
                                    offs_m, offs_n, d_ok, mid_lo, mid_hi, seqlen_k, LOWER, UPPER, QK_SCALE,
                                    CAP_LOG2, BLOCK_N, False, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, SPARSE, SP_CAUSAL,
                                    HASH, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, qp, qb, K_ptrs, V_ptrs, KPos, KBkt, stride_kn, stride_vn,
                                    offs_m, offs_n, d_ok, mid_hi, hi, seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                                    BLOCK_N, True, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, SPARSE, SP_CAUSAL, HASH,
                                    PRECISION)

    # Sparse padding rows (seqlen_q <= row < SEQLEN_Q) get out = 0 / empty LSE, never stale memory (their q is 0,
    # so l_i would not be 0 when the block has valid rows too): the front ends return them for dropped queries.
    empty = (l_i == 0.0) | ~m_ok
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, _EMPTY_LSE, (m_i + tl.log2(l_safe)) * _LN2)
    in_alloc = offs_m < SEQLEN_Q
    tl.store(Lse + qrow * SEQLEN_Q + offs_m, lse, mask=in_alloc)
    out = tl.where(m_ok[:, None], acc / l_safe[:, None], 0.0)
    Out += b64 * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(Out + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=in_alloc[:, None] & d_ok[None, :])


@triton.jit
def _bwd_preprocess(Out, DO, DLse, Delta,
                    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                    NHEADS, SEQLEN_Q, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    HAS_DLSE: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < SEQLEN_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :],
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom
                 + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
    row = (b * NHEADS + h) * SEQLEN_Q + offs_m
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        # d lse / d s = P, so a gradient on the returned LSE folds into delta: dS = P * (dP - (delta - dlse)).
        delta -= tl.load(DLse + row, mask=offs_m < SEQLEN_Q, other=0.0)
    tl.store(Delta + row, delta, mask=offs_m < SEQLEN_Q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, kp, kb, Q_ptrs, DO_ptrs, Lse_ptr, Delta_ptr, QPos, QBkt, stride_qm, stride_dom,
                    offs_m, offs_n, d_ok, lo, hi, seqlen_q, seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                    BLOCK_M: tl.constexpr, MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr,
                    HASH: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        qi = start_m + offs_m
        qp = qi
        qb = qi
        if MASK:
            m_ok = qi < seqlen_q
            if SPARSE:
                if SP_CAUSAL:
                    qp = tl.load(QPos + qi, mask=m_ok, other=-1)
                if HASH:
                    qb = tl.load(QBkt + qi, mask=m_ok, other=-2)
        else:
            m_ok = qi >= 0
        qT = tl.load(Q_ptrs + start_m.to(tl.int64) * stride_qm, mask=d_ok[:, None] & m_ok[None, :], other=0.0)
        # Rows past seqlen_q read LSE = +inf, so their P is exactly 0 and they add nothing to dK/dV.
        lse2 = tl.load(Lse_ptr + qi, mask=m_ok, other=float("inf")) * _LOG2E
        sT, tT = _scores(k, qT, qi[None, :], offs_n[:, None], qp[None, :], kp[:, None], qb[None, :], kb[:, None],
                         seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2, MASK, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP,
                         SPARSE, SP_CAUSAL, HASH, PRECISION)                        # (BLOCK_N, BLOCK_M)
        pT = tl.exp2(sT - lse2[None, :])
        do = tl.load(DO_ptrs + start_m.to(tl.int64) * stride_dom, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        dv = _mma(pT.to(do.dtype), do, dv, PRECISION)
        delta = tl.load(Delta_ptr + qi, mask=m_ok, other=0.0)
        dpT = _mma(v, tl.trans(do), None, PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = _mma(dsT.to(qT.dtype), tl.trans(qT), dk, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, QPos, KPos, QBkt, KBkt, QLen, KLen, Ranges,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              stride_dob, stride_dom, stride_doh,
              stride_dkb, stride_dkn, stride_dkh,
              stride_dvb, stride_dvn, stride_dvh,
              NHEADS, SEQLEN_Q, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2, SM_SCALE,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    krow = b * (NHEADS // GROUP) + hk
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    seqlen_k = SEQLEN_K
    kp = offs_n
    kb = offs_n
    if SPARSE:
        seqlen_k = tl.load(KLen + krow)
        if SP_CAUSAL:
            kp = tl.load(KPos + krow * SEQLEN_K + offs_n, mask=offs_n < seqlen_k, other=0)
        if HASH:
            kb = tl.load(KBkt + krow * SEQLEN_K + offs_n, mask=offs_n < seqlen_k, other=-1)
    n_ok = offs_n < seqlen_k
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):                       # GQA: the query heads sharing this K/V head, summed in registers
        h = hk * GROUP + g
        qrow = b * NHEADS + h
        # Query rows that see this key block: the band seen from the key side is (-UPPER, -LOWER).
        seqlen_q, lo, mid_lo, mid_hi, hi = _block_setup(QLen, Ranges, qrow, pid_n, tl.num_programs(0), SEQLEN_Q,
                                                        SEQLEN_Q, start_n, BLOCK_N, BLOCK_M, -UPPER, -LOWER,
                                                        HAS_UPPER, HAS_LOWER, SPARSE)
        Q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[None, :] * stride_qm + offs_d[:, None]
        DO_ptrs = DO + b * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
        Lse_ptr = Lse + qrow * SEQLEN_Q
        Delta_ptr = Delta + qrow * SEQLEN_Q
        QPos_h = QPos
        QBkt_h = QBkt
        if SPARSE:
            QPos_h = QPos + qrow * SEQLEN_Q
        if HASH:
            QBkt_h = QBkt + qrow * SEQLEN_Q
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kp, kb, Q_ptrs, DO_ptrs, Lse_ptr, Delta_ptr, QPos_h, QBkt_h,
                                 stride_qm, stride_dom, offs_m, offs_n, d_ok, lo, mid_lo, seqlen_q, seqlen_k,
                                 LOWER, UPPER, QK_SCALE, CAP_LOG2, BLOCK_M, True, HAS_LOWER, HAS_UPPER,
                                 HAS_SOFTCAP, SPARSE, SP_CAUSAL, HASH, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kp, kb, Q_ptrs, DO_ptrs, Lse_ptr, Delta_ptr, QPos_h, QBkt_h,
                                 stride_qm, stride_dom, offs_m, offs_n, d_ok, mid_lo, mid_hi, seqlen_q, seqlen_k,
                                 LOWER, UPPER, QK_SCALE, CAP_LOG2, BLOCK_M, False, HAS_LOWER, HAS_UPPER,
                                 HAS_SOFTCAP, SPARSE, SP_CAUSAL, HASH, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kp, kb, Q_ptrs, DO_ptrs, Lse_ptr, Delta_ptr, QPos_h, QBkt_h,
                                 stride_qm, stride_dom, offs_m, offs_n, d_ok, mid_hi, hi, seqlen_q, seqlen_k,
                                 LOWER, UPPER, QK_SCALE, CAP_LOG2, BLOCK_M, True, HAS_LOWER, HAS_UPPER,
                                 HAS_SOFTCAP, SPARSE, SP_CAUSAL, HASH, PRECISION)
    # Sparse padding keys (seqlen_k <= row < SEQLEN_K) get zero gradients: the front end's gather sends them
    # back to real (dropped) tokens.
    dk = tl.where(n_ok[:, None], dk * SM_SCALE, 0.0)
    dv = tl.where(n_ok[:, None], dv, 0.0)
    st_mask = (offs_n[:, None] < SEQLEN_K) & d_ok[None, :]
    tl.store(DK + b * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + b * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, qp, qb, K_ptrs, V_ptrs, KPos, KBkt, stride_kn, stride_vn, offs_m, offs_n,
                  d_ok, lo, hi, seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr,
                  PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kj = start_n + offs_n
        kp = kj
        kb = kj
        if MASK:
            n_ok = kj < seqlen_k
            if SPARSE:
                if SP_CAUSAL:
                    kp = tl.load(KPos + kj, mask=n_ok, other=0)
                if HASH:
                    kb = tl.load(KBkt + kj, mask=n_ok, other=-1)
        else:
            n_ok = kj >= 0
        kT = tl.load(K_ptrs + start_n.to(tl.int64) * stride_kn, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        vT = tl.load(V_ptrs + start_n.to(tl.int64) * stride_vn, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s, t = _scores(q, kT, offs_m[:, None], kj[None, :], qp[:, None], kp[None, :], qb[:, None], kb[None, :],
                       seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2, MASK, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP,
                       SPARSE, SP_CAUSAL, HASH, PRECISION)
        p = tl.exp2(s - lse2[:, None])
        dp = _mma(do, vT, None, PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, PRECISION)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, Lse, Delta, DQ, QPos, KPos, QBkt, KBkt, QLen, KLen, Ranges,
            stride_qb, stride_qm, stride_qh,
            stride_kb, stride_kn, stride_kh,
            stride_vb, stride_vn, stride_vh,
            stride_dob, stride_dom, stride_doh,
            stride_dqb, stride_dqm, stride_dqh,
            NHEADS, SEQLEN_Q, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2, SM_SCALE,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            SPARSE: tl.constexpr, SP_CAUSAL: tl.constexpr, HASH: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    qrow = b * NHEADS + h
    krow = b * (NHEADS // GROUP) + hk
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    seqlen_q, lo, mid_lo, mid_hi, hi = _block_setup(QLen, Ranges, qrow, pid_m, tl.num_programs(0), SEQLEN_Q,
                                                    SEQLEN_K, start_m, BLOCK_M, BLOCK_N, LOWER, UPPER,
                                                    HAS_LOWER, HAS_UPPER, SPARSE)
    seqlen_k = SEQLEN_K
    qp = offs_m
    qb = offs_m
    if SPARSE:
        seqlen_k = tl.load(KLen + krow)
        KPos += krow * SEQLEN_K
        if HASH:
            KBkt += krow * SEQLEN_K
        if SP_CAUSAL:
            qp = tl.load(QPos + qrow * SEQLEN_Q + offs_m, mask=offs_m < seqlen_q, other=-1)
        if HASH:
            qb = tl.load(QBkt + qrow * SEQLEN_Q + offs_m, mask=offs_m < seqlen_q, other=-2)
    m_ok = offs_m < seqlen_q
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom
                 + offs_d[None, :], mask=qd_mask, other=0.0)
    lse2 = tl.load(Lse + qrow * SEQLEN_Q + offs_m, mask=m_ok, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + qrow * SEQLEN_Q + offs_m, mask=m_ok, other=0.0)
    K_ptrs = K + b * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    V_ptrs = V + b * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, qp, qb, K_ptrs, V_ptrs, KPos, KBkt, stride_kn, stride_vn, offs_m,
                       offs_n, d_ok, lo, mid_lo, seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2, BLOCK_N, True,
                       HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, SPARSE, SP_CAUSAL, HASH, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, qp, qb, K_ptrs, V_ptrs, KPos, KBkt, stride_kn, stride_vn, offs_m,
                       offs_n, d_ok, mid_lo, mid_hi, seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2, BLOCK_N, False,
                       HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, SPARSE, SP_CAUSAL, HASH, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, qp, qb, K_ptrs, V_ptrs, KPos, KBkt, stride_kn, stride_vn, offs_m,
                       offs_n, d_ok, mid_hi, hi, seqlen_k, LOWER, UPPER, QK_SCALE, CAP_LOG2, BLOCK_N, True,
                       HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, SPARSE, SP_CAUSAL, HASH, PRECISION)
    dq = tl.where(m_ok[:, None], dq * SM_SCALE, 0.0)       # sparse padding rows: zero, as for dK/dV
    tl.store(DQ + b * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < SEQLEN_Q) & d_ok[None, :])


# ---------------------------------------------------------------------------------------------------- launchers
def _fwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type == "cuda" and dtype == torch.float32:
        # 4-byte operands: the bf16 tiles (128x128 K and V tiles, 3 stages = 384 KB at BLOCK_D=128) would not fit
        # Hopper's 228 KB of shared memory. 64x32 tiles, 2 stages: <= 192 KB even at BLOCK_D=256.
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if device.type != "cuda":
        # Interpreter: tile shapes only matter for coverage; unequal M/N tiles exercise both band loops' edges.
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        # H100, bf16, N=8k: 128x64/8 warps/3 stages 431 (full) / 396 (causal) TFLOP/s; 128x128/8/3 364 / 343.
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    if head_dim <= 128:
        # H100, bf16, N=8k causal (benchmarks/gpu_session.py --tune): 128x128/8 warps/3 stages 458 TFLOP/s,
        # 128x64/8/3 436, 128x64/4/3 168 (spills).
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _bwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type == "cuda" and dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)      # shared-memory budget, as forward
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim <= 64:
        # H100, bf16, N=8k: 64x64/4 warps/3 stages 366 (full) / 292 (causal) TFLOP/s; 64x64/4/2 339 / 266.
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        # H100, bf16, N=8k: 64x64/4 warps/2 stages 336 (full) / 315 (causal) TFLOP/s; 64x64/8 warps 158-180.
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products ("ieee"), not tf32: the documented fp32 precision is fp32's own.
    return "ieee" if dtype == torch.float32 else "tf32"


def _band_args(lower: Optional[int], upper: Optional[int]):
    return (0 if lower is None else int(lower), 0 if upper is None else int(upper), lower is not None,
            upper is not None)


def _scale_args(softmax_scale: float, softcap: float):
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 0.0


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    # Kernels address headdim with unit stride; any other stride layout is used as is.
    return x if x.stride(-1) == 1 else x.contiguous()


class SparseMeta(NamedTuple):
    """Side tensors of dynamic sparse attention on compacted (QK-sparse) or bucket-sorted (hash-sparse) tokens.

    q_pos ``(B, H, Sq)`` / k_pos ``(B, Hk, Sk)`` int32: original positions; within each (batch, head) the first
    ``len`` entries are valid and sorted by (bucket, position); the rest hold ``PAD_POS``. q_len ``(B, H)`` /
    k_len ``(B, Hk)`` int32. q_bkt / k_bkt: int32 buckets in the same layout, or None (QK-sparse).
    """
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    q_len: torch.Tensor
    k_len: torch.Tensor
    q_bkt: Optional[torch.Tensor]
    k_bkt: Optional[torch.Tensor]
    causal: bool


PAD_POS = 1 << 30          # position (and bucket) of padding entries: sorts after every real token


def _sort_keys(pos: torch.Tensor, bkt: Optional[torch.Tensor]) -> torch.Tensor:
    # (bucket, position) packed into one int64 that sorts like the pair; padding (PAD_POS, PAD_POS) sorts last.
    key = pos.long()
    if bkt is not None:
        key = key + (bkt.long() << 31)
    return key.contiguous()


def _tile_ranges(rows_key, rows_len, cols_key, cols_len, rows_block, cols_block, causal, hashed, from_keys):
    """Per block of rows: int32 [lo, mid_lo, mid_hi, hi] over column tiles ([mid_lo, mid_hi) fully visible).

    The readable torch statement of the rule; the launchers use ``_tile_ranges_kernel`` (one launch instead of
    ~25 small ops), which tests/test_sparse.py checks against this function.

    rows_key ``(B, H, S_rows)``, cols_key ``(B, H, S_cols)`` (K/V side already expanded to query heads) are sorted
    (bucket, position) keys. ``from_keys``: rows are keys and columns queries (the dK/dV pass), so "visible" means
    query position >= key position. O(blocks * log S) with searchsorted; no (S x S) work.
    """
    n_rows = rows_key.shape[-1]
    nblk = triton.cdiv(n_rows, rows_block)
    start = torch.arange(nblk, device=rows_key.device) * rows_block                        # (nblk,)
    end = torch.minimum(start + rows_block, rows_len.unsqueeze(-1).long()) - 1             # (B, H, nblk)
    empty = end < start
    first = rows_key.gather(-1, start.expand_as(end).clamp(max=n_rows - 1).contiguous())
    last = rows_key.gather(-1, end.clamp(min=0).contiguous())
    find = lambda v, right=False: torch.searchsorted(cols_key, v.contiguous(), right=right)  # noqa: E731
    n_cols = cols_len.unsqueeze(-1).long()
    zero = torch.zeros_like(first)
    if not hashed and not causal:
        lo, hi, full_lo, full_hi = zero, n_cols.expand_as(first), zero, n_cols.expand_as(first)
    elif not hashed:
        if from_keys:       # queries with position >= the block's first (some visible) / last key (all visible)
            lo, hi, full_lo, full_hi = find(first), n_cols.expand_as(first), find(last), n_cols.expand_as(first)
        else:               # keys with position <= the block's last (some) / first query (all)
            lo, hi, full_lo, full_hi = zero, find(last, True), zero, find(first, True)
    else:
        b_first, b_last = first >> 31, last >> 31
        bucket_start = lambda bk: find(bk << 31)  # noqa: E731
        if from_keys:
            lo = find(first) if causal else bucket_start(b_first)
            hi = bucket_start(b_last + 1)
            full_lo = find(last) if causal else bucket_start(b_first)
            full_hi = bucket_start(b_first + 1)
        else:
            lo = bucket_start(b_first)
            hi = find(last, True) if causal else bucket_start(b_last + 1)
            full_lo = bucket_start(b_first)
            full_hi = find(first, True) if causal else bucket_start(b_first + 1)
        full_hi = torch.where(b_first == b_last, full_hi, full_lo)       # several buckets: every tile masked
    hi = torch.minimum(hi, n_cols)
    lo = (lo // cols_block) * cols_block
    hi = torch.maximum(hi, lo)
    full_lo = -((-full_lo) // cols_block) * cols_block
    full_hi = (torch.minimum(full_hi, n_cols) // cols_block) * cols_block
    mid_lo = torch.minimum(torch.maximum(full_lo, lo), hi)
    mid_hi = torch.maximum(torch.minimum(full_hi, hi), mid_lo)
    r = torch.stack([lo, mid_lo, mid_hi, hi], -1)
    return r.masked_fill(empty.unsqueeze(-1), 0).to(torch.int32).contiguous()              # (B, H, nblk, 4)


@triton.jit
def _sort_key(Pos, Bkt, idx, mask, HASH: tl.constexpr):
    # The int64 (bucket, position) key of _sort_keys, built on the fly from the int32 side tensors.
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
        key = _sort_key(Pos, Bkt, mid, active, HASH)
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
    """The table of ``_tile_ranges`` in one launch: program (i, h, b) fills blocks [i*BLOCK, (i+1)*BLOCK) of query
    head h. The row/column side tensors are indexed by head // ROW_DIV / COL_DIV (GQA: the K/V side serves
    GROUP query heads), so the K/V side is never expanded in memory."""
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
    first = _sort_key(RowPos, RowBkt, tl.minimum(start, S_ROWS - 1), ok, HASH)
    last = _sort_key(RowPos, RowBkt, tl.maximum(end, 0), ok, HASH)
    n_cols = tl.load(ColLen + crow)
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    lo = zero
    hi = zero + n_cols
    full_lo = zero
    full_hi = zero + n_cols
    if HASH:
        b_first = first >> 31
        b_last = last >> 31
        bucket_first = _search(ColPos, ColBkt, S_COLS, STEPS, b_first << 31, False, HASH)
        if FROM_KEYS:       # columns are queries: visible ones come at or after the key (same bucket)
            hi = _search(ColPos, ColBkt, S_COLS, STEPS, (b_last + 1) << 31, False, HASH)
            full_hi = _search(ColPos, ColBkt, S_COLS, STEPS, (b_first + 1) << 31, False, HASH)
            if CAUSAL:
                lo = _search(ColPos, ColBkt, S_COLS, STEPS, first, False, HASH)
                full_lo = _search(ColPos, ColBkt, S_COLS, STEPS, last, False, HASH)
            else:
                lo = bucket_first
                full_lo = bucket_first
        else:               # columns are keys: visible ones come at or before the query (same bucket)
            lo = bucket_first
            full_lo = bucket_first
            if CAUSAL:
                hi = _search(ColPos, ColBkt, S_COLS, STEPS, last, True, HASH)
                full_hi = _search(ColPos, ColBkt, S_COLS, STEPS, first, True, HASH)
            else:
                hi = _search(ColPos, ColBkt, S_COLS, STEPS, (b_last + 1) << 31, False, HASH)
                full_hi = _search(ColPos, ColBkt, S_COLS, STEPS, (b_first + 1) << 31, False, HASH)
        full_hi = tl.where(b_first == b_last, full_hi, full_lo)       # several buckets: every tile masked
    elif CAUSAL:
        if FROM_KEYS:       # queries with position >= the block's first (some visible) / last key (all visible)
            lo = _search(ColPos, ColBkt, S_COLS, STEPS, first, False, HASH)
            full_lo = _search(ColPos, ColBkt, S_COLS, STEPS, last, False, HASH)
        else:               # keys with position <= the block's last (some) / first query (all)
            hi = _search(ColPos, ColBkt, S_COLS, STEPS, last, True, HASH)
            full_hi = _search(ColPos, ColBkt, S_COLS, STEPS, first, True, HASH)
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


def _tile_ranges_triton(sp: SparseMeta, group: int, rows_block: int, cols_block: int, from_keys: bool):
    """``_tile_ranges`` for the launchers: one launch, no sort-key tensors, no GQA expansion (the torch version
    costs ~25 small ops per table; three tables per fwd+bwd)."""
    if from_keys:
        rows, cols, row_div, col_div = (sp.k_pos, sp.k_bkt, sp.k_len), (sp.q_pos, sp.q_bkt, sp.q_len), group, 1
    else:
        rows, cols, row_div, col_div = (sp.q_pos, sp.q_bkt, sp.q_len), (sp.k_pos, sp.k_bkt, sp.k_len), 1, group
    b, h = sp.q_pos.shape[:2]
    s_rows, s_cols = rows[0].shape[-1], cols[0].shape[-1]
    nblk = triton.cdiv(s_rows, rows_block)
    ranges = torch.empty(b, h, nblk, 4, dtype=torch.int32, device=sp.q_pos.device)
    block = min(128, triton.next_power_of_2(nblk))
    hashed = sp.q_bkt is not None
    _tile_ranges_kernel[(triton.cdiv(nblk, block), h, b)](
        rows[0], rows[1] if hashed else rows[0], rows[2], cols[0], cols[1] if hashed else cols[0], cols[2], ranges,
        h, nblk, s_rows, s_cols, s_cols.bit_length(), row_div, col_div, ROWS_BLOCK=rows_block,
        COLS_BLOCK=cols_block, BLOCK=block, CAUSAL=sp.causal, HASH=hashed, FROM_KEYS=from_keys, num_warps=4)
    return ranges


def _sparse_args(sp: Optional[SparseMeta], group: int, block_q: int, block_k: int, fwd: bool):
    """Kernel pointer args (QPos, KPos, QBkt, KBkt, QLen, KLen, Ranges) and constexprs for one launch."""
    if sp is None:
        return (None,) * 7, dict(SPARSE=False, SP_CAUSAL=False, HASH=False)
    if fwd:
        ranges = _tile_ranges_triton(sp, group, block_q, block_k, from_keys=False)
    else:
        ranges = _tile_ranges_triton(sp, group, block_k, block_q, from_keys=True)
    ptrs = (sp.q_pos, sp.k_pos, sp.q_bkt, sp.k_bkt, sp.q_len, sp.k_len, ranges)
    return ptrs, dict(SPARSE=True, SP_CAUSAL=sp.causal, HASH=sp.q_bkt is not None)


def _fwd_triton(q, k, v, softmax_scale, lower, upper, softcap, sparse=None, config=None, out_dtype=None):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    cfg = dict(config or _fwd_config(d, q.dtype, q.device))
    lo_off, up_off, has_lo, has_up = _band_args(lower, upper)
    qk_scale, cap_log2 = _scale_args(softmax_scale, softcap)
    sp_ptrs, sp_flags = _sparse_args(sparse, h // hk, cfg["BLOCK_M"], cfg["BLOCK_N"], fwd=True)
    grid = (triton.cdiv(sq, cfg["BLOCK_M"]), h, b)
    _attn_fwd[grid](q, k, v, out, lse, *sp_ptrs,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                    h, sq, sk, lo_off, up_off, qk_scale, cap_log2,
                    GROUP=h // hk, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                    HAS_LOWER=has_lo, HAS_UPPER=has_up, HAS_SOFTCAP=softcap > 0, PRECISION=_precision(q.dtype),
                    **sp_flags, **cfg)
    return out, lse


def _bwd_triton(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse=None, grad_dtype=None,
                sparse=None, config=None):
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(d))
    delta = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    _bwd_preprocess[(triton.cdiv(sq, 64), h, b)](out, do, dlse if dlse is not None else delta, delta,
                                                 out.stride(0), out.stride(1), out.stride(2),
                                                 do.stride(0), do.stride(1), do.stride(2), h, sq,
                                                 HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64, HAS_DLSE=dlse is not None)
    dq, dk, dv = (torch.empty(t.shape, dtype=grad_dtype or t.dtype, device=t.device) for t in (q, k, v))
    cfg = dict(config or _bwd_config(d, q.dtype, q.device))
    lo_off, up_off, has_lo, has_up = _band_args(lower, upper)
    qk_scale, cap_log2 = _scale_args(softmax_scale, softcap)
    common = dict(GROUP=h // hk, HEAD_DIM=d, BLOCK_D=block_d, HAS_LOWER=has_lo, HAS_UPPER=has_up,
                  HAS_SOFTCAP=softcap > 0, PRECISION=_precision(q.dtype), **cfg)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    scalars = (h, sq, sk, lo_off, up_off, qk_scale, cap_log2, softmax_scale)
    sp_ptrs, sp_flags = _sparse_args(sparse, h // hk, cfg["BLOCK_M"], cfg["BLOCK_N"], fwd=False)
    _bwd_dkdv[(triton.cdiv(sk, cfg["BLOCK_N"]), hk, b)](
        q, k, v, do, lse, delta, dk, dv, *sp_ptrs, *strides, dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2), *scalars, **sp_flags, **common)
    sp_ptrs, sp_flags = _sparse_args(sparse, h // hk, cfg["BLOCK_M"], cfg["BLOCK_N"], fwd=True)
    _bwd_dq[(triton.cdiv(sq, cfg["BLOCK_M"]), h, b)](
        q, k, v, do, lse, delta, dq, *sp_ptrs, *strides, dq.stride(0), dq.stride(1), dq.stride(2), *scalars,
        **sp_flags, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------- dispatch
def _on_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or CPU_BACKEND == "triton"


def flash_fwd(q, k, v, softmax_scale: float, lower: Optional[int] = None, upper: Optional[int] = None,
              softcap: float = 0.0, sparse: Optional[SparseMeta] = None,
              out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward on validated tensors. Returns ``(out, lse)``; lse ``(B, H, Sq)`` fp32 in natural-log units.
    ``sparse``: dynamic sparse mode on compacted/sorted tokens (then lower/upper must be None).
    ``out_dtype`` (default q's): callers that merge partial outputs (ring attention) take them in float32."""
    if _on_triton(q):
        return _fwd_triton(q, k, v, softmax_scale, lower, upper, softcap, sparse, out_dtype=out_dtype)
    return reference.chunked_fwd(q, k, v, softmax_scale, lower, upper, softcap, tile_mask=_cpu_tile_mask(sparse),
                                 out_dtype=out_dtype)


def flash_bwd(do, q, k, v, out, lse, softmax_scale: float, lower: Optional[int] = None,
              upper: Optional[int] = None, softcap: float = 0.0, dlse: Optional[torch.Tensor] = None,
              grad_dtype: Optional[torch.dtype] = None, sparse: Optional[SparseMeta] = None):
    """Backward on validated tensors: ``(dq, dk, dv)`` in the input dtypes. ``lse`` may be a *global* LSE (ring
    attention): P is recomputed as exp(s - lse) and delta from the given ``out``, so a block's gradients come out
    as its share of the full-sequence gradients. ``dlse`` (optional, ``(B, H, Sq)``) is a gradient on the LSE.
    ``grad_dtype`` (default: the inputs' dtype) lets callers that accumulate partial gradients (ring attention)
    receive them in float32."""
    if _on_triton(q):
        return _bwd_triton(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse, grad_dtype, sparse)
    return reference.chunked_bwd(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse=dlse,
                                 out_dtype=grad_dtype, tile_mask=_cpu_tile_mask(sparse))


def _cpu_tile_mask(sp: Optional[SparseMeta]):
    """The sparse visibility rule as a per-tile bool mask ``(B, Hk, G, mc, nc)`` for the chunked PyTorch path."""
    if sp is None:
        return None
    b, h, _ = sp.q_pos.shape
    hk = sp.k_pos.shape[1]
    qpos = sp.q_pos.reshape(b, hk, h // hk, -1)
    kpos = sp.k_pos.unsqueeze(2)
    qlen = sp.q_len.reshape(b, hk, h // hk, 1, 1)
    klen = sp.k_len.reshape(b, hk, 1, 1, 1)
    qbkt = sp.q_bkt.reshape(b, hk, h // hk, -1) if sp.q_bkt is not None else None
    kbkt = sp.k_bkt.unsqueeze(2) if sp.k_bkt is not None else None

    def mask(m0, m1, n0, n1):
        i = torch.arange(m0, m1, device=qpos.device).view(1, 1, 1, -1, 1)
        j = torch.arange(n0, n1, device=qpos.device).view(1, 1, 1, 1, -1)
        keep = (i < qlen) & (j < klen)              # padding rows see nothing: their P is 0 in the backward
        if sp.causal:
            keep = keep & (kpos[..., n0:n1].unsqueeze(-2) <= qpos[..., m0:m1].unsqueeze(-1))
        if qbkt is not None:
            keep = keep & (kbkt[..., n0:n1].unsqueeze(-2) == qbkt[..., m0:m1].unsqueeze(-1))
        return keep
    return mask


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
