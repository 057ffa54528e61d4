"""Row permutation of a ``(B, S, H, D)`` tensor per (batch, head), the gather the sparse front ends do on q, k, v,
out and their gradients: ``y[b, s, h] = x[b, perm[b, h, s], h]``.

``torch.gather`` with an index expanded to every element reads 8 index bytes per 2-byte element (0.49 ms of a
1.8 ms QK-sparse fwd+bwd at 8k, H100), and ``index_select`` on 64-element rows ran at ~200 GB/s (1.28 ms for the
same call: benchmarks/sparse_gpu_profile.py, 2026-11-23). Here each program copies BLOCK_R whole rows: one index
load per row (the ``(B, H, S)`` permutation itself, no flat-index tensors built on the host) and contiguous row
loads and stores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launcher, cdiv, next_power_of_2


@triton.jit
def _permute_rows(X, Y, Perm, n_rows, S, H, stride_b, stride_s, stride_h, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """``Y[b, s, h] = X[b, Perm[b, h, s], h]`` for this program's output rows r = (b * S + s) * H + h; X (B, S, H,
    D) with unit stride in D and any others (a model's q / v are views of one projection), Y contiguous, Perm
    contiguous (B, H, S)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_ok = r < n_rows
    h = r % H
    s = (r // H) % S
    b = r // (H * S)
    src = tl.load(Perm + (b * H + h) * S + s, mask=r_ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = r_ok[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + (b * stride_b + src * stride_s + h * stride_h)[:, None] + offs_d[None, :], mask=ok, other=0.0)
    tl.store(Y + r[:, None] * D + offs_d[None, :], x, mask=ok)


LAUNCH_PERMUTE_ROWS = Launcher(_permute_rows)   # see ops.launch: host time per launch


def permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``y[b, s, h] = x[b, perm[b, h, s], h]`` for x ``(B, S, H, D)`` and an integer ``perm`` ``(B, H, S)``."""
    b, s, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    perm = perm.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = b * s * h
    if n:
        block_r = 64 if x.is_cuda else 16
        LAUNCH_PERMUTE_ROWS[(cdiv(n, block_r),)](x, y, perm, n, s, h, x.stride(0), x.stride(1), x.stride(2), D=d,
                                                 BLOCK_D=max(16, next_power_of_2(d)), BLOCK_R=block_r, num_warps=4)
    return y
