"""FlashAttention-2 in PyTorch ops: the fast CPU path (O(N) memory).

``fwd`` / ``bwd`` run the same algorithm as the Triton kernels on (query chunk, key chunk) tiles: online softmax
forward with fp32 state, backward recomputing probabilities from the saved LSE, so no (seqlen_q, seqlen_k) tensor
exists. Layout ``(batch, seqlen, nheads, headdim)``; K/V may have fewer heads (GQA). Outputs are contiguous in that
layout (the custom ops' fake tensors promise exactly that).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..masks import EMPTY_ROW_LSE, key_range, sparse_visible, visible_mask
from ..testing import group_view, softcap_scores
from .sparse_ranges import SparseMeta

CHUNK = 512
F32 = torch.float32          # explicit everywhere: the state must not follow torch.get_default_dtype()
TileMask = Callable[[int, int, int, int], torch.Tensor]


def _tile_visible(m0, m1, n0, n1, lower, upper, tile_mask: Optional[TileMask], device):
    # Diagonal offset of a tile whose rows start at m0 and columns at n0: i + off <= j  <=>  (i-m0) + off + m0 - n0.
    shift = lambda off: None if off is None else off + m0 - n0  # noqa: E731
    vis = visible_mask(m1 - m0, n1 - n0, shift(lower), shift(upper), device=device)
    return vis if tile_mask is None else vis & tile_mask(m0, m1, n0, n1)


def _kv_view(x: torch.Tensor) -> torch.Tensor:
    # (B, S, Hk, D) -> (B, Hk, 1, S, D) fp32
    return x.permute(0, 2, 1, 3).unsqueeze(2).to(F32)


def fwd(q, k, v, softmax_scale: float, lower: Optional[int], upper: Optional[int], softcap: float = 0.0,
        tile_mask: Optional[TileMask] = None, out_dtype: Optional[torch.dtype] = None, chunk: int = CHUNK
        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax forward over key chunks. ``tile_mask(m0, m1, n0, n1)``: optional extra visibility (bool,
    broadcastable to (B, Hk, G, mc, nc))."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qg = group_view(q, hk).to(F32)                            # (B, Hk, G, Sq, D)
    kg, vg = _kv_view(k), _kv_view(v)
    out = torch.empty(b, sq, h, v.shape[-1], dtype=F32, device=q.device)
    og = group_view(out, hk)                                  # a view: writes land in (B, Sq, H, D) order
    lse = torch.empty(b, hk, h // hk, sq, dtype=F32, device=q.device)
    for m0 in range(0, sq, chunk):
        m1 = min(sq, m0 + chunk)
        lo, hi = key_range(m0, m1, sk, lower, upper)
        qc = qg[..., m0:m1, :]
        m_i = torch.full(qc.shape[:-1], float("-inf"), dtype=F32, device=q.device)
        l_i = torch.zeros_like(m_i)
        acc = torch.zeros(*qc.shape[:-1], vg.shape[-1], dtype=F32, device=q.device)
        for n0 in range((lo // chunk) * chunk, hi, chunk):
            n1 = min(sk, n0 + chunk)
            s = softcap_scores(torch.matmul(qc, kg[..., n0:n1, :].transpose(-1, -2)) * softmax_scale, softcap)
            vis = _tile_visible(m0, m1, n0, n1, lower, upper, tile_mask, q.device)
            s = s.masked_fill(~vis, float("-inf"))
            m_new = torch.maximum(m_i, s.amax(-1))
            m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)   # rows with nothing visible yet
            p = torch.exp(s - m_safe.unsqueeze(-1))
            alpha = torch.exp(m_i - m_safe)
            l_i = l_i * alpha + p.sum(-1)
            # Exact masking next to non-finite values (as the kernels): a value row no query of the tile may see
            # must not turn 0 * NaN into NaN; rows that do see a non-finite value row are poisoned explicitly.
            vc = vg[..., n0:n1, :]
            v_bad = ~torch.isfinite(vc).all(-1)                  # (B, Hk, 1, nc)
            acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, vc.masked_fill(v_bad.unsqueeze(-1), 0.0))
            sees_bad = (vis & v_bad.unsqueeze(-2) & (s > float("-inf"))).any(-1, keepdim=True)
            acc = acc.masked_fill(sees_bad, float("nan"))
            m_i = m_new
        empty = l_i == 0
        og[..., m0:m1, :] = acc / l_i.masked_fill(empty, 1.0).unsqueeze(-1)
        lse[..., m0:m1] = torch.where(empty, torch.full_like(l_i, EMPTY_ROW_LSE), m_i + torch.log(l_i))
    return out.to(out_dtype or q.dtype), lse.reshape(b, h, sq)


def bwd(do, q, k, v, out, lse, softmax_scale: float, lower: Optional[int], upper: Optional[int],
        softcap: float = 0.0, dlse: Optional[torch.Tensor] = None, out_dtype: Optional[torch.dtype] = None,
        tile_mask: Optional[TileMask] = None, chunk: int = CHUNK):
    """Backward recomputing P per tile from the saved LSE."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qg, dog = group_view(q, hk).to(F32), group_view(do, hk).to(F32)
    kg, vg = _kv_view(k), _kv_view(v)
    lseg = lse.reshape(b, hk, h // hk, sq).to(F32)
    delta = (dog * group_view(out, hk).to(F32)).sum(-1)      # (B, Hk, G, Sq): rowsum(dO * O)
    if dlse is not None:                                      # d lse / d s = P: folds into delta
        delta = delta - dlse.to(F32).reshape(delta.shape)
    dq = torch.zeros(b, sq, h, d, dtype=F32, device=q.device)
    dqg = group_view(dq, hk)
    dk = torch.zeros(b, sk, hk, d, dtype=F32, device=q.device)
    dv = torch.zeros(b, sk, hk, v.shape[-1], dtype=F32, device=q.device)
    dkg, dvg = dk.permute(0, 2, 1, 3), dv.permute(0, 2, 1, 3)     # (B, Hk, Sk, D) views
    for m0 in range(0, sq, chunk):
        m1 = min(sq, m0 + chunk)
        lo, hi = key_range(m0, m1, sk, lower, upper)
        qc, doc = qg[..., m0:m1, :], dog[..., m0:m1, :]
        for n0 in range((lo // chunk) * chunk, hi, chunk):
            n1 = min(sk, n0 + chunk)
            raw = torch.matmul(qc, kg[..., n0:n1, :].transpose(-1, -2)) * softmax_scale
            s = softcap_scores(raw, softcap)
            vis = _tile_visible(m0, m1, n0, n1, lower, upper, tile_mask, q.device)
            p = torch.exp(s - lseg[..., m0:m1].unsqueeze(-1)).masked_fill(~vis, 0.0)
            dvg[..., n0:n1, :] += torch.matmul(p.transpose(-1, -2), doc).sum(2)
            dp = torch.matmul(doc, vg[..., n0:n1, :].transpose(-1, -2))
            ds = p * (dp - delta[..., m0:m1].unsqueeze(-1))
            if softcap > 0:
                ds = ds * (1.0 - torch.tanh(raw / softcap) ** 2)
            ds = ds.masked_fill(~vis, 0.0) * softmax_scale       # masked pairs: exactly 0, even next to NaN
            finite = lambda x: x.masked_fill(~torch.isfinite(x), 0.0)  # noqa: E731
            dqg[..., m0:m1, :] += torch.matmul(ds, finite(kg[..., n0:n1, :]))
            dkg[..., n0:n1, :] += torch.matmul(ds.transpose(-1, -2), finite(qc)).sum(2)
    return dq.to(out_dtype or q.dtype), dk.to(out_dtype or k.dtype), dv.to(out_dtype or v.dtype)


def sparse_tile_mask(sp: Optional[SparseMeta]) -> Optional[TileMask]:
    """``flashring.masks.sparse_visible`` on the compacted side tensors, per tile ``(B, Hk, G, mc, nc)``, with the
    padding rows past each head's length seeing nothing (their P is then 0 in the backward too)."""
    if sp is None:
        return None
    b, h, _ = sp.q_pos.shape
    hk = sp.k_pos.shape[1]
    qpos, kpos = sp.q_pos.reshape(b, hk, h // hk, -1), sp.k_pos.unsqueeze(2)
    qbkt = sp.q_bkt.reshape(b, hk, h // hk, -1) if sp.q_bkt is not None else None
    kbkt = sp.k_bkt.unsqueeze(2) if sp.k_bkt is not None else None
    qlen, klen = sp.q_len.reshape(b, hk, h // hk, 1, 1), sp.k_len.reshape(b, hk, 1, 1, 1)

    def mask(m0, m1, n0, n1):
        i = torch.arange(m0, m1, device=qpos.device).view(1, 1, 1, -1, 1)
        j = torch.arange(n0, n1, device=qpos.device).view(1, 1, 1, 1, -1)
        rows = lambda x: None if x is None else x[..., m0:m1].unsqueeze(-1)  # noqa: E731
        cols = lambda x: None if x is None else x[..., n0:n1].unsqueeze(-2)  # noqa: E731
        return (i < qlen) & (j < klen) & sparse_visible(rows(qpos), cols(kpos), rows(qbkt), cols(kbkt), sp.causal)
    return mask


def varlen_slices(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """``[(q_slice, k_slice)]`` of each sequence of a packed batch (host-side lists: the CPU path loops)."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])) for i in range(len(cq) - 1)]
