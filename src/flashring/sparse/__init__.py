"""Dynamic sparse flash attention (Pagliardini, Paliotta, Jaggi, Fleuret 2023: "Faster Causal Attention Over Large
Sequences Through Sparse Flash Attention").

Two patterns, both exact attention restricted to a per-head, per-batch-row, data-dependent set of (query, key) pairs,
computed by the dense kernels' sparse mode (``flashring.ops.flash``) with no complexity overhead:

- QK-sparse: queries and keys are *dropped* per head. Kept tokens are compacted (stable order, original positions
  kept as int32), so work shrinks quadratically with the keep rate; causality is decided on original positions and
  key tiles wholly in the causal future of a query tile are never visited.
- Hash-sparse: tokens are bucketed (e.g. by ``lsh_buckets``); query i attends key j only if they share a bucket
  (and j <= i when causal: the diagonal is always visible, so no causal row is empty). Tokens are sorted by
  (bucket, position); only key tiles whose bucket range and positions can match a query tile are visited.

Conventions: dropped queries output zeros (LSE ``EMPTY_ROW_LSE``); a kept query with no visible kept key outputs
zeros with that finite LSE. When seqlen_q != seqlen_k, causal is bottom-right aligned as in ``flash_attn_func``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._masks import EMPTY_ROW_LSE
from ..interface import _attention, _check_qkv, _check_scale
from ..ops.flash import PAD_POS, SparseMeta

__all__ = ["qk_sparse_attn_func", "hash_sparse_attn_func", "sparse_attn_compact_func", "lsh_buckets",
           "lsh_rotations"]


# ------------------------------------------------------------------------------------------------- validation
def _check_side(x, name, like, kind):
    """``x`` must be (batch, seqlen, nheads) matching tensor ``like`` (batch, seqlen, nheads, headdim)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    want = tuple(like.shape[:3])
    if tuple(x.shape) != want:
        raise ValueError(f"{name} must have shape (batch, seqlen, nheads) = {want}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {like.device}")
    if kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got {x.dtype}")
    if kind == "int":
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of bucket ids, got {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= PAD_POS):
            raise ValueError(f"{name} must hold bucket ids in [0, {PAD_POS}), got range "
                             f"[{int(x.min())}, {int(x.max())}]")


def _check_common(q, k, v, causal, softmax_scale):
    _check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return _check_scale(softmax_scale, q.shape[-1])


# ------------------------------------------------------------------------------------------------- gather/scatter
def _gather_rows(x, idx):
    # x (B, S, H, D), idx (B, S', H) -> (B, S', H, D); autograd scatters gradients back.
    return x.gather(1, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def _side(idx, lens, shift=0):
    """(B, S', H) row indices -> (B, H, S') int32 positions, PAD_POS past each head's length."""
    pos = idx.transpose(1, 2) + shift
    valid = torch.arange(idx.shape[1], device=idx.device) < lens.unsqueeze(-1)
    return torch.where(valid, pos, PAD_POS).to(torch.int32).contiguous()


def _compact(keep):
    """Kept tokens first, in position order (stable), per (batch, head)."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)          # (B, S, H)
    lens = keep.sum(1, dtype=torch.int32)                                       # (B, H)
    smax = max(int(lens.max()), 1)                                              # >= 1 row keeps shapes valid
    return order[:, :smax], lens


def _scatter_back(out_c, lse_c, idx, lens, seqlen):
    """Compacted (B, S', H, D) / (B, H, S') back to (B, S, H, D) / (B, H, S): dropped rows get 0 / EMPTY_ROW_LSE."""
    b, sc, h, d = out_c.shape
    valid = (torch.arange(sc, device=idx.device).view(1, -1, 1) < lens.unsqueeze(1))
    src = torch.where(valid, torch.arange(sc, device=idx.device).view(1, -1, 1), sc)
    inv = torch.full((b, seqlen, h), sc, dtype=torch.long, device=idx.device).scatter_(1, idx, src)
    out = _gather_rows(torch.cat([out_c, out_c.new_zeros(b, 1, h, d)], 1), inv)
    lse = torch.cat([lse_c, lse_c.new_full((b, h, 1), EMPTY_ROW_LSE)], -1).gather(-1, inv.transpose(1, 2))
    return out, lse


# ------------------------------------------------------------------------------------------------- public API
def sparse_attn_compact_func(q, k, v, q_idx, k_idx, q_len=None, k_len=None, q_buckets=None, k_buckets=None,
                             causal=True, softmax_scale=None, return_attn_probs=False):
    """Sparse attention on tensors the caller already compacted or sorted.

    Args:
        q: ``(batch, sq_c, nheads, headdim)``; k, v: ``(batch, sk_c, nheads_k, headdim)``: per (batch, head) the
            first ``q_len``/``k_len`` rows are real tokens, the rest padding (ignored, outputs unspecified).
        q_idx, k_idx: ``(batch, s_c, nheads[_k])`` integer original positions of those rows; within the valid
            prefix rows must be sorted by (bucket, position) (QK-sparse: by position).
        q_len, k_len: ``(batch, nheads[_k])`` valid row counts (default: all rows).
        q_buckets, k_buckets: optional bucket ids (hash-sparse), same shape as the indices.
        causal: key j is visible to query i only if ``pos_j <= pos_i`` (plus the bucket rule).
    Returns ``out`` (compacted layout) or ``(out, lse, None)``.
    """
    scale = _check_common(q, k, v, causal, softmax_scale)
    for name, x, like in (("q_idx", q_idx, q), ("k_idx", k_idx, k)):
        _check_side(x, name, like, "int")
    if (q_buckets is None) != (k_buckets is None):
        raise ValueError("q_buckets and k_buckets must be given together (hash-sparse) or both be None")
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    lens = []
    for name, ln, s, nh in (("q_len", q_len, sq, h), ("k_len", k_len, sk, hk)):
        if ln is None:
            ln = torch.full((b, nh), s, dtype=torch.int32, device=q.device)
        elif not isinstance(ln, torch.Tensor) or tuple(ln.shape) != (b, nh):
            raise ValueError(f"{name} must be a tensor of shape (batch, nheads) = {(b, nh)}")
        elif ln.numel() and (int(ln.min()) < 0 or int(ln.max()) > s):
            raise ValueError(f"{name} entries must lie in [0, {s}]")
        lens.append(ln.to(device=q.device, dtype=torch.int32).contiguous())
    q_len, k_len = lens
    q_bkt = k_bkt = None
    if q_buckets is not None:
        _check_side(q_buckets, "q_buckets", q, "int")
        _check_side(k_buckets, "k_buckets", k, "int")
        q_bkt, k_bkt = _side(q_buckets, q_len), _side(k_buckets, k_len)
    q_pos, k_pos = _side(q_idx, q_len), _side(k_idx, k_len)
    for name, pos, bkt in (("q_idx", q_pos, q_bkt), ("k_idx", k_pos, k_bkt)):
        key = pos.long() + (bkt.long() << 31 if bkt is not None else 0)
        if bool((key[..., 1:] < key[..., :-1]).any()):
            raise ValueError(f"{name}: valid rows must be sorted by (bucket, position) within each (batch, head)")
    meta = SparseMeta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, causal)
    out, lse = _attention(q, k, v, scale, None, None, 0.0, meta)
    return (out, lse, None) if return_attn_probs else out


def qk_sparse_attn_func(q, k, v, q_keep, k_keep, causal=True, softmax_scale=None, return_attn_probs=False):
    """Attention over the kept queries and keys only (per batch row and head).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads_k, headdim)`` (GQA allowed).
        q_keep: bool ``(batch, seqlen_q, nheads)``; k_keep: bool ``(batch, seqlen_k, nheads_k)``.
        causal: decided on original positions (bottom-right aligned if seqlen_q != seqlen_k).
    Dropped queries output 0; a kept query with no visible kept key outputs 0 (finite LSE).
    """
    scale = _check_common(q, k, v, causal, softmax_scale)
    _check_side(q_keep, "q_keep", q, "bool")
    _check_side(k_keep, "k_keep", k, "bool")
    sq, sk = q.shape[1], k.shape[1]
    q_idx, q_len = _compact(q_keep)
    k_idx, k_len = _compact(k_keep)
    meta = SparseMeta(_side(q_idx, q_len, shift=sk - sq if causal else 0), _side(k_idx, k_len), q_len, k_len,
                      None, None, causal)
    out_c, lse_c = _attention(_gather_rows(q, q_idx), _gather_rows(k, k_idx), _gather_rows(v, k_idx), scale,
                              None, None, 0.0, meta)
    out, lse = _scatter_back(out_c, lse_c, q_idx, q_len, sq)
    return (out, lse, None) if return_attn_probs else out


def hash_sparse_attn_func(q, k, v, q_buckets, k_buckets, causal=True, softmax_scale=None, return_attn_probs=False):
    """Attention restricted to (query, key) pairs in the same bucket (and j <= i when causal).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads_k, headdim)``.
        q_buckets ``(batch, seqlen_q, nheads)``, k_buckets ``(batch, seqlen_k, nheads_k)``: integer ids >= 0.
    Causal: query i always sees key i's bucket-mate... only if they share a bucket; with q and k bucketed by
    the same hash of the same token (self-attention) the diagonal shares a bucket, so no causal row is empty.
    """
    scale = _check_common(q, k, v, causal, softmax_scale)
    _check_side(q_buckets, "q_buckets", q, "int")
    _check_side(k_buckets, "k_buckets", k, "int")
    b, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    q_idx = torch.argsort(q_buckets, dim=1, stable=True)                     # (bucket, position) order
    k_idx = torch.argsort(k_buckets, dim=1, stable=True)
    q_len = torch.full((b, h), sq, dtype=torch.int32, device=q.device)
    k_len = torch.full((b, hk), sk, dtype=torch.int32, device=q.device)
    meta = SparseMeta(_side(q_idx, q_len, shift=sk - sq if causal else 0), _side(k_idx, k_len), q_len, k_len,
                      _side(q_buckets.gather(1, q_idx), q_len), _side(k_buckets.gather(1, k_idx), k_len), causal)
    out_c, lse_c = _attention(_gather_rows(q, q_idx), _gather_rows(k, k_idx), _gather_rows(v, k_idx), scale,
                              None, None, 0.0, meta)
    out, lse = _scatter_back(out_c, lse_c, q_idx, q_len, sq)
    return (out, lse, None) if return_attn_probs else out


# ------------------------------------------------------------------------------------------------- LSH
def lsh_rotations(nheads: int, headdim: int, n_buckets: int, generator: Optional[torch.Generator] = None,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """Random Gaussian projections ``(nheads, headdim, n_buckets // 2)`` for angular LSH, drawn on the CPU from
    ``generator`` so a seed gives the same buckets on every device."""
    if not isinstance(n_buckets, int) or n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be an even int >= 2, got {n_buckets!r}")
    r = torch.randn(nheads, headdim, n_buckets // 2, generator=generator, dtype=torch.float32)
    return r.to(device=device, dtype=dtype)


def lsh_buckets(x, n_buckets: int, rotations: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Angular LSH per head: bucket = argmax over ``[xR, -xR]`` (Andoni et al. 2015, as in Reformer).

    x ``(batch, seqlen, nheads, headdim)`` -> int64 buckets ``(batch, seqlen, nheads)`` in ``[0, n_buckets)``.
    Pass the same ``rotations`` (or a generator seeded the same) for queries and keys so they share buckets.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("x must be a (batch, seqlen, nheads, headdim) tensor")
    if rotations is None:
        rotations = lsh_rotations(x.shape[2], x.shape[3], n_buckets, generator, device=x.device)
    elif tuple(rotations.shape) != (x.shape[2], x.shape[3], n_buckets // 2):
        raise ValueError(f"rotations must have shape (nheads, headdim, n_buckets // 2) = "
                         f"{(x.shape[2], x.shape[3], n_buckets // 2)}, got {tuple(rotations.shape)}")
    proj = torch.einsum("bshd,hdr->bshr", x.float(), rotations.to(x.device, torch.float32))
    return torch.cat([proj, -proj], dim=-1).argmax(dim=-1)
