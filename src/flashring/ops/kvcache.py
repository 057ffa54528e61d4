"""KV-cache bookkeeping around the decode kernel: rotary embedding, the in-place append of new keys/values, and the
chunked PyTorch path for CPU tensors. Positions are absolute cache indices (``cache_seqlens[b] + t``)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..masks import EMPTY_ROW_LSE
from . import cpu
from .launch import INTERPRET, Launcher, cdiv


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
