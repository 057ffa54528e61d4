"""The float64 reference and THE tolerance rule, used by the tests, the benchmark's check before timing and the GPU
checks alike.

Rule (flash-attn's tests): a result's max error against the float64 reference must be at most ``factor`` times the
max error of the same reference math run in the inputs' low precision (2 for outputs and LSE, 3 for gradients),
plus a rounding floor (:func:`rounding_floor`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from .masks import EMPTY_ROW_LSE, visible_mask

OUT_FACTOR = 2.0      # outputs and LSE
GRAD_FACTOR = 3.0     # dq, dk, dv


# ------------------------------------------------------------------------------------------------- reference
def group_view(x: torch.Tensor, nheads_k: int) -> torch.Tensor:
    """(B, S, H, D) -> (B, Hk, G, S, D): query heads h = hk * G + g share K/V head hk (flash-attn's GQA mapping)."""
    b, s, h, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, nheads_k, h // nheads_k, s, d)


def ungroup(x: torch.Tensor) -> torch.Tensor:
    """(B, Hk, G, S, D) -> (B, S, H, D)"""
    b, hk, g, s, d = x.shape
    return x.reshape(b, hk * g, s, d).permute(0, 2, 1, 3)


def softcap_scores(s: torch.Tensor, softcap: float) -> torch.Tensor:
    return softcap * torch.tanh(s / softcap) if softcap > 0 else s


def attention_ref(q, k, v, softmax_scale: Optional[float] = None, lower: Optional[int] = None,
                  upper: Optional[int] = None, softcap: float = 0.0, mask: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standard attention (materialises the scores). Returns ``(out, lse)``: out like q, lse ``(B, H, Sq)`` fp32.

    ``dtype``: compute precision (float64 for the reference; None keeps the input dtype, which is how the tolerance
    rule measures the error of a low-precision reference run). ``mask``: optional extra bool mask broadcastable to
    ``(B, H, Sq, Sk)`` (True = visible), e.g. a sparse pattern from ``flashring.masks.sparse_pair_mask``.
    """
    in_dtype = q.dtype
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qg = group_view(q, hk)                                    # (B, Hk, G, Sq, D)
    kg = k.permute(0, 2, 1, 3).unsqueeze(2)                   # (B, Hk, 1, Sk, D)
    vg = v.permute(0, 2, 1, 3).unsqueeze(2)
    s = softcap_scores(torch.matmul(qg, kg.transpose(-1, -2)) * scale, softcap)   # (B, Hk, G, Sq, Sk)
    vis = visible_mask(sq, sk, lower, upper, device=q.device)
    if mask is not None:
        vis = vis & (mask.reshape(mask.shape[0], hk, h // hk, sq, sk) if mask.dim() == 4 else mask)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                          # (B, Hk, G, Sq); -inf on empty rows
    empty = torch.isinf(lse) & (lse < 0)
    p = torch.exp(s - lse.masked_fill(empty, 0.0).unsqueeze(-1))
    out = torch.matmul(p.to(vg.dtype), vg)
    lse = lse.float().masked_fill(empty, EMPTY_ROW_LSE).reshape(b, h, sq)
    return ungroup(out).to(in_dtype), lse


def reference_pair(q, k, v, dout: Optional[torch.Tensor], **kw) -> Dict[str, Dict[str, torch.Tensor]]:
    """``{"ref": ..., "low": ...}``: out, lse and (when ``dout`` is given) dq, dk, dv of :func:`attention_ref` in
    float64 and in the inputs' own dtype, from the same inputs. What :func:`check_close` compares against."""
    result = {}
    for name, dtype in (("ref", torch.float64), ("low", None)):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_(dout is not None) for t in (q, k, v)]
        with torch.enable_grad():
            out, lse = attention_ref(*leaves, dtype=dtype, **kw)
            grads = torch.autograd.grad(out, leaves, dout.to(out.dtype)) if dout is not None else ()
        result[name] = dict(out=out.detach(), lse=lse, **dict(zip(("dq", "dk", "dv"), grads)))
    return result


# ------------------------------------------------------------------------------------------------- tolerance
def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference in float64; NaN propagates (and NaN <= tol is False)."""
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Two rounding steps of ``dtype`` at the reference's magnitude (``2 * |x + 0.3 - 0.3 - x|``, flash-attn's
    ``atol`` in its tests) plus fp32 accumulation noise. One step was too tight for 2-token bf16 sequences, whose
    low-precision reference can be exact by luck: 8 of 300 seeds failed dq at one step (flash-attn's own rule: 0)."""
    if ref.numel() == 0:
        return 0.0
    r = ref.to(dtype)
    # 16 fp32 ulp on top, for any input dtype: where the exact gradient cancels to 0 (one visible key: dS =
    # P (dP - delta) with P = 1), dP = dO.V and FA2's delta = rowsum(dO * O) are two fp32 sums of the same terms in
    # different orders; the exactly cancelling reference has no such noise (dq 1.6e-6 fp16 on CPU, 1.07e-6 fp32 on
    # H100, reference error 0).
    floor = 2 * (r + 0.3 - 0.3 - r).abs().max().item() + 1e-6 + 16 * torch.finfo(torch.float32).eps
    if dtype == torch.float32:
        # fp32 inputs: the GPU kernels use the hardware's approximate exp2 (2 ulp) and fold the scale into the
        # exponent, so a few ulp of the output's magnitude on top (1.5e-6 on a dq of max ~3 on an H100, where
        # cuBLAS-fp32's own error was 1.5e-7). 16 ulp of the largest value bounds it.
        floor += 16 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    return floor


def tolerance(ref: torch.Tensor, low: torch.Tensor, factor: float, dtype: torch.dtype) -> float:
    """``factor`` x the low-precision reference's error + the rounding floor of ``dtype``."""
    return factor * max_err(low, ref) + rounding_floor(ref, dtype)


def check_close(out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, factor: float,
                dtype: Optional[torch.dtype] = None) -> Dict[str, object]:
    """``{"err", "tol", "ok"}`` of ``out`` against the rule. ``dtype``: the inputs' dtype (default out's)."""
    err = max_err(out, ref)
    tol = tolerance(ref, low, factor, dtype or out.dtype)
    return {"err": err, "tol": tol, "ok": bool(err <= tol) and bool(torch.isfinite(out).all())}


def assert_close(out, ref, low, factor: float, what: str, seed=None, dtype: Optional[torch.dtype] = None) -> None:
    c = check_close(out, ref, low, factor, dtype)
    assert torch.isfinite(out).all(), f"{what}: non-finite values (seed {seed})"
    assert c["ok"], (f"{what}: error {c['err']:.3g} > tolerance {c['tol']:.3g} = {factor} x low-precision reference "
                     f"error + rounding floor (seed {seed})")


def check_all(results: Dict[str, torch.Tensor], refs: Dict[str, Dict[str, torch.Tensor]],
              dtype: torch.dtype, names: Sequence[str] = ("out", "lse", "dq", "dk", "dv")) -> Dict[str, dict]:
    """:func:`check_close` for each named result present in both ``results`` and :func:`reference_pair`'s dict."""
    detail = {}
    for name in names:
        if name in results and name in refs["ref"]:
            factor = GRAD_FACTOR if name.startswith("d") else OUT_FACTOR
            detail[name] = check_close(results[name], refs["ref"][name], refs["low"][name], factor, dtype)
    return detail
