"""Row permutation of a (rows, D) tensor, the gather the sparse front ends do on q, k, v, out and their gradients.

``torch.gather`` with an index expanded to every element reads 8 index bytes per 2-byte element (0.49 ms of a
1.8 ms QK-sparse fwd+bwd at 8k, H100), and ``index_select`` on 64-element rows ran at ~200 GB/s (1.28 ms for the
same call: benchmarks/sparse_gpu_profile.py, 2026-11-23). Here each program copies BLOCK_R whole rows, one index
load per row and contiguous row loads/stores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import Launcher, cdiv, next_power_of_2


@triton.jit
def _permute_rows(X, Y, Rows, n_rows, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """``Y[r] = X[Rows[r]]`` for rows r of this program; X, Y contiguous (rows, D)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    src = tl.load(Rows + r, mask=r_ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = r_ok[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + src[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    tl.store(Y + r.to(tl.int64)[:, None] * D + offs_d[None, :], x, mask=ok)


LAUNCH_PERMUTE_ROWS = Launcher(_permute_rows)   # see ops.launch: host time per launch


def permute_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x.view(-1, D)[rows]`` reshaped to x's shape (x's last dim D, ``rows`` int64 flat row ids)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = rows.numel()
    if n:
        block_r = 64 if x.is_cuda else 16
        LAUNCH_PERMUTE_ROWS[(cdiv(n, block_r),)](x2, y, rows, n, D=d, BLOCK_D=max(16, next_power_of_2(d)),
                                                 BLOCK_R=block_r, num_warps=4)
    return y
