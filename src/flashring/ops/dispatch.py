"""The one place that decides where attention runs: CUDA tensors take the Triton kernels; CPU tensors take the
chunked PyTorch path (``CPU_BACKEND = "torch"``) or the Triton kernels under ``TRITON_INTERPRET=1``
(``"triton"``; the default when the interpreter is on, and how the tests check the kernels without a GPU).

``fwd`` / ``bwd`` take validated tensors and the band / sparse / variable-length description; they are what the
custom ops (``flashring.interface``), the sparse front ends and ring attention call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..masks import EMPTY_ROW_LSE
from . import cpu, decode as decode_kernel, flash, hopper, hopper_bwd, kvcache
from .flash import Varlen
from .sparse_ranges import SparseMeta, gather_rows, scatter_rows

CPU_BACKEND = "triton" if flash.INTERPRET else "torch"


def on_triton(x: torch.Tensor) -> bool:
    return x.is_cuda or CPU_BACKEND == "triton"


def _to_slots(sp: SparseMeta, q_side, k_side, lse_side=()):
    """The chunked CPU path works in slot order: (B, S, H, D) tensors gathered through ``sp.q_rows`` / ``k_rows``,
    (B, H, S) LSE rows likewise (the Triton kernels read through the row tables instead)."""
    return ([gather_rows(t, sp.q_rows) for t in q_side] + [gather_rows(t, sp.k_rows) for t in k_side]
            + [None if t is None else gather_rows(t, sp.q_rows) for t in lse_side])


def fwd(q, k, v, softmax_scale: float, lower: Optional[int] = None, upper: Optional[int] = None,
        softcap: float = 0.0, sparse: Optional[SparseMeta] = None, varlen: Optional[Varlen] = None,
        out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``; lse ``(B, H, Sq)`` fp32 natural log (varlen: ``(H, total_q)``). ``sparse``: dynamic sparse
    mode on compacted/sorted tokens (then lower/upper must be None). ``varlen``: q/k/v packed ``(total, H, D)``,
    lower/upper relative to each sequence's bottom-right diagonal. ``out_dtype`` (default q's): callers that merge
    partial outputs (ring attention) take them in float32."""
    if (q.is_cuda and sparse is None and varlen is None and out_dtype in (None, q.dtype)
            and hopper.enabled(q.device, q.shape[-1]) and hopper.applies(q, k, v, lower, upper, softcap)):
        # sm_90 path (ops/hopper.py): upper is None (full), 0 (causal) or -1 (strictly causal)
        return hopper.fwd(q, k, v, softmax_scale, causal=upper is not None, strict=upper == -1)
    if (q.is_cuda and sparse is not None and varlen is None and out_dtype in (None, q.dtype)
            and hopper.sparse_wanted() and hopper.enabled(q.device, q.shape[-1])
            and hopper.sparse_applies(q, k, v, sparse, softcap)):
        return hopper.sparse_fwd(q, k, v, softmax_scale, sparse)
    if on_triton(q):
        return flash.fwd(q, k, v, softmax_scale, lower, upper, softcap, sparse, varlen, out_dtype=out_dtype)
    if varlen is not None:
        return _cpu_varlen(cpu.fwd, varlen, (q, k, v), softmax_scale, lower, upper, softcap, out_dtype=out_dtype)
    if sparse is not None and sparse.q_rows is not None:
        q, k, v = _to_slots(sparse, (q,), (k, v))
        out, lse = fwd(q, k, v, softmax_scale, softcap=softcap, sparse=sparse._replace(q_rows=None, k_rows=None),
                       out_dtype=out_dtype)
        return scatter_rows(out, sparse.q_rows), scatter_rows(lse, sparse.q_rows)
    return cpu.fwd(q, k, v, softmax_scale, lower, upper, softcap, tile_mask=cpu.sparse_tile_mask(sparse),
                   out_dtype=out_dtype)


def bwd(do, q, k, v, out, lse, softmax_scale: float, lower: Optional[int] = None, upper: Optional[int] = None,
        softcap: float = 0.0, dlse: Optional[torch.Tensor] = None, grad_dtype: Optional[torch.dtype] = None,
        sparse: Optional[SparseMeta] = None, varlen: Optional[Varlen] = None, deterministic: bool = True):
    """``(dq, dk, dv)`` in the inputs' dtypes (``grad_dtype`` overrides: ring attention accumulates in fp32).
    ``lse`` may be a *global* LSE (ring attention): P is recomputed as exp(s - lse) and delta from the given
    ``out``, so a block's gradients come out as its share of the full-sequence gradients. ``dlse``: a gradient on
    the LSE. ``deterministic=False`` (flash_attn_func's default) lets the Hopper backward add dQ with
    atomics when ``FLASHRING_HOPPER_BWD=atomic``; every other path is deterministic either way."""
    if (q.is_cuda and sparse is None and varlen is None and grad_dtype in (None, q.dtype)
            and hopper_bwd.enabled(q.device) and hopper_bwd.applies(q, k, v, lower, upper, softcap)):
        return hopper_bwd.bwd(do, q, k, v, out, lse, softmax_scale, causal=upper is not None, dlse=dlse,
                              dq_mode=hopper_bwd.dq_mode(deterministic),       # sm_90 path (ops/hopper_bwd.py)
                              strict=upper == -1)
    if (q.is_cuda and sparse is not None and varlen is None and grad_dtype in (None, q.dtype)
            and hopper_bwd.sparse_wanted() and hopper_bwd.enabled(q.device)
            and hopper.sparse_applies(q, k, v, sparse, softcap)):
        return hopper_bwd.sparse_bwd(do, q, k, v, out, lse, softmax_scale, sparse, dlse=dlse)
    if on_triton(q):
        return flash.bwd(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse, grad_dtype, sparse,
                         varlen)
    if varlen is not None:
        return _cpu_varlen(cpu.bwd, varlen, (do, q, k, v, out, lse, dlse), softmax_scale, lower, upper, softcap,
                           out_dtype=grad_dtype)
    if sparse is not None and sparse.q_rows is not None:
        do, q, out, k, v, lse, dlse = _to_slots(sparse, (do, q, out), (k, v), (lse, dlse))
        dq, dk, dv = bwd(do, q, k, v, out, lse, softmax_scale, softcap=softcap, dlse=dlse, grad_dtype=grad_dtype,
                         sparse=sparse._replace(q_rows=None, k_rows=None))
        return scatter_rows(dq, sparse.q_rows), scatter_rows(dk, sparse.k_rows), scatter_rows(dv, sparse.k_rows)
    return cpu.bwd(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse=dlse, out_dtype=grad_dtype,
                   tile_mask=cpu.sparse_tile_mask(sparse))


def decode(q, k_cache, v_cache, start: Optional[torch.Tensor], end, softmax_scale: float,
           lower: Optional[int], upper: Optional[int], softcap: float, block_table: Optional[torch.Tensor] = None,
           cache_batch_idx: Optional[torch.Tensor] = None, num_splits: int = 0,
           key_mask: Optional[torch.Tensor] = None):
    """``(out, lse)`` of q ``(B, Sq, H, D)`` over each batch row's cache keys ``[start[b], end[b])`` (start None:
    0; end an int32 (B,) tensor or one int for all rows) that ``key_mask`` (bool ``(B, capacity)``) keeps, the
    queries at the last Sq positions; ``lower``/``upper`` the band around a query's position. lse ``(B, H, Sq)``."""
    if on_triton(q):
        return decode_kernel.attention(q, k_cache, v_cache, start, end, softmax_scale, lower, upper, softcap,
                                       block_table, cache_batch_idx, num_splits, key_mask=key_mask)
    return kvcache.cpu_attention(q, k_cache, v_cache, start, end, softmax_scale, lower, upper, softcap, block_table,
                                 cache_batch_idx, key_mask)


def _cpu_varlen(fn, varlen: Varlen, tensors, softmax_scale, lower, upper, softcap, out_dtype):
    """A packed batch on the chunked path: one call per sequence, results written into packed outputs.
    ``tensors``: forward (q, k, v); backward (do, q, k, v, out, lse, dlse), lse / dlse packed ``(H, total_q)``."""
    backward = len(tensors) == 7
    q, k = tensors[1 if backward else 0], tensors[2 if backward else 1]
    if backward:
        results = [torch.zeros(t.shape, dtype=out_dtype or t.dtype) for t in tensors[1:4]]
    else:
        results = [torch.zeros(q.shape, dtype=out_dtype or q.dtype),
                   torch.full((q.shape[1], q.shape[0]), float("nan"), dtype=torch.float32)]
    for qs, ks in cpu.varlen_slices(varlen.cu_q, varlen.cu_k):
        sq, sk = qs.stop - qs.start, ks.stop - ks.start
        lo = None if lower is None else lower + sk - sq          # bottom-right alignment of this sequence
        up = None if upper is None else upper + sk - sq
        if backward:
            do, qq, kk, vv, out, lse, dlse = tensors
            per = [t[qs].unsqueeze(0) for t in (do, qq)] + [t[ks].unsqueeze(0) for t in (kk, vv)] + \
                [out[qs].unsqueeze(0), lse[:, qs].unsqueeze(0)]
            if sq == 0 or sk == 0:
                continue                                          # nothing to attend: gradients stay 0
            dq, dk, dv = fn(*per, softmax_scale, lo, up, softcap,
                            dlse=None if dlse is None else dlse[:, qs].unsqueeze(0), out_dtype=out_dtype)
            results[0][qs], results[1][ks], results[2][ks] = dq[0], dk[0], dv[0]
        else:
            if sq == 0:
                continue
            if sk == 0:
                results[1][:, qs] = EMPTY_ROW_LSE
                continue
            out, lse = fn(q[qs].unsqueeze(0), k[ks].unsqueeze(0), tensors[2][ks].unsqueeze(0), softmax_scale, lo,
                          up, softcap, out_dtype=out_dtype)
            results[0][qs], results[1][:, qs] = out[0], lse[0]
    return tuple(results)

