"""KV-cache bookkeeping around the decode kernel: rotary embedding, the in-place append of new keys/values, and the
chunked PyTorch path for CPU tensors. Positions are absolute cache indices (``cache_seqlens[b] + t``)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..masks import EMPTY_ROW_LSE
from . import cpu
from .launch import INTERPRET, Launcher, cdiv, next_power_of_2


# debug=True turns tl.device_assert on for this kernel alone (the attention kernels stay without checks).
@triton.jit(debug=True)
def _check_indices_kernel(Seqlens, Leftpad, BatchIdx, Table, n_rows, n_table, seqlens_hi, leftpad_hi, rows_hi,
                          pages_hi, HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                          HAS_BATCH_IDX: tl.constexpr, HAS_TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """Every index tensor of one KV-cache call against its bounds: program p checks entries [p * BLOCK, (p + 1) *
    BLOCK) of each (a long paged cache's block table spreads over the GPU instead of streaming through one SM)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_rows
    if HAS_SEQLENS:
        x = tl.load(Seqlens + i, mask=ok, other=0)
        tl.device_assert((x >= 0) & (x < seqlens_hi), "cache_seqlens entries must lie in [0, capacity - new tokens]")
    if HAS_LEFTPAD:
        x = tl.load(Leftpad + i, mask=ok, other=0)
        tl.device_assert((x >= 0) & (x < leftpad_hi), "cache_leftpad entries must lie in [0, capacity]")
    if HAS_BATCH_IDX:
        x = tl.load(BatchIdx + i, mask=ok, other=0)
        tl.device_assert((x >= 0) & (x < rows_hi), "cache_batch_idx entries must lie in [0, k_cache rows)")
    if HAS_TABLE:
        x = tl.load(Table + i, mask=i < n_table, other=0)
        tl.device_assert((x >= 0) & (x < pages_hi), "block_table entries must lie in [0, num_pages)")


CHECK_INDICES = Launcher(_check_indices_kernel)
CHECK_BLOCK = 1024
# The Triton interpreter ignores debug=True (its asserts stay off), so there torch ops check instead; tests switch
# the kernel on with the interpreter's asserts enabled.
CHECK_KERNEL = not INTERPRET


INDEX_NAMES = ("cache_seqlens", "cache_leftpad", "cache_batch_idx", "block_table")     # the kernel's order


def check_indices(n_rows: int, tensors: Dict[str, Tuple[torch.Tensor, int]]) -> None:
    """A device-side assert over one call's contiguous int32 CUDA index tensors, ``tensors``: name (of
    :data:`INDEX_NAMES`) -> (tensor, hi), each entry in ``[0, hi)``; per-row tensors hold ``n_rows`` entries. One
    launch where torch ops took five per tensor (compare, compare, and, all, assert): 56-62 us less host time per
    eager decode step with a tensor ``cache_seqlens`` on the H100 machine (benchmarks/NOTES.md, session 14). Under
    the Triton interpreter (which ignores ``debug=True``) torch's ``_assert_async`` checks instead."""
    if not tensors:
        return
    if not CHECK_KERNEL:
        for t, hi in tensors.values():
            torch._assert_async(((t >= 0) & (t < hi)).all(), "an index tensor is out of range")
        return
    some = next(iter(tensors.values()))[0]
    ts, his = zip(*(tensors.get(name, (some, 0)) for name in INDEX_NAMES))
    table = tensors.get("block_table")
    n_table = 0 if table is None else table[0].numel()
    flags = {f"HAS_{key}": name in tensors for key, name in zip(("SEQLENS", "LEFTPAD", "BATCH_IDX", "TABLE"),
                                                                 INDEX_NAMES)}
    CHECK_INDICES[(max(1, cdiv(max(n_rows, n_table), CHECK_BLOCK)), )](*ts, n_rows, n_table, *his, **flags,
                                                                         BLOCK=CHECK_BLOCK)


@triton.jit
def _rotated(X, offs, d, mask, Cos, Sin, pos, stride_cos, stride_sin, HALF: tl.constexpr,
             INTERLEAVED: tl.constexpr):
    """Rows ``X + offs`` (a [heads, BLOCK_D] tile at dims ``d``) in fp32, the first 2 * HALF dims rotated by the
    tables at position ``pos``: x * cos + sign * partner * sin, where the partner of dim d is d ^ 1 (interleaved
    pairs) or d -+ HALF (GPT-NeoX halves) and the sign is - for a pair's first member. Dims past 2 * HALF read
    cos 1 and sin 0 (unchanged)."""
    x = tl.load(X + offs + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if INTERLEAVED:
        partner = d ^ 1
        i = d // 2
        first = d % 2 == 0
    else:
        first = d < HALF
        partner = tl.where(first, d + HALF, d - HALF)
        i = tl.where(first, d, d - HALF)
    rot = d < 2 * HALF
    xp = tl.load(X + offs + partner[None, :], mask=mask & rot[None, :], other=0.0).to(tl.float32)
    c = tl.load(Cos + pos * stride_cos[0] + i * stride_cos[1], mask=rot, other=1.0).to(tl.float32)
    s = tl.load(Sin + pos * stride_sin[0] + i * stride_sin[1], mask=rot, other=0.0).to(tl.float32)
    s = tl.where(first, -s, s)
    return x * c[None, :] + xp * s[None, :]


@triton.jit
def _append_kernel(K, V, KCache, VCache, Q, QOut, Cos, Sin, Lens, Rows, Table, End,
                   stride_k, stride_v, stride_kc, stride_vc, stride_q, stride_qo, stride_cos, stride_sin,
                   stride_table, seqlen, s_new, sq, heads, heads_k, tokens,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr,
                   HALF: tl.constexpr, HAS_ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
                   Q_PER_TOKEN: tl.constexpr, HAS_LENS: tl.constexpr, HAS_ROWS: tl.constexpr,
                   PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Program b * tokens + t (one grid axis: a batch or a chunk past 65,535 fits): new token t < s_new of batch row
    b written into the caches at position ``lens[b] + t`` (its key rotated when HAS_ROTARY), query token t < sq
    rotated into QOut at ``lens[b] + t`` (Q_PER_TOKEN) or ``lens[b]``, and ``End[b] = lens[b] + s_new`` from
    t = 0 (the decode kernel's key range). Strides are (batch-or-page, token, head) tuples; the head dim and the
    index tensors are contiguous. One launch where the torch path took ~40 (rotations, positions, index_put) on a
    rotary decode step."""
    pid = tl.program_id(0)
    t = pid % tokens
    b = (pid // tokens).to(tl.int64)
    if HAS_LENS:
        lens = tl.load(Lens + b).to(tl.int64)
    else:
        lens = tl.full((), seqlen, tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    if t < s_new:
        pos = lens + t
        if PAGED:
            page = tl.load(Table + b * stride_table + pos // PAGE).to(tl.int64)
            slot = page * stride_kc[0] + (pos % PAGE) * stride_kc[1]
            slot_v = page * stride_vc[0] + (pos % PAGE) * stride_vc[1]
        else:
            if HAS_ROWS:
                row = tl.load(Rows + b).to(tl.int64)
            else:
                row = b
            slot = row * stride_kc[0] + pos * stride_kc[1]
            slot_v = row * stride_vc[0] + pos * stride_vc[1]
        hk = tl.arange(0, BLOCK_HK)
        mask = (hk[:, None] < heads_k) & d_ok[None, :]
        k_row = K + b * stride_k[0] + t * stride_k[1]
        if HAS_ROTARY:
            k = _rotated(X=k_row, offs=hk[:, None] * stride_k[2], d=d, mask=mask, Cos=Cos, Sin=Sin, pos=pos,
                         stride_cos=stride_cos, stride_sin=stride_sin, HALF=HALF, INTERLEAVED=INTERLEAVED)
        else:
            k = tl.load(k_row + hk[:, None] * stride_k[2] + d[None, :], mask=mask)
        tl.store(KCache + slot + hk[:, None] * stride_kc[2] + d[None, :], k.to(KCache.dtype.element_ty), mask=mask)
        v = tl.load(V + b * stride_v[0] + t * stride_v[1] + hk[:, None] * stride_v[2] + d[None, :], mask=mask)
        tl.store(VCache + slot_v + hk[:, None] * stride_vc[2] + d[None, :], v, mask=mask)
    if HAS_ROTARY and t < sq:
        if Q_PER_TOKEN:
            q_pos = lens + t
        else:
            q_pos = lens
        h = tl.arange(0, BLOCK_H)
        mask = (h[:, None] < heads) & d_ok[None, :]
        q = _rotated(X=Q + b * stride_q[0] + t * stride_q[1], offs=h[:, None] * stride_q[2], d=d, mask=mask,
                     Cos=Cos, Sin=Sin, pos=q_pos, stride_cos=stride_cos, stride_sin=stride_sin, HALF=HALF,
                     INTERLEAVED=INTERLEAVED)
        tl.store(QOut + b * stride_qo[0] + t * stride_qo[1] + h[:, None] * stride_qo[2] + d[None, :],
                 q.to(QOut.dtype.element_ty), mask=mask)
    if HAS_LENS:
        if t == 0:
            tl.store(End + b, (lens + s_new).to(tl.int32))


LAUNCH_APPEND = Launcher(_append_kernel)


def append_rotate(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  cos: Optional[torch.Tensor], sin: Optional[torch.Tensor], cache_seqlens: Optional[torch.Tensor],
                  seqlen: int, cache_batch_idx: Optional[torch.Tensor], block_table: Optional[torch.Tensor],
                  interleaved: bool, q_per_token: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The Triton form of :func:`rotate` + :func:`append_` (one launch): writes k/v ``(B, S_new, Hk, D)`` into the
    caches in place at ``cache_seqlens[b]`` (int32 ``(B,)``, or ``seqlen`` for every row) onwards, the keys rotated
    when ``cos`` / ``sin`` are given, and returns q (rotated at ``cache_seqlens[b]`` (+ its token index with
    ``q_per_token``) when the tables are given) and the decode's per-row key end ``cache_seqlens + S_new`` (int32,
    None without ``cache_seqlens``). The index tensors must be contiguous (the kernel indexes them densely)."""
    b, sq, h, d = q.shape
    s_new, hk = k.shape[1], k.shape[2]
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    rotary = cos is not None
    q_out = torch.empty_like(q, memory_format=torch.contiguous_format) if rotary else q
    if rotary and q.stride(-1) != 1:
        q = q.contiguous()
    end = None if cache_seqlens is None else torch.empty(b, dtype=torch.int32, device=q.device)
    paged = block_table is not None
    none2 = (0, 0)
    tokens = max(s_new, sq if rotary else 0)
    LAUNCH_APPEND[(b * tokens, )](
        k, v, k_cache, v_cache, q, q_out, cos, sin, cache_seqlens, cache_batch_idx, block_table, end,
        k.stride()[:3], v.stride()[:3], k_cache.stride()[:3], v_cache.stride()[:3], q.stride()[:3],
        q_out.stride()[:3], cos.stride() if rotary else none2, sin.stride() if rotary else none2,
        block_table.stride(0) if paged else 0, int(seqlen), s_new, sq, h, hk, tokens,
        HEAD_DIM=d, BLOCK_D=next_power_of_2(d), BLOCK_H=next_power_of_2(h), BLOCK_HK=next_power_of_2(hk),
        HALF=cos.shape[1] if rotary else 0, HAS_ROTARY=rotary, INTERLEAVED=interleaved, Q_PER_TOKEN=q_per_token,
        HAS_LENS=cache_seqlens is not None, HAS_ROWS=cache_batch_idx is not None, PAGED=paged,
        PAGE=k_cache.shape[1] if paged else 1, num_warps=4)
    return q_out, end


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
           interleaved: bool) -> torch.Tensor:
    """Rotary embedding of the first ``rotary_dim = 2 * cos.shape[1]`` dims of x ``(B, S, H, D)`` at ``positions``
    ``(B, S)``; interleaved pairs (0, 1), (2, 3)... or GPT-NeoX halves (i, i + rotary_dim / 2). Math in fp32."""
    half = cos.shape[1]
    c = cos.float()[positions].unsqueeze(2)                      # (B, S, 1, rotary_dim / 2)
    s = sin.float()[positions].unsqueeze(2)
    xr = x[..., :2 * half].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * half:]), dim=-1)


def append_(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
            cache_rows: torch.Tensor, block_table: Optional[torch.Tensor]) -> None:
    """Write k/v ``(B, S_new, Hk, D)`` into the caches in place at ``positions`` ``(B, S_new)`` of cache row
    ``cache_rows[b]`` (contiguous) or of the pages ``block_table`` maps them to."""
    if block_table is None:
        rows = cache_rows.long().unsqueeze(1).expand_as(positions)
        k_cache[rows, positions] = k
        v_cache[rows, positions] = v
    else:
        page = k_cache.shape[1]
        pages = block_table.long().gather(1, positions // page)
        k_cache[pages, positions % page] = k
        v_cache[pages, positions % page] = v


def cpu_attention(q, k_cache, v_cache, start: Optional[torch.Tensor], end, softmax_scale: float,
                  lower: Optional[int], upper: Optional[int], softcap: float,
                  block_table: Optional[torch.Tensor] = None, cache_batch_idx: Optional[torch.Tensor] = None,
                  key_mask: Optional[torch.Tensor] = None):
    """The decode kernel's contract on the chunked PyTorch path: one call per batch row over its valid keys (those
    of ``[start, end)`` that ``key_mask`` keeps, positions unchanged)."""
    b, sq, h, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.empty(b, h, sq, dtype=torch.float32)
    starts = start.tolist() if start is not None else [0] * b
    ends = end.tolist() if isinstance(end, torch.Tensor) else [int(end)] * b
    for i, (s0, s1) in enumerate(zip(starts, ends)):
        if block_table is None:
            row = i if cache_batch_idx is None else int(cache_batch_idx[i])
            k, v = k_cache[row, s0:s1], v_cache[row, s0:s1]
        else:
            page = k_cache.shape[1]
            idx = torch.arange(s0, s1)
            pages = block_table[i].long()[idx // page]
            k, v = k_cache[pages, idx % page], v_cache[pages, idx % page]
        sk = s1 - s0
        # bounds around each query's position, re-expressed on this row's key indices [0, sk)
        lo, up = (None if x is None else x + sk - sq for x in (lower, upper))
        if sk <= 0:
            lse[i] = EMPTY_ROW_LSE                          # nothing to attend: out 0, the empty-row LSE
            continue
        keep = None if key_mask is None else key_mask[i, s0:s1]
        o, l = cpu.fwd(q[i:i + 1], k.unsqueeze(0), v.unsqueeze(0), softmax_scale, lo, up, softcap,
                       tile_mask=None if keep is None else (lambda m0, m1, n0, n1, keep=keep: keep[n0:n1]))
        out[i], lse[i] = o[0], l[0]
    return out, lse
