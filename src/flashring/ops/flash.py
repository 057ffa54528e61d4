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
from typing import Optional, Tuple

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
def _scores(a, b, qi, kj, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
            MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            PRECISION: tl.constexpr):
    """Scores of one tile in log2 units: dot(a, b), scaled (and soft-capped), band-masked when MASK.

    ``qi``/``kj`` are query/key indices already broadcast to the tile's orientation, so the forward (rows=queries)
    and the dK/dV pass (rows=keys) share this helper. Returns ``(s, t)`` where ``t = tanh(.)`` is kept for the
    softcap backward (``t = s`` when there is no softcap).
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
        keep = kj < SEQLEN_K
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
def _attn_fwd_inner(acc, l_i, m_i, q, K_ptrs, V_ptrs, stride_kn, stride_vn, offs_m, offs_n, d_ok,
                    lo, hi, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                    BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kj = start_n + offs_n
        koff = start_n.to(tl.int64) * stride_kn
        voff = start_n.to(tl.int64) * stride_vn
        if MASK:
            k = tl.load(K_ptrs + koff, mask=d_ok[:, None] & (kj[None, :] < SEQLEN_K), other=0.0)
        else:
            k = tl.load(K_ptrs + koff, mask=d_ok[:, None], other=0.0)
        s, _t = _scores(q, k, offs_m[:, None], kj[None, :], SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                        MASK, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose keys so far are all masked keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASK:
            v = tl.load(V_ptrs + voff, mask=(kj[:, None] < SEQLEN_K) & d_ok[None, :], other=0.0)
        else:
            v = tl.load(V_ptrs + voff, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = _mma(p.to(v.dtype), v, acc, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              stride_ob, stride_om, stride_oh,
              NHEADS, SEQLEN_Q, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < SEQLEN_Q

    b64 = b.to(tl.int64)
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
    lo, mid_lo, mid_hi, hi = _band_range(start_m, BLOCK_M, BLOCK_N, SEQLEN_K, LOWER, UPPER, HAS_LOWER, HAS_UPPER)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_ptrs, V_ptrs, stride_kn, stride_vn, offs_m, offs_n, d_ok,
                                    lo, mid_lo, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                                    BLOCK_N, True, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_ptrs, V_ptrs, stride_kn, stride_vn, offs_m, offs_n, d_ok,
                                    mid_lo, mid_hi, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                                    BLOCK_N, False, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_ptrs, V_ptrs, stride_kn, stride_vn, offs_m, offs_n, d_ok,
                                    mid_hi, hi, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                                    BLOCK_N, True, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, PRECISION)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, _EMPTY_LSE, (m_i + tl.log2(l_safe)) * _LN2)
    tl.store(Lse + (b64 * NHEADS + h) * SEQLEN_Q + offs_m, lse, mask=m_ok)
    out = acc / l_safe[:, None]
    Out += b64 * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(Out + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


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
def _bwd_dkdv_inner(dk, dv, k, v, Q_ptrs, DO_ptrs, Lse_ptr, Delta_ptr, stride_qm, stride_dom, offs_m, offs_n,
                    d_ok, lo, hi, SEQLEN_Q, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                    BLOCK_M: tl.constexpr, MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        qi = start_m + offs_m
        if MASK:
            m_ok = qi < SEQLEN_Q
        else:
            m_ok = qi >= 0
        qT = tl.load(Q_ptrs + start_m.to(tl.int64) * stride_qm, mask=d_ok[:, None] & m_ok[None, :], other=0.0)
        # Rows past seqlen_q read LSE = +inf, so their P is exactly 0 and they add nothing to dK/dV.
        lse2 = tl.load(Lse_ptr + qi, mask=m_ok, other=float("inf")) * _LOG2E
        sT, tT = _scores(k, qT, qi[None, :], offs_n[:, None], SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                         MASK, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, PRECISION)       # (BLOCK_N, BLOCK_M)
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
def _bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV,
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
              PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < SEQLEN_K
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query rows that see this key block: the band seen from the key side is (-UPPER, -LOWER).
    lo, mid_lo, mid_hi, hi = _band_range(start_n, BLOCK_N, BLOCK_M, SEQLEN_Q, -UPPER, -LOWER, HAS_UPPER, HAS_LOWER)
    for g in range(GROUP):                       # GQA: the query heads sharing this K/V head, summed in registers
        h = hk * GROUP + g
        Q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[None, :] * stride_qm + offs_d[:, None]
        DO_ptrs = DO + b * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :]
        Lse_ptr = Lse + (b * NHEADS + h) * SEQLEN_Q
        Delta_ptr = Delta + (b * NHEADS + h) * SEQLEN_Q
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_ptrs, DO_ptrs, Lse_ptr, Delta_ptr, stride_qm, stride_dom,
                                 offs_m, offs_n, d_ok, lo, mid_lo, SEQLEN_Q, SEQLEN_K, LOWER, UPPER, QK_SCALE,
                                 CAP_LOG2, BLOCK_M, True, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_ptrs, DO_ptrs, Lse_ptr, Delta_ptr, stride_qm, stride_dom,
                                 offs_m, offs_n, d_ok, mid_lo, mid_hi, SEQLEN_Q, SEQLEN_K, LOWER, UPPER, QK_SCALE,
                                 CAP_LOG2, BLOCK_M, False, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_ptrs, DO_ptrs, Lse_ptr, Delta_ptr, stride_qm, stride_dom,
                                 offs_m, offs_n, d_ok, mid_hi, hi, SEQLEN_Q, SEQLEN_K, LOWER, UPPER, QK_SCALE,
                                 CAP_LOG2, BLOCK_M, True, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, PRECISION)
    dk = dk * SM_SCALE
    tl.store(DK + b * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K_ptrs, V_ptrs, stride_kn, stride_vn, offs_m, offs_n, d_ok, lo, hi,
                  SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kj = start_n + offs_n
        if MASK:
            n_ok = kj < SEQLEN_K
        else:
            n_ok = kj >= 0
        kT = tl.load(K_ptrs + start_n.to(tl.int64) * stride_kn, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        vT = tl.load(V_ptrs + start_n.to(tl.int64) * stride_vn, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s, t = _scores(q, kT, offs_m[:, None], kj[None, :], SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2,
                       MASK, HAS_LOWER, HAS_UPPER, HAS_SOFTCAP, PRECISION)
        p = tl.exp2(s - lse2[:, None])
        dp = _mma(do, vT, None, PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, PRECISION)
    return dq


@triton.jit
def _bwd_dq(Q, K, V, DO, Lse, Delta, DQ,
            stride_qb, stride_qm, stride_qh,
            stride_kb, stride_kn, stride_kh,
            stride_vb, stride_vn, stride_vh,
            stride_dob, stride_dom, stride_doh,
            stride_dqb, stride_dqm, stride_dqh,
            NHEADS, SEQLEN_Q, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2, SM_SCALE,
            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < SEQLEN_Q
    qd_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom
                 + offs_d[None, :], mask=qd_mask, other=0.0)
    row = (b * NHEADS + h) * SEQLEN_Q + offs_m
    lse2 = tl.load(Lse + row, mask=m_ok, other=float("inf")) * _LOG2E
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)
    K_ptrs = K + b * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    V_ptrs = V + b * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, mid_lo, mid_hi, hi = _band_range(start_m, BLOCK_M, BLOCK_N, SEQLEN_K, LOWER, UPPER, HAS_LOWER, HAS_UPPER)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_ptrs, V_ptrs, stride_kn, stride_vn, offs_m, offs_n, d_ok, lo,
                       mid_lo, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2, BLOCK_N, True, HAS_LOWER, HAS_UPPER,
                       HAS_SOFTCAP, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_ptrs, V_ptrs, stride_kn, stride_vn, offs_m, offs_n, d_ok, mid_lo,
                       mid_hi, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2, BLOCK_N, False, HAS_LOWER, HAS_UPPER,
                       HAS_SOFTCAP, PRECISION)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_ptrs, V_ptrs, stride_kn, stride_vn, offs_m, offs_n, d_ok, mid_hi,
                       hi, SEQLEN_K, LOWER, UPPER, QK_SCALE, CAP_LOG2, BLOCK_N, True, HAS_LOWER, HAS_UPPER,
                       HAS_SOFTCAP, PRECISION)
    dq = dq * SM_SCALE
    tl.store(DQ + b * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ---------------------------------------------------------------------------------------------------- launchers
def _fwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        # Interpreter: tile shapes only matter for coverage; unequal M/N tiles exercise both band loops' edges.
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim <= 128:
        # H100, bf16, N=8k causal (benchmarks/gpu_session.py --tune): 128x128/8 warps/3 stages 458 TFLOP/s,
        # 128x64/8/3 436, 128x64/4/3 168 (spills).
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def _bwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
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


def _fwd_triton(q, k, v, softmax_scale, lower, upper, softcap, config=None):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    cfg = dict(config or _fwd_config(d, q.dtype, q.device))
    lo_off, up_off, has_lo, has_up = _band_args(lower, upper)
    qk_scale, cap_log2 = _scale_args(softmax_scale, softcap)
    grid = (triton.cdiv(sq, cfg["BLOCK_M"]), h, b)
    _attn_fwd[grid](q, k, v, out, lse,
                    q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                    h, sq, sk, lo_off, up_off, qk_scale, cap_log2,
                    GROUP=h // hk, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                    HAS_LOWER=has_lo, HAS_UPPER=has_up, HAS_SOFTCAP=softcap > 0, PRECISION=_precision(q.dtype),
                    **cfg)
    return out, lse


def _bwd_triton(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse=None, grad_dtype=None,
                config=None):
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
    _bwd_dkdv[(triton.cdiv(sk, cfg["BLOCK_N"]), hk, b)](
        q, k, v, do, lse, delta, dk, dv, *strides, dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2), *scalars, **common)
    _bwd_dq[(triton.cdiv(sq, cfg["BLOCK_M"]), h, b)](
        q, k, v, do, lse, delta, dq, *strides, dq.stride(0), dq.stride(1), dq.stride(2), *scalars, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------- dispatch
def _on_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or CPU_BACKEND == "triton"


def flash_fwd(q, k, v, softmax_scale: float, lower: Optional[int] = None, upper: Optional[int] = None,
              softcap: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward on validated tensors. Returns ``(out, lse)``; lse ``(B, H, Sq)`` fp32 in natural-log units."""
    if _on_triton(q):
        return _fwd_triton(q, k, v, softmax_scale, lower, upper, softcap)
    return reference.chunked_fwd(q, k, v, softmax_scale, lower, upper, softcap)


def flash_bwd(do, q, k, v, out, lse, softmax_scale: float, lower: Optional[int] = None,
              upper: Optional[int] = None, softcap: float = 0.0, dlse: Optional[torch.Tensor] = None,
              grad_dtype: Optional[torch.dtype] = None):
    """Backward on validated tensors: ``(dq, dk, dv)`` in the input dtypes. ``lse`` may be a *global* LSE (ring
    attention): P is recomputed as exp(s - lse) and delta from the given ``out``, so a block's gradients come out
    as its share of the full-sequence gradients. ``dlse`` (optional, ``(B, H, Sq)``) is a gradient on the LSE.
    ``grad_dtype`` (default: the inputs' dtype) lets callers that accumulate partial gradients (ring attention)
    receive them in float32."""
    if _on_triton(q):
        return _bwd_triton(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse, grad_dtype)
    return reference.chunked_bwd(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse=dlse,
                                 out_dtype=grad_dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
