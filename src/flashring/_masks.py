"""Visibility rule shared by every path (kernels, CPU path, reference).

Query row ``i`` may attend key column ``j`` iff ``i + lower <= j <= i + upper``; ``None`` means unbounded.
The public ``causal`` / ``window_size`` arguments are converted here once, so kernels and references agree.

flash-attn convention (>= 2.1): causal is aligned to the *bottom-right* corner when ``seqlen_q != seqlen_k``,
i.e. the last query sees the last key. For seqlen_q=2, seqlen_k=5 (1 = visible)::

    causal=True           window_size=(1, 0)
    1 1 1 1 0             0 0 1 1 0
    1 1 1 1 1             0 0 0 1 1

torch SDPA's ``is_causal`` is *top-left* aligned instead (query i sees keys 0..i); ``sdpa_bounds`` gives that.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Bounds = Tuple[Optional[int], Optional[int]]


def flash_bounds(seqlen_q: int, seqlen_k: int, causal: bool, window_size: Tuple[int, int]) -> Bounds:
    """(lower, upper) diagonal offsets for flash-attn's ``causal`` + ``window_size`` (bottom-right aligned)."""
    left, right = window_size
    if causal:
        right = 0
    shift = seqlen_k - seqlen_q
    lower = None if left < 0 else shift - left
    upper = None if right < 0 else shift + right
    return lower, upper


def sdpa_bounds(is_causal: bool) -> Bounds:
    """torch SDPA's top-left causal rule: j <= i."""
    return (None, 0) if is_causal else (None, None)


def visible_mask(seqlen_q: int, seqlen_k: int, lower: Optional[int], upper: Optional[int],
                 device=None) -> torch.Tensor:
    """Dense bool mask (seqlen_q, seqlen_k); only the reference and tests build it (O(N^2))."""
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    m = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if lower is not None:
        m &= j >= i + lower
    if upper is not None:
        m &= j <= i + upper
    return m


def key_range(q_start: int, q_end: int, seqlen_k: int, lower: Optional[int], upper: Optional[int]) -> Tuple[int, int]:
    """Half-open key range [lo, hi) that rows [q_start, q_end) can see at all (block skipping on the CPU path)."""
    lo = 0 if lower is None else max(0, q_start + lower)
    hi = seqlen_k if upper is None else min(seqlen_k, q_end - 1 + upper + 1)
    return lo, max(lo, hi)

# LSE reported for a query row that sees no key at all (causal/window with seqlen_q > seqlen_k, or fully dropped
# sparse rows). Its output is 0. log(0) = -inf would poison LSE merges with inf - inf = NaN; -1e30 is finite,
# still the identity of a log-sum-exp merge (exp(-1e30 - x) == 0 in fp32 for any realistic x), and stays finite
# after the kernels' base-2 rescale (-1e30 * log2(e) = -1.44e30, far above fp32's -3.4e38).
EMPTY_ROW_LSE = -1.0e30
