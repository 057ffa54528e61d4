"""Public dense API: flash-attn style ``flash_attn_func`` and a drop-in ``scaled_dot_product_attention``.

Both go through two ``torch.library.custom_op``s (``flashring::fwd`` / ``flashring::bwd``) with fake
implementations and registered autograd, so ``torch.compile(fullgraph=True)`` traces them without graph breaks.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._masks import flash_bounds, sdpa_bounds
from .ops.flash import SparseMeta, flash_bwd, flash_fwd

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256


# ------------------------------------------------------------------------------------------------- validation
def _check_qkv(q, k, v, names=("q", "k", "v")) -> None:
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (batch, seqlen, nheads, headdim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every dimension must be >= 1")
    qn, kn, vn = names
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn}, {vn} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{qn}, {kn}, {vn} must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: {qn} {q.shape[0]}, {kn} {k.shape[0]}, {vn} {v.shape[0]}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"{kn} and {vn} must have the same seqlen, got {k.shape[1]} and {v.shape[1]}")
    if not (q.shape[3] == k.shape[3] == v.shape[3]):
        raise ValueError(f"headdim must match across {qn}, {kn}, {vn}, got {q.shape[3]}, {k.shape[3]}, {v.shape[3]}")
    if q.shape[3] > MAX_HEADDIM:
        raise ValueError(f"headdim {q.shape[3]} is not supported; headdim must be in 1..{MAX_HEADDIM}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"{kn} and {vn} must have the same number of heads, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"nheads of {qn} ({q.shape[2]}) must be divisible by nheads of {kn}/{vn} ({k.shape[2]}) "
                         "for MQA/GQA")


def _check_scale(softmax_scale, head_dim: int, name: str = "softmax_scale") -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(softmax_scale).__name__}")
    if not (softmax_scale > 0 and math.isfinite(softmax_scale)):
        raise ValueError(f"{name} must be a positive finite number, got {softmax_scale}")
    return float(softmax_scale)


def _check_window(window_size) -> Tuple[int, int]:
    if (not isinstance(window_size, Sequence) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if any(w < -1 for w in window_size):
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded; got {tuple(window_size)}")
    return int(window_size[0]), int(window_size[1])


def _check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0 \
            or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a finite float >= 0 (0 disables it), got {softcap!r}")
    return float(softcap)


def _check_dropout(dropout_p) -> None:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0:
        raise NotImplementedError("dropout_p > 0 is not implemented by flashring's kernels; apply dropout outside "
                                  "attention or use torch.nn.functional.scaled_dot_product_attention")


# ------------------------------------------------------------------------------------------------- custom ops
# One forward and one backward op serve dense and dynamic-sparse attention: the sparse side tensors are optional
# (see flashring.ops.flash.SparseMeta); None means the dense band given by lower/upper.
OptT = Optional[torch.Tensor]


def _meta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, sparse_causal):
    return None if q_pos is None else SparseMeta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, sparse_causal)


@torch.library.custom_op("flashring::fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, lower: Optional[int],
            upper: Optional[int], softcap: float, q_pos: OptT, k_pos: OptT, q_len: OptT, k_len: OptT,
            q_bkt: OptT, k_bkt: OptT, sparse_causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return flash_fwd(q, k, v, softmax_scale, lower, upper, softcap,
                     sparse=_meta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, sparse_causal))


@_fwd_op.register_fake
def _fwd_fake(q, k, v, *args):
    b, sq, h, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=torch.float32))


@torch.library.custom_op("flashring::bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, dlse: OptT, softmax_scale: float, lower: Optional[int], upper: Optional[int],
            softcap: float, q_pos: OptT, k_pos: OptT, q_len: OptT, k_len: OptT, q_bkt: OptT, k_bkt: OptT,
            sparse_causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return flash_bwd(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse=dlse,
                     sparse=_meta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, sparse_causal))


@_bwd_op.register_fake
def _bwd_fake(do, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, lower, upper, softcap, *sparse = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *sparse[:6])
    ctx.args = (softmax_scale, lower, upper, softcap, sparse[6])


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *sparse = ctx.saved_tensors
    scale, lower, upper, softcap, sparse_causal = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, dlse, scale, lower, upper, softcap, *sparse, sparse_causal)
    return (dq, dk, dv) + (None,) * 11


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _attention(q, k, v, softmax_scale, lower, upper, softcap, sparse: Optional[SparseMeta] = None):
    if sparse is None:
        return _fwd_op(q, k, v, softmax_scale, lower, upper, softcap, None, None, None, None, None, None, False)
    return _fwd_op(q, k, v, softmax_scale, None, None, softcap, *sparse)


# ------------------------------------------------------------------------------------------------- public API
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False, return_attn_probs=False):
    """Exact attention, FlashAttention-2 algorithm. flash-attn's argument names, order and layout.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads_k, headdim)`` with
            ``nheads % nheads_k == 0`` (MQA/GQA: K/V are never repeated in memory). fp16/bf16 (fp32 accepted and
            computed with fp32 products); headdim 1..256; any seqlen >= 1; any strides.
        dropout_p: must be 0.0 (dropout is not implemented: ``NotImplementedError``, never silently ignored).
        softmax_scale: defaults to ``1/sqrt(headdim)``.
        causal: bottom-right aligned when seqlen_q != seqlen_k (flash-attn >= 2.1), see ``flashring._masks``.
        window_size: ``(left, right)`` sliding window; -1 = unbounded. Query i sees keys
            ``[i + sk - sq - left, i + sk - sq + right]``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)`` (after scaling), forward and backward.
        deterministic: accepted for compatibility; the backward has no atomics, so gradients are always bitwise
            reproducible.
        return_attn_probs: if True return ``(out, softmax_lse, None)``; ``softmax_lse`` is ``(batch, nheads,
            seqlen_q)`` fp32 (natural log). A query row that sees no key gets out = 0 and lse = -1e30.
    """
    _check_qkv(q, k, v)
    _check_dropout(dropout_p)
    scale = _check_scale(softmax_scale, q.shape[-1])
    window = _check_window(window_size)
    cap = _check_softcap(softcap)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    lower, upper = flash_bounds(q.shape[1], k.shape[1], causal, window)
    out, lse = _attention(q, k, v, scale, lower, upper, cap)
    return (out, lse, None) if return_attn_probs else out


_warned: set = set()


def _fallback(reason: str, *args, **kwargs):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"flashring.scaled_dot_product_attention: {reason}; using torch's SDPA for this call",
                      stacklevel=3)
    return F.scaled_dot_product_attention(*args, **kwargs)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: ``(batch, nheads, seqlen, headdim)``
    layout, torch's *top-left* causal rule. Calls flashring's kernels for what they cover; an ``attn_mask``,
    dropout, float64, headdim > 256 or other than 4 dims goes to torch's SDPA with a one-time warning."""
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if enable_gqa:
        kwargs["enable_gqa"] = True
    args = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in args):
        raise TypeError("query, key and value must be torch.Tensors")
    if attn_mask is not None:
        return _fallback("attn_mask is not supported by the flash kernels", *args, **kwargs)
    if dropout_p:
        return _fallback("dropout_p > 0 is not supported by the flash kernels", *args, **kwargs)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return _fallback("inputs are not 4-D", *args, **kwargs)
    if any(t.dtype not in _DTYPES for t in args):
        return _fallback(f"dtype {query.dtype} is not supported by the flash kernels", *args, **kwargs)
    if query.shape[-1] > MAX_HEADDIM or value.shape[-1] != query.shape[-1]:
        return _fallback("this head dim is not supported by the flash kernels", *args, **kwargs)
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads but key has {key.shape[1]}; pass enable_gqa=True "
                         "for grouped-query attention")
    # (B, H, S, D) -> (B, S, H, D) as strided views: no copy.
    q, k, v = (t.transpose(1, 2) for t in args)
    _check_qkv(q, k, v, names=("query", "key", "value"))
    s = _check_scale(scale, q.shape[-1], name="scale")
    lower, upper = sdpa_bounds(bool(is_causal))
    out, _ = _attention(q, k, v, s, lower, upper, 0.0)
    return out.transpose(1, 2)
