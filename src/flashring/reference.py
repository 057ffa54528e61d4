"""Pure-PyTorch attention: the float64 math reference and the O(N)-memory CPU path.

``attention_ref`` materialises the full score matrix (tests and benchmarks only). ``chunked_fwd`` /
``chunked_bwd`` run FlashAttention-2's algorithm with torch ops on (query chunk, key chunk) tiles: online softmax
forward, backward recomputing probabilities from the saved LSE, so memory stays O(seqlen * chunk).
All functions take flash-attn layout ``(batch, seqlen, nheads, headdim)``; K/V may have fewer heads (GQA).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._masks import EMPTY_ROW_LSE, key_range, visible_mask


def _group_view(q: torch.Tensor, nheads_k: int) -> torch.Tensor:
    # (B, S, H, D) -> (B, Hk, G, S, D): query heads h = hk * G + g share K/V head hk (flash-attn's GQA mapping).
    b, s, h, d = q.shape
    return q.permute(0, 2, 1, 3).reshape(b, nheads_k, h // nheads_k, s, d)


def _ungroup(x: torch.Tensor) -> torch.Tensor:
    # (B, Hk, G, S, D) -> (B, S, H, D)
    b, hk, g, s, d = x.shape
    return x.reshape(b, hk * g, s, d).permute(0, 2, 1, 3)


def _softcap(s: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(s / softcap) if softcap > 0 else s


def attention_ref(q, k, v, softmax_scale: Optional[float] = None, lower: Optional[int] = None,
                  upper: Optional[int] = None, softcap: float = 0.0, mask: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standard attention (materialises scores). Returns ``(out, lse)``: out like q, lse ``(B, H, Sq)`` fp32.

    ``dtype``: compute precision (float64 for the reference; None keeps the input dtype, which is how tests
    measure the error of a low-precision reference run). ``mask``: optional extra bool mask broadcastable to
    ``(B, H, Sq, Sk)`` (True = visible), used by the sparse tests.
    """
    in_dtype = q.dtype
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qg = _group_view(q, hk)                                   # (B, Hk, G, Sq, D)
    kg = k.permute(0, 2, 1, 3).unsqueeze(2)                   # (B, Hk, 1, Sk, D)
    vg = v.permute(0, 2, 1, 3).unsqueeze(2)
    s = _softcap(torch.matmul(qg, kg.transpose(-1, -2)) * scale, softcap)   # (B, Hk, G, Sq, Sk)
    vis = visible_mask(sq, sk, lower, upper, device=q.device)
    if mask is not None:
        vis = vis & mask.reshape(b, hk, h // hk, sq, sk) if mask.dim() == 4 else vis & mask
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                          # (B, Hk, G, Sq); -inf on empty rows
    empty = torch.isinf(lse) & (lse < 0)
    p = torch.exp(s - lse.masked_fill(empty, 0.0).unsqueeze(-1))
    out = torch.matmul(p.to(vg.dtype), vg)
    lse = lse.float().masked_fill(empty, EMPTY_ROW_LSE).reshape(b, h, sq)
    return _ungroup(out).to(in_dtype), lse


def chunked_fwd(q, k, v, softmax_scale: float, lower: Optional[int], upper: Optional[int], softcap: float = 0.0,
                chunk: int = 512, tile_mask=None, out_dtype: Optional[torch.dtype] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2 forward with torch ops: online softmax over key chunks, fp32 state, O(N) memory.
    ``tile_mask(m0, m1, n0, n1)``: optional extra visibility (bool, broadcastable to (B, Hk, G, mc, nc))."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qg = _group_view(q, hk).float()                           # (B, Hk, G, Sq, D)
    kg = k.permute(0, 2, 1, 3).unsqueeze(2).float()           # (B, Hk, 1, Sk, D)
    vg = v.permute(0, 2, 1, 3).unsqueeze(2).float()
    dv_ = v.shape[-1]
    out = torch.empty(*qg.shape[:-1], dv_, dtype=torch.float32, device=q.device)
    lse = torch.empty(qg.shape[:-1], dtype=torch.float32, device=q.device)
    for m0 in range(0, sq, chunk):
        m1 = min(sq, m0 + chunk)
        lo, hi = key_range(m0, m1, sk, lower, upper)
        qc = qg[..., m0:m1, :]
        m_i = torch.full(qc.shape[:-1], float("-inf"), device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(*qc.shape[:-1], dv_, device=q.device)
        for n0 in range((lo // chunk) * chunk, hi, chunk):
            n1 = min(sk, n0 + chunk)
            s = _softcap(torch.matmul(qc, kg[..., n0:n1, :].transpose(-1, -2)) * softmax_scale, softcap)
            s = s.masked_fill(~_tile_visible(m0, m1, n0, n1, lower, upper, tile_mask, q.device), float("-inf"))
            m_new = torch.maximum(m_i, s.amax(-1))
            m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)   # rows with nothing visible yet
            p = torch.exp(s - m_safe.unsqueeze(-1))
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, vg[..., n0:n1, :])
            m_i = m_new
        empty = l_i == 0
        out[..., m0:m1, :] = acc / l_i.masked_fill(empty, 1.0).unsqueeze(-1)
        lse[..., m0:m1] = torch.where(empty, torch.full_like(l_i, EMPTY_ROW_LSE), m_i + torch.log(l_i))
    return _ungroup(out).to(out_dtype or q.dtype), lse.reshape(b, h, sq)


def chunked_bwd(do, q, k, v, out, lse, softmax_scale: float, lower: Optional[int], upper: Optional[int],
                softcap: float = 0.0, chunk: int = 512, dlse: Optional[torch.Tensor] = None,
                out_dtype: Optional[torch.dtype] = None, tile_mask=None):
    """FlashAttention-2 backward with torch ops: recompute P per tile from the saved LSE; no N x N tensor."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qg = _group_view(q, hk).float()
    dog = _group_view(do, hk).float()
    kg = k.permute(0, 2, 1, 3).unsqueeze(2).float()
    vg = v.permute(0, 2, 1, 3).unsqueeze(2).float()
    lseg = lse.reshape(b, hk, h // hk, sq)
    delta = (dog * _group_view(out, hk).float()).sum(-1)      # (B, Hk, G, Sq): rowsum(dO * O)
    if dlse is not None:                                      # d lse / d s = P: folds into delta
        delta = delta - dlse.float().reshape(delta.shape)
    dq = torch.zeros_like(qg)
    dk = torch.zeros(b, hk, 1, sk, d, device=q.device)
    dv = torch.zeros(b, hk, 1, sk, v.shape[-1], device=q.device)
    for m0 in range(0, sq, chunk):
        m1 = min(sq, m0 + chunk)
        lo, hi = key_range(m0, m1, sk, lower, upper)
        qc, doc = qg[..., m0:m1, :], dog[..., m0:m1, :]
        for n0 in range((lo // chunk) * chunk, hi, chunk):
            n1 = min(sk, n0 + chunk)
            raw = torch.matmul(qc, kg[..., n0:n1, :].transpose(-1, -2)) * softmax_scale
            s = _softcap(raw, softcap)
            vis = _tile_visible(m0, m1, n0, n1, lower, upper, tile_mask, q.device)
            p = torch.exp(s - lseg[..., m0:m1].unsqueeze(-1)).masked_fill(~vis, 0.0)
            dv[..., n0:n1, :] += torch.matmul(p.transpose(-1, -2), doc).sum(2, keepdim=True)
            dp = torch.matmul(doc, vg[..., n0:n1, :].transpose(-1, -2))
            ds = p * (dp - delta[..., m0:m1].unsqueeze(-1))
            if softcap > 0:
                ds = ds * (1.0 - torch.tanh(raw / softcap) ** 2)
            ds = ds * softmax_scale
            dq[..., m0:m1, :] += torch.matmul(ds, kg[..., n0:n1, :])
            dk[..., n0:n1, :] += torch.matmul(ds.transpose(-1, -2), qc).sum(2, keepdim=True)
    dk = dk.squeeze(2).permute(0, 2, 1, 3)
    dv = dv.squeeze(2).permute(0, 2, 1, 3)
    return (_ungroup(dq).to(out_dtype or q.dtype), dk.to(out_dtype or k.dtype), dv.to(out_dtype or v.dtype))


def _tile_visible(m0, m1, n0, n1, lower, upper, tile_mask, device):
    vis = visible_mask(m1 - m0, n1 - n0, _shift(lower, m0, n0), _shift(upper, m0, n0), device=device)
    return vis if tile_mask is None else vis & tile_mask(m0, m1, n0, n1)


def _shift(off: Optional[int], m0: int, n0: int) -> Optional[int]:
    # Diagonal offset of a tile whose rows start at m0 and columns at n0: i + off <= j  <=>  (i-m0) + off + m0 - n0.
    return None if off is None else off + m0 - n0
