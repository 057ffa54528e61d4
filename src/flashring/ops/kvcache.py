"""KV-cache bookkeeping around the decode kernel: rotary embedding, the in-place append of new keys/values, and the
chunked PyTorch path for CPU tensors. Positions are absolute cache indices (``cache_seqlens[b] + t``)."""
from __future__ import annotations

from typing import Optional

import torch

from ..masks import EMPTY_ROW_LSE
from . import cpu


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
