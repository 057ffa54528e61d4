"""Visibility rules shared by every path (kernels, CPU path, reference, benchmarks).

Dense band: query row ``i`` may attend key column ``j`` iff ``i + lower <= j <= i + upper``; ``None`` means
unbounded. The public ``causal`` / ``window_size`` arguments are converted here once, so kernels and references agree.

flash-attn convention (>= 2.1): causal is aligned to the *bottom-right* corner when ``seqlen_q != seqlen_k``,
i.e. the last query sees the last key. For seqlen_q=2, seqlen_k=5 (1 = visible)::

    causal=True           window_size=(1, 0)
    1 1 1 1 0             0 0 1 1 0
    1 1 1 1 1             0 0 0 1 1

torch SDPA's ``is_causal`` is *top-left* aligned instead (query i sees keys 0..i); ``sdpa_bounds`` gives that.

Dynamic sparse attention adds one data-dependent predicate, :func:`sparse_visible`: key j is visible to query i
iff they share a bucket and (when causal) ``pos_j <= pos_i``. QK-sparse is the same rule with the bucket ids of
:func:`keep_ids` (kept tokens share bucket 0; dropped queries and keys get ids no one else has). The Triton kernels
and the tile-range builder are fast paths of this predicate and are tested against it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Bounds = Tuple[Optional[int], Optional[int]]

# LSE reported for a query row that sees no key at all (causal/window with seqlen_q > seqlen_k, or fully dropped
# sparse rows). Its output is 0. log(0) = -inf would poison LSE merges with inf - inf = NaN; -1e30 is finite,
# still the identity of a log-sum-exp merge (exp(-1e30 - x) == 0 in fp32 for any realistic x), and stays finite
# after the kernels' base-2 rescale (-1e30 * log2(e) = -1.44e30, far above fp32's -3.4e38).
EMPTY_ROW_LSE = -1.0e30


def flash_bounds(seqlen_q: int, seqlen_k: int, causal: bool, window_size: Tuple[int, int]) -> Bounds:
    """(lower, upper) diagonal offsets for flash-attn's ``causal`` + ``window_size`` (bottom-right aligned)."""
    lower, upper = window_offsets(causal, window_size)
    shift = seqlen_k - seqlen_q
    return (None if lower is None else shift + lower), (None if upper is None else shift + upper)


def window_offsets(causal: bool, window_size: Tuple[int, int]) -> Bounds:
    """(lower, upper) relative to the bottom-right diagonal, before the ``seqlen_k - seqlen_q`` shift: what the
    variable-length kernels take, since the shift differs per sequence there."""
    left, right = window_size
    if causal:
        right = 0
    return (None if left < 0 else -left), (None if right < 0 else right)


def sdpa_bounds(is_causal: bool) -> Bounds:
    """torch SDPA's top-left causal rule: j <= i."""
    return (None, 0) if is_causal else (None, None)


def band_visible(i: torch.Tensor, j: torch.Tensor, lower: Optional[int], upper: Optional[int]) -> torch.Tensor:
    """The band rule on broadcastable index tensors."""
    keep = torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool, device=i.device)
    if lower is not None:
        keep &= j >= i + lower
    if upper is not None:
        keep &= j <= i + upper
    return keep


def visible_mask(seqlen_q: int, seqlen_k: int, lower: Optional[int], upper: Optional[int],
                 device=None) -> torch.Tensor:
    """Dense bool mask (seqlen_q, seqlen_k); only references, tests and small tiles build it."""
    i = torch.arange(seqlen_q, device=device).unsqueeze(1)
    j = torch.arange(seqlen_k, device=device).unsqueeze(0)
    return band_visible(i, j, lower, upper)


def key_range(q_start: int, q_end: int, seqlen_k: int, lower: Optional[int], upper: Optional[int]) -> Tuple[int, int]:
    """Half-open key range [lo, hi) that rows [q_start, q_end) can see at all (block skipping on the CPU path)."""
    lo = 0 if lower is None else max(0, q_start + lower)
    hi = seqlen_k if upper is None else min(seqlen_k, q_end - 1 + upper + 1)
    return lo, max(lo, hi)


def sparse_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, q_bkt: Optional[torch.Tensor],
                   k_bkt: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
    """THE dynamic-sparse rule, on broadcastable tensors: same bucket (when bucketed) and ``k_pos <= q_pos`` (when
    causal). Positions are original sequence positions, queries already shifted for bottom-right alignment.
    Pure elementwise ops, so FlexAttention's mask_mod can call it too."""
    keep = (k_pos <= q_pos) if causal else None
    if q_bkt is not None:
        keep = (q_bkt == k_bkt) if keep is None else keep & (q_bkt == k_bkt)
    if keep is None:
        keep = torch.ones(torch.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=torch.bool, device=q_pos.device)
    return keep


def keep_ids(q_keep: torch.Tensor, k_keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """QK-sparse keep masks as bucket ids for :func:`sparse_visible`: kept tokens 0, dropped queries -1, dropped keys
    -2, so ``q_id == k_id`` iff both are kept."""
    return (torch.where(q_keep, 0, -1), torch.where(k_keep, 0, -2))


def sparse_pair_mask(kind: str, q_side: torch.Tensor, k_side: torch.Tensor, causal: bool,
                     shift: int = 0) -> torch.Tensor:
    """Dense ``(B, H, Sq, Sk)`` visibility of the public sparse front ends' pattern (references and tests only).

    ``q_side`` ``(B, Sq, H)`` / ``k_side`` ``(B, Sk, Hk)``: keep masks (``kind="qk"``) or bucket ids (``"hash"``);
    the K/V side is expanded to the query heads (GQA). ``shift`` = ``seqlen_k - seqlen_q`` for bottom-right causal.
    """
    if kind == "qk":
        q_side, k_side = keep_ids(q_side, k_side)
    elif kind != "hash":
        raise ValueError(f"kind must be 'qk' or 'hash', got {kind!r}")
    group = q_side.shape[2] // k_side.shape[2]
    qb = q_side.transpose(1, 2).unsqueeze(-1)                                           # (B, H, Sq, 1)
    kb = k_side.transpose(1, 2).repeat_interleave(group, 1).unsqueeze(-2)              # (B, H, 1, Sk)
    i = torch.arange(q_side.shape[1], device=q_side.device).view(-1, 1) + shift
    j = torch.arange(k_side.shape[1], device=q_side.device).view(1, -1)
    return sparse_visible(i, j, qb, kb, causal)
