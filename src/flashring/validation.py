"""Argument checks shared by every public entry point. Each raises ``TypeError`` / ``ValueError`` /
``NotImplementedError`` naming the argument, before any kernel runs.

Scalars may arrive as ``torch.SymFloat`` / ``SymInt`` under ``torch.compile(dynamic=True)``; the checks compare them
with plain operators (which dynamo traces as guards) and never hand them to ``math`` functions, which would break
the graph.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256
_REAL = (int, float, torch.SymInt, torch.SymFloat)


def is_real(x) -> bool:
    """A Python (or symbolic) real number, not a bool."""
    return isinstance(x, _REAL) and not isinstance(x, bool)


def finite_positive(x) -> bool:
    # x == x rules out NaN, x < inf rules out +inf; plain comparisons so symbolic floats trace as guards.
    return x == x and 0 < x < math.inf


# The smallest softmax scale the kernels take: float32's smallest normal number. They carry the scale (times
# log2(e)) as a float32 multiplier of raw scores; far below this it rounds to 0, and 0 * -inf (a masked score)
# would be NaN.
MIN_SCALE = 2.0 ** -126


def check_tensor(t, name: str, ndim: Optional[int] = None, layout: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}".replace("  ", " "))
    return t


def check_qkv(q, k, v, names: Sequence[str] = ("q", "k", "v"), ndim: int = 4,
              layout: str = "(batch, seqlen, nheads, headdim)", same_batch: bool = True) -> None:
    """q/k/v of flash-attn layout (seq, heads, dim last; ``ndim`` 4, or 3 for packed variable-length tensors).
    ``same_batch=False``: k/v are a cache whose first dim is not q's batch (paged, or rows picked by index)."""
    for name, t in zip(names, (q, k, v)):
        check_tensor(t, name, ndim, layout)
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every dimension must be >= 1")
    qn, kn, vn = names
    qs, ks, vs = q.shape, k.shape, v.shape          # read once: each .shape / .device builds a new object
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn}, {vn} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    qd = q.device
    if not (qd == k.device == v.device):
        raise ValueError(f"{qn}, {kn}, {vn} must be on one device, got {q.device}, {k.device}, {v.device}")
    if ndim == 4 and not (ks[0] == vs[0] and (qs[0] == ks[0] or not same_batch)):
        raise ValueError(f"batch sizes differ: {qn} {qs[0]}, {kn} {ks[0]}, {vn} {vs[0]}")
    if ks[-3] != vs[-3]:
        raise ValueError(f"{kn} and {vn} must have the same seqlen, got {ks[-3]} and {vs[-3]}")
    if not (qs[-1] == ks[-1] == vs[-1]):
        raise ValueError(f"headdim must match across {qn}, {kn}, {vn}, got {qs[-1]}, {ks[-1]}, {vs[-1]}")
    if qs[-1] > MAX_HEADDIM:
        raise ValueError(f"headdim {qs[-1]} is not supported; headdim must be in 1..{MAX_HEADDIM}")
    if ks[-2] != vs[-2]:
        raise ValueError(f"{kn} and {vn} must have the same number of heads, got {ks[-2]} and {vs[-2]}")
    if qs[-2] % ks[-2] != 0:
        raise ValueError(f"nheads of {qn} ({qs[-2]}) must be divisible by nheads of {kn}/{vn} ({ks[-2]}) "
                         "for MQA/GQA")


def check_scale(softmax_scale, head_dim: int, name: str = "softmax_scale"):
    """The softmax scale, ``1/sqrt(head_dim)`` by default; a positive finite real."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, torch.Tensor) and softmax_scale.dim() == 0 and not softmax_scale.requires_grad:
        softmax_scale = softmax_scale.item()
    if not is_real(softmax_scale):
        raise TypeError(f"{name} must be a float or None, got {type(softmax_scale).__name__}")
    if not finite_positive(softmax_scale):
        raise ValueError(f"{name} must be a positive finite number, got {softmax_scale}")
    if softmax_scale < MIN_SCALE:
        raise ValueError(f"{name} must be at least {MIN_SCALE:.3g} (float32's smallest normal number), got "
                         f"{softmax_scale}")
    return softmax_scale if isinstance(softmax_scale, torch.SymFloat) else float(softmax_scale)


def check_window(window_size) -> Tuple[int, int]:
    # the common case first: a tuple of two plain ints (bool is not int by type), without typing.Sequence's ABC
    # check (1.4 -> 0.2 us per call on the CPU dev box; decode steps pay every host microsecond)
    if type(window_size) is tuple and len(window_size) == 2:
        left, right = window_size
        if type(left) is int and type(right) is int and left >= -1 and right >= -1:
            return left, right
    if (not isinstance(window_size, Sequence) or len(window_size) != 2
            or not all(isinstance(w, (int, torch.SymInt)) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if any(w < -1 for w in window_size):
        raise ValueError(f"window_size entries must be >= 0, or -1 for unbounded; got {tuple(window_size)}")
    return int(window_size[0]), int(window_size[1])


def check_softcap(softcap):
    if not is_real(softcap):
        raise TypeError(f"softcap must be a float >= 0 (0 disables it), got {type(softcap).__name__}")
    if not (softcap == softcap and 0 <= softcap < math.inf):
        raise ValueError(f"softcap must be a finite float >= 0 (0 disables it), got {softcap!r}")
    return softcap if isinstance(softcap, torch.SymFloat) else float(softcap)


def check_dropout(dropout_p) -> None:
    if not is_real(dropout_p) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if dropout_p > 0:
        raise NotImplementedError("dropout_p > 0 is not implemented by flashring's kernels; apply dropout outside "
                                  "attention or use torch.nn.functional.scaled_dot_product_attention")


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_alibi(alibi_slopes) -> None:
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes is not implemented by flashring's kernels; pass None")


def check_int(value, name: str, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
