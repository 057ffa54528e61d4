"""Attention over a KV cache ("Flash-Decoding"): split-KV programs with GQA packing, paged or contiguous caches.

Decode reads the whole cache for a handful of query rows, so it is bound by memory bandwidth, and the FA2 grid (one
program per (query block, head, batch)) leaves most SMs idle (B=1, 32 heads: 32 programs on 132 SMs) and makes each
query head re-read its KV head. Here:
- GQA packing: the ``G = H / Hk`` query heads sharing a KV head and the ``Sq`` new queries form the rows of one
  tile (row r = query r // G, head r % G), so every K/V byte is read once per program;
- split-KV: each (batch, KV head)'s key range is cut into ``NUM_SPLITS`` tile-aligned chunks processed by separate
  programs; each writes its partial output (fp32) and log-sum-exp, and the program that finishes last (an atomic
  counter per tile) merges them. One launch: on the H100 machine a Triton launch costs ~38 us of host time
  (benchmarks/launch_overhead.py), more than the kernel itself for small caches, so a second combine kernel cost
  more than it computed;
- the cache is contiguous ``(batch_cache, seqlen_cache, Hk, D)`` (row ``cache_batch_idx[b]``) or paged
  ``(num_pages, PAGE, Hk, D)`` through ``block_table[b, j // PAGE]``. Tiles are aligned to absolute positions and
  ``PAGE % BLOCK_N == 0``, so a tile never straddles pages;
- batch b's valid keys are ``[leftpad[b], end[b])``; query i sits at position ``end[b] - Sq + i`` (bottom-right).
  Keys past ``end[b]`` are never loaded (masked loads), so garbage in the unused cache never leaks.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .flash import (EMPTY_LSE_C, LN2_C, NO_KEY_C, mma, next_flagged_key, nonfinite_rows, precision, score_args,
                    softcap_tanh, unit_last)
from .launch import Launcher, cdiv, next_power_of_2, sm_count


@triton.jit
def _decode_fwd(Q, K, V, O, LSE, OP, LSEP, Count, META, BlockTable, CacheIdx, KeyMask, SQ, SCORE, BAND,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, HAS_CACHE_IDX: tl.constexpr,
                HAS_START: tl.constexpr, END_PER_ROW: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, MIXED: tl.constexpr):
    """Program (split, m_block * Hk + hk, b). ``Q``/``O`` = (ptr, sb, ss, sh) of (B, Sq, H, D); ``K``/``V`` =
    (ptr, s_batch_or_page, s_seq, s_head) of the cache; ``META`` = (Start, End, END): the valid key range
    ``[Start[b] or 0, End[b] or END)``, and within it (``HAS_KEY_MASK``) the keys j with ``KeyMask[0][b *
    KeyMask[1] + j] != 0`` (uint8 per cache position: padding between a row's tokens, one byte per key read);
    ``LSE`` = (ptr, sb, sh) of (B, H, Sq); ``OP``/``LSEP`` = fp32 partials (NUM_SPLITS, B, Sq, H, D) /
    (NUM_SPLITS, B, H, Sq) and ``Count`` = int32 zeros, one per (batch, m_block, KV head) tile, used when
    NUM_SPLITS > 1 (:func:`split_counters`, fresh for every launch). ``BAND = (LOWER, UPPER)``: a query at
    position p sees keys ``p + LOWER <= j <= p + UPPER`` (causal: UPPER = 0; window (left, right): -left, right).
    ``MIXED``: rows of one tile may see different keys (several query positions and a band), so a non-finite
    value row must not reach a row that may not see it through its zero weight (as ``flash._fwd_inner``'s masked
    tiles; one-token decode never needs it)."""
    split = tl.program_id(0)
    hk = tl.program_id(1) % (SQ[1] // GROUP)
    m_block = tl.program_id(1) // (SQ[1] // GROUP)
    b = tl.program_id(2)
    sq = SQ[0]
    start = b * 0
    if HAS_START:
        start = tl.load(META[0] + b)
    end = META[2] + b * 0
    if END_PER_ROW:
        end = tl.load(META[1] + b)
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)          # packed (query, head-in-group) rows
    r_ok = rows < sq * GROUP
    qi = rows // GROUP
    h = hk * GROUP + rows % GROUP
    pos = end - sq + qi                                       # each query's absolute cache position
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = Q[0] + b.to(tl.int64) * Q[1] + qi.to(tl.int64) * Q[2] + h.to(tl.int64) * Q[3]
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)

    # This block's key range: [lo, hi) of valid keys its rows can see, then this split's share of its tiles.
    last_q = tl.minimum(m_block * BLOCK_M + BLOCK_M - 1, sq * GROUP - 1) // GROUP
    first_q = (m_block * BLOCK_M) // GROUP
    hi = end
    if HAS_UPPER:
        hi = tl.minimum(end, end - sq + last_q + BAND[1] + 1)
    lo = start
    if HAS_LOWER:
        lo = tl.maximum(start, end - sq + first_q + BAND[0])
    tile0 = lo // BLOCK_N
    n_tiles = tl.maximum(tl.cdiv(hi, BLOCK_N) - tile0, 0)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    t_begin = tile0 + split * per_split
    t_end = tl.minimum(t_begin + per_split, tile0 + n_tiles)

    cache_b = b
    if HAS_CACHE_IDX:
        cache_b = tl.load(CacheIdx + b)
    offs_n = tl.arange(0, BLOCK_N)
    kv_head = hk.to(tl.int64)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bad_i = tl.zeros([BLOCK_M], dtype=tl.int32)
    for t in range(t_begin, t_end):
        j0 = t * BLOCK_N
        if PAGED:
            page = tl.load(BlockTable[0] + b.to(tl.int64) * BlockTable[1] + j0 // PAGE).to(tl.int64)
            k_base = K[0] + page * K[1] + (j0 % PAGE).to(tl.int64) * K[2] + kv_head * K[3]
            v_base = V[0] + page * V[1] + (j0 % PAGE).to(tl.int64) * V[2] + kv_head * V[3]
        else:
            k_base = K[0] + cache_b.to(tl.int64) * K[1] + j0.to(tl.int64) * K[2] + kv_head * K[3]
            v_base = V[0] + cache_b.to(tl.int64) * V[1] + j0.to(tl.int64) * V[2] + kv_head * V[3]
        kj = j0 + offs_n
        # [lo, hi): the keys some row of this block may see. A key outside it is never loaded (a window's first
        # tile starts before lo: loading those with weight 0 would meet a non-finite value there as 0 * NaN).
        n_ok = (kj >= lo) & (kj < hi)
        if HAS_KEY_MASK:    # masked keys are never loaded either: their values cannot reach a row as 0 * NaN
            n_ok = n_ok & (tl.load(KeyMask[0] + b.to(tl.int64) * KeyMask[1] + kj, mask=n_ok, other=0) != 0)
        k = tl.load(k_base + offs_n[None, :] * K[2] + offs_d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                    other=0.0)
        s = mma(q, k, None, PRECISION)
        if HAS_SOFTCAP:
            s = softcap_tanh(s * SCORE[0]) * SCORE[1]
        else:
            s = s * SCORE[0]
        keep = _in_band(n_ok[None, :] & r_ok[:, None], kj=kj[None, :], pos=pos[:, None], BAND=BAND,
                        HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * V[2] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if MIXED:
            row_bad = nonfinite_rows(v)
            v = tl.where(row_bad[:, None], 0.0, v)
            first = tl.min(tl.where(row_bad, kj, NO_KEY_C))             # the first flagged key
            while first < NO_KEY_C:                                    # once per non-finite value row
                sees = _in_band(r_ok & (first >= start) & (first < end), kj=first, pos=pos, BAND=BAND,
                                HAS_LOWER=HAS_LOWER, HAS_UPPER=HAS_UPPER)
                bad_i = bad_i | sees.to(tl.int32)
                first = next_flagged_key(row_bad, kj, first)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, EMPTY_LSE_C, (m_i + tl.log2(l_safe)) * LN2_C)
    out = acc / l_safe[:, None]
    if MIXED:
        out = tl.where(bad_i[:, None] != 0, float("nan"), out)
    if NUM_SPLITS == 1:
        _store_rows(O=O, LSE=LSE, b=b, h=h, qi=qi, out=out, lse=lse, r_ok=r_ok, offs_d=offs_d, d_ok=d_ok)
    else:
        nb = tl.num_programs(2)
        part = (split * nb + b).to(tl.int64)
        tl.store(LSEP + (part * SQ[1] + h) * sq + qi, lse, mask=r_ok)
        o_rows = OP + ((part * sq + qi) * SQ[1] + h) * HEAD_DIM
        tl.store(o_rows[:, None] + offs_d[None, :], out, mask=r_ok[:, None] & d_ok[None, :])
        # Serial split-K: every thread's partial stores happen before the counter's release (barrier + acq_rel
        # atomic); the split that sees NUM_SPLITS - 1 acquires them all and merges (counters are fresh per launch).
        tl.debug_barrier()
        tile = Count + (b * tl.num_programs(1) + tl.program_id(1))
        if tl.atomic_add(tile, 1, sem="acq_rel", scope="gpu") == NUM_SPLITS - 1:
            _merge_splits(O=O, LSE=LSE, OP=OP, LSEP=LSEP, b=b, h=h, qi=qi, sq=sq, nh=SQ[1], nb=nb, r_ok=r_ok,
                          offs_d=offs_d, d_ok=d_ok, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
                          NUM_SPLITS=NUM_SPLITS, BLOCK_S=BLOCK_S)


@triton.jit
def _in_band(keep, kj, pos, BAND, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr):
    """``keep`` and "a query at cache position ``pos`` may see key ``kj``" under the band (shapes broadcast)."""
    if HAS_UPPER:
        keep = keep & (kj <= pos + BAND[1])
    if HAS_LOWER:
        keep = keep & (kj >= pos + BAND[0])
    return keep


@triton.jit
def _store_rows(O, LSE, b, h, qi, out, lse, r_ok, offs_d, d_ok):
    tl.store(LSE[0] + b.to(tl.int64) * LSE[1] + h.to(tl.int64) * LSE[2] + qi, lse, mask=r_ok)
    o_rows = O[0] + b.to(tl.int64) * O[1] + qi.to(tl.int64) * O[2] + h.to(tl.int64) * O[3]
    tl.store(o_rows[:, None] + offs_d[None, :], out.to(O[0].dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits(O, LSE, OP, LSEP, b, h, qi, sq, nh, nb, r_ok, offs_d, d_ok, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """out = sum_s exp(lse_s - lse) o_s with lse = logsumexp_s lse_s, for this tile's rows. The LSEs come in one
    (splits, rows) load, so the weights are known before any partial output is read and the (unrolled) partial
    loads do not wait on each other: a running-max merge made them serial, +7 us at 33 splits (H100). Partials are
    read with .cg (L2, not this SM's L1, which other SMs' writes do not update). Rows no split saw carry
    EMPTY_ROW_LSE in every split: out 0 and that LSE."""
    s_idx = tl.arange(0, BLOCK_S)
    parts = (s_idx * nb + b).to(tl.int64)
    lse_all = tl.load(LSEP + (parts[:, None] * nh + h[None, :]) * sq + qi[None, :],
                      mask=(s_idx < NUM_SPLITS)[:, None] & r_ok[None, :], other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(tl.exp(lse_all - m_safe[None, :]), 0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        part = (s * nb + b).to(tl.int64)
        w = tl.exp(tl.load(LSEP + (part * nh + h) * sq + qi, mask=r_ok, other=float("-inf"),
                           cache_modifier=".cg") - m_safe)
        o_s = tl.load((OP + ((part * sq + qi) * nh + h) * HEAD_DIM)[:, None] + offs_d[None, :],
                      mask=r_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
        acc += o_s * w[:, None]
    empty = m <= EMPTY_LSE_C
    l_safe = tl.where(l_sum == 0.0, 1.0, l_sum)
    lse = tl.where(empty, EMPTY_LSE_C, m_safe + tl.log(l_safe))
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    _store_rows(O=O, LSE=LSE, b=b, h=h, qi=qi, out=out, lse=lse, r_ok=r_ok, offs_d=offs_d, d_ok=d_ok)


LAUNCH_DECODE = Launcher(_decode_fwd)   # see ops.launch: host time per launch


def decode_config(head_dim: int, page: Optional[int], device: torch.device) -> dict:
    """BLOCK_N: 64 keys per tile (D <= 128), 32 at D = 256; a divisor of the page size when paged. The
    interpreter gets small tiles (coverage, not speed)."""
    block_n = 16 if device.type != "cuda" else (64 if head_dim <= 128 else 32)
    if page is not None:
        block_n = min(block_n, page & -page)                  # largest power of two dividing the page size
    return dict(BLOCK_N=block_n, num_warps=4, num_stages=3 if device.type == "cuda" else 1)


MAX_SPLITS = 64      # the merge unrolls over the splits (flash-attn allows 128; at 1 x 16k, 64 already lost to 32)


def choose_splits(batch: int, heads_k: int, m_blocks: int, max_keys: int, block_n: int, device: torch.device,
                  requested: int = 0) -> int:
    """Split count: ``requested`` if > 0 (at most MAX_SPLITS), else about 2 programs per SM, each keeping >= 2 key
    tiles, at most 32 (from the shape and the SM count; no device sync). H100, 32/8 heads, D=128, CUDA-graph device time
    (benchmarks/decode_floor.py --tune, 2026-11-23): 2 programs per SM beat the former 4 at every shape tried
    (16 x 8k: splits 2 -> 177.7 us vs 5 -> 188.4; 1 x 16k: 32 -> 30.2 vs 64 -> 32.8), and B=1 x 1k wants 8 splits
    of 2 tiles (7.4 us vs 4 splits 8.3)."""
    if requested > 0:
        return min(requested, MAX_SPLITS)
    sms = sm_count(device.index or 0) if device.type == "cuda" else 4
    programs = batch * heads_k * m_blocks
    tiles = cdiv(max(max_keys, 1), block_n)
    return max(1, min(32, (2 * sms) // programs, cdiv(tiles, 2)))


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 zeros for the split counters, fresh on every call (one memset launch). A buffer cached across
    calls saves that launch but cannot be made safe: torch.compile's cudagraph trees route every allocation of
    their warm-up thread into their pool and refuse a tensor left alive there (transformers' compiled static-cache
    generate() failed so on the H100, and a side stream does not escape the routing), and a cached buffer baked
    into one captured graph could be replaced and freed by a later eager call."""
    return torch.zeros(n, dtype=torch.int32, device=device)


def attention(q, k_cache, v_cache, start: Optional[torch.Tensor], end, softmax_scale: float,
              lower: Optional[int], upper: Optional[int], softcap: float, block_table: Optional[torch.Tensor] = None,
              cache_batch_idx: Optional[torch.Tensor] = None, num_splits: int = 0, config: Optional[dict] = None,
              key_mask: Optional[torch.Tensor] = None):
    """Triton launch: ``(out, lse)`` of q ``(B, Sq, H, D)`` over each batch's cache keys ``[start[b], end[b])``
    (int32 (B,)) that ``key_mask`` (bool ``(B, capacity)``, optional) keeps; lse ``(B, H, Sq)`` fp32.
    ``lower``/``upper``: the band around each query's position (None = unbounded). ``config``: BLOCK_N /
    num_warps / num_stages instead of :func:`decode_config` (tuning)."""
    q = unit_last(q)
    b, sq, h, d = q.shape
    hk = k_cache.shape[2]
    per_row = isinstance(end, torch.Tensor)
    group = h // hk
    paged = block_table is not None
    page = k_cache.shape[1] if paged else None
    cfg = config or decode_config(d, page, q.device)
    block_m = max(16, min(64, next_power_of_2(sq * group)))
    m_blocks = cdiv(sq * group, block_m)
    capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
    splits = choose_splits(b, hk, m_blocks, capacity, cfg["BLOCK_N"], q.device, num_splits)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    op = lsep = count = None                 # None: constexpr for the launcher, no pointer to check
    if splits > 1:
        op = torch.empty(splits, b, sq, h, d, dtype=torch.float32, device=q.device)
        lsep = torch.empty(splits, b, h, sq, dtype=torch.float32, device=q.device)
        count = split_counters(q.device, b * m_blocks * hk)
    kv = lambda t: (t, t.stride(0), t.stride(1), t.stride(2))  # noqa: E731 - batch-or-page, seq, head strides
    bt = (block_table, block_table.stride(0)) if paged else (None, 0)
    LAUNCH_DECODE[(splits, m_blocks * hk, b)](
        (q, q.stride(0), q.stride(1), q.stride(2)), kv(k_cache), kv(v_cache),
        (out, out.stride(0), out.stride(1), out.stride(2)), (lse, lse.stride(0), lse.stride(1)), op, lsep, count,
        (start, end if per_row else None, 0 if per_row else int(end)), bt, cache_batch_idx,
        (None, 0) if key_mask is None else (key_mask.view(torch.uint8), key_mask.stride(0)), (sq, h),
        score_args(softmax_scale, softcap),
        (0 if lower is None else int(lower), 0 if upper is None else int(upper)), GROUP=group, HEAD_DIM=d,
        BLOCK_D=max(16, next_power_of_2(d)), BLOCK_M=block_m, NUM_SPLITS=splits, HAS_LOWER=lower is not None,
        HAS_UPPER=upper is not None, HAS_SOFTCAP=softcap > 0,
        PAGED=paged, PAGE=page or 1, HAS_CACHE_IDX=cache_batch_idx is not None, HAS_START=start is not None,
        END_PER_ROW=per_row, HAS_KEY_MASK=key_mask is not None, PRECISION=precision(q.dtype),
        BLOCK_S=next_power_of_2(splits),
        MIXED=sq > 1 and (lower is not None or upper is not None), **cfg)
    return out, lse
