"""Public attention API: flash-attn's functions and a drop-in for torch's ``scaled_dot_product_attention``.

Layering (as flash-attn): raw ``torch.library.custom_op``s with fake implementations (``flashring::fwd`` / ``bwd``
for the fixed-length and dynamic-sparse kernels, ``flashring::varlen_fwd`` / ``varlen_bwd`` for packed batches),
autograd registered on them, and thin public functions that validate arguments and call one op. So
``torch.compile(fullgraph=True)`` traces every entry point without graph breaks.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Dict, Optional, Tuple

import torch

from . import validation as V
from .masks import flash_bounds, sdpa_bounds, window_offsets
from .ops import dispatch, kvcache
from .ops.flash import Varlen
from .ops.sparse_ranges import SparseMeta

OptT = Optional[torch.Tensor]
# torch's own SDPA, bound at import: the drop-in falls back to it even after a user routes
# torch.nn.functional.scaled_dot_product_attention to flashring (F's name is this very C function).
TORCH_SDPA = torch._C._nn.scaled_dot_product_attention


# ------------------------------------------------------------------------------------------------- fixed length
# One forward and one backward op serve dense and dynamic-sparse attention: the sparse side tensors are optional
# (``ops.sparse_ranges.SparseMeta``); None means the dense band given by lower/upper.
def _meta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, sparse_causal, q_rows, k_rows) -> Optional[SparseMeta]:
    return None if q_pos is None else SparseMeta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, sparse_causal, q_rows,
                                                 k_rows)


def _side(sparse: Optional[SparseMeta]) -> tuple:
    """The custom ops' sparse arguments: the :class:`SparseMeta` fields in order, or the dense call's."""
    return (None,) * 6 + (False, None, None) if sparse is None else tuple(sparse)


@torch.library.custom_op("flashring::fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, lower: Optional[int],
            upper: Optional[int], softcap: float, q_pos: OptT, k_pos: OptT, q_len: OptT, k_len: OptT,
            q_bkt: OptT, k_bkt: OptT, sparse_causal: bool, q_rows: OptT,
            k_rows: OptT) -> Tuple[torch.Tensor, torch.Tensor]:
    return dispatch.fwd(q, k, v, softmax_scale, lower, upper, softcap,
                        sparse=_meta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, sparse_causal, q_rows, k_rows))


@_fwd_op.register_fake
def _(q, k, v, *args):
    b, sq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.custom_op("flashring::bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, dlse: OptT, softmax_scale: float, lower: Optional[int], upper: Optional[int],
            softcap: float, q_pos: OptT, k_pos: OptT, q_len: OptT, k_len: OptT, q_bkt: OptT, k_bkt: OptT,
            sparse_causal: bool, q_rows: OptT, k_rows: OptT) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.bwd(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse=dlse,
                        sparse=_meta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, sparse_causal, q_rows, k_rows))


@_bwd_op.register_fake
def _(do, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup(ctx, inputs, output):
    q, k, v, softmax_scale, lower, upper, softcap, *sparse = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *sparse[:6], *sparse[7:])
    ctx.args = (softmax_scale, lower, upper, softcap, sparse[6])


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, *sparse = ctx.saved_tensors
    scale, lower, upper, softcap, sparse_causal = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, dlse, scale, lower, upper, softcap, *sparse[:6], sparse_causal,
                         *sparse[6:])
    return (dq, dk, dv) + (None,) * 13


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup)


class _Eager(torch.autograd.Function):
    """Eager calls: the custom ops' forward and backward without the dispatcher. Through the op's registered
    autograd a training forward cost 77 us of host time on the CPU dev box, 40 of them in torch's argument
    defaulting (``torch._library.utils.fill_defaults``); on the GPU machines' slower host, forwards of <= 1k tokens
    timed host-bound at 0.3-0.6 ms (session 8). torch.compile and tracing modes (make_fx, FakeTensorMode) get the
    custom ops instead (same kernels; see :func:`plain_eager`); torch.func transforms take this Function (its
    setup_context and vmap rules; its backward calls the custom bwd ops). The backward is not differentiable again
    (as flash-attn's): differentiating its gradients raises (:class:`_NotTwice`) instead of returning zeros."""

    @staticmethod
    def forward(q, k, v, softmax_scale, lower, upper, softcap, sparse, varlen, deterministic):
        return dispatch.fwd(q, k, v, softmax_scale, lower, upper, softcap, sparse=sparse, varlen=varlen)

    @classmethod
    def call(cls, q, k, v, softmax_scale, lower, upper, softcap, sparse, varlen, deterministic):
        """``apply`` without torch's per-call argument binding: a Function with ``setup_context`` has every
        ``apply`` bind its arguments to ``forward``'s signature (``inspect.signature``: 25-30 us of host time per
        call on the CPU dev box, more on the GPU machines), which changes nothing when all ten come positionally.
        Under torch.func transforms (which need that path) the plain ``apply``."""
        args = (q, k, v, softmax_scale, lower, upper, softcap, sparse, varlen, deterministic)
        if torch._C._are_functorch_transforms_active():
            return cls.apply(*args)
        # what Function.apply does past the binding (torch 2.11-2.13)
        return super(torch.autograd.Function, cls).apply(*torch._functorch.utils.unwrap_dead_wrappers(args))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, softmax_scale, lower, upper, softcap, sparse, varlen, deterministic = inputs
        # The side tensors (sparse positions, cu_seqlens) are saved too, so an in-place change to one between
        # forward and backward raises like a change to q would.
        side = [] if sparse is None else sparse.tensors()
        side += [] if varlen is None else [varlen.cu_q, varlen.cu_k]
        ctx.save_for_backward(q, k, v, *output, *side)
        ctx.args = (softmax_scale, lower, upper, softcap, sparse, varlen, deterministic)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors[:5]        # read once: checkpoint's unpack hooks allow one read
        if not torch.is_grad_enabled():
            return _eager_grads(ctx.args, q, k, v, out, lse, dout, dlse)
        # create_graph=True, torch.func (which always backpropagates with grad on), a Hessian
        with torch.no_grad():
            grads = _eager_grads(ctx.args, q, k, v, out, lse, dout, dlse)
        sources = [t for t in (q, k, v, dout, dlse) if t is not None and t.requires_grad]
        return (*_NotTwice.apply(*grads[:3], *sources), *grads[3:]) if sources else grads

    @staticmethod
    def vmap(info, in_dims, q, k, v, *args):
        """torch.func.vmap: the mapped dimension joins the batch (dense calls), else one call per entry."""
        dims, size = in_dims[:3], info.batch_size
        q, k, v = (t.movedim(d, 0) if d is not None else t.expand(size, *t.shape) for t, d in zip((q, k, v), dims))
        sparse, varlen = args[4], args[5]
        if sparse is None and varlen is None and all(d is None for d in in_dims[3:]):
            b = q.shape[1]
            out, lse = _Eager.apply(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *args)
            return (out.unflatten(0, (size, b)), lse.unflatten(0, (size, b))), (0, 0)
        outs = [_Eager.apply(q[i], k[i], v[i], *args) for i in range(size)]
        return (torch.stack([o for o, _ in outs]), torch.stack([lse for _, lse in outs])), (0, 0)


def _eager_grads(args, q, k, v, out, lse, dout, dlse):
    """:class:`_Eager`'s backward body: ``(dq, dk, dv, None x 7)``."""
    scale, lower, upper, softcap, sparse, varlen, deterministic = args
    if dout is None:
        dout = torch.zeros_like(out)
    if torch._C._are_functorch_transforms_active():
        # torch.func.grad hands the backward its wrapped tensors; the dispatcher ops unwrap them for the kernels
        if varlen is not None:
            dq, dk, dv = _varlen_bwd_op(dout, q, k, v, out, lse, dlse, varlen.cu_q, varlen.cu_k, varlen.max_q,
                                        varlen.max_k, scale, lower, upper, softcap)
        else:
            dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, dlse, scale, lower, upper, softcap, *_side(sparse))
    else:
        dq, dk, dv = dispatch.bwd(dout, q, k, v, out, lse, scale, lower, upper, softcap, dlse=dlse, sparse=sparse,
                                  varlen=varlen, deterministic=deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None


class _NotTwice(torch.autograd.Function):
    """Identity on the gradients :class:`_Eager`'s backward returns while they are themselves differentiated
    (``create_graph=True``): linked to the tensors they depend on, with a backward that raises, so a double
    backward, a Hessian or ``torch.func.grad`` of a grad never reads silent zeros. Inert otherwise (a gradient
    penalty on other parameters still works)."""
    generate_vmap_rule = True         # torch.func's vmap over a first-order grad (jacrev, vmap(grad)) passes here

    @staticmethod
    def forward(dq, dk, dv, *sources):
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("flashring's attention backward is not differentiable: double backward, "
                                  "Hessians and grad of grad are not supported (as in flash-attn)")


def plain_eager() -> bool:
    """True outside torch.compile and torch-dispatch modes (make_fx, FakeTensorMode): there an autograd.Function
    would hide the kernels from the tracer, so those get the custom ops (same kernels). torch.func's grad / vjp /
    vmap take :class:`_Eager` (its setup_context / vmap rules); forward-mode AD (jvp) is not implemented."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0)


def attention(q, k, v, softmax_scale: float, lower: Optional[int], upper: Optional[int], softcap: float,
              sparse: Optional[SparseMeta] = None, deterministic: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` through the custom op (traced) or :class:`_Eager`, on validated inputs (what the public
    functions and the sparse front ends call). ``deterministic=False`` reaches only the eager backward (the only
    one that may differ: ``dispatch.bwd``); traced calls stay deterministic."""
    if plain_eager():
        return _Eager.call(q, k, v, softmax_scale, lower, upper, softcap, sparse, None, deterministic)
    return _fwd_op(q, k, v, softmax_scale, lower, upper, softcap, *_side(sparse))


# ------------------------------------------------------------------------------------------------- variable length
@torch.library.custom_op("flashring::varlen_fwd", mutates_args=())
def _varlen_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   max_q: int, max_k: int, softmax_scale: float, lower: Optional[int], upper: Optional[int],
                   softcap: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return dispatch.fwd(q, k, v, softmax_scale, lower, upper, softcap, varlen=Varlen(cu_q, cu_k, max_q, max_k))


@_varlen_fwd_op.register_fake
def _(q, k, v, *args):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("flashring::varlen_bwd", mutates_args=())
def _varlen_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, dlse: OptT, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                   softmax_scale: float, lower: Optional[int], upper: Optional[int],
                   softcap: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dispatch.bwd(do, q, k, v, out, lse, softmax_scale, lower, upper, softcap, dlse=dlse,
                        varlen=Varlen(cu_q, cu_k, max_q, max_k))


@_varlen_bwd_op.register_fake
def _(do, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *args = inputs
    ctx.save_for_backward(q, k, v, cu_q, cu_k, *output)
    ctx.args = args


def _varlen_backward(ctx, dout, dlse):
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    max_q, max_k, scale, lower, upper, softcap = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _varlen_bwd_op(dout, q, k, v, out, lse, dlse, cu_q, cu_k, max_q, max_k, scale, lower, upper,
                                softcap)
    return (dq, dk, dv) + (None,) * 8


_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup)


# ------------------------------------------------------------------------------------------------- public API
def _autocast(*tensors):
    """Under ``torch.autocast`` attention runs in the autocast dtype, as torch's SDPA does."""
    device = tensors[0].device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)
    return tensors


def _options(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes):
    V.check_dropout(dropout_p)
    V.check_alibi(alibi_slopes)
    V.check_bool(causal, "causal")
    return V.check_scale(softmax_scale, q.shape[-1]), V.check_window(window_size), V.check_softcap(softcap)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Exact attention, FlashAttention-2 algorithm. flash-attn's argument names, order and layout.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads_k, headdim)`` with
            ``nheads % nheads_k == 0`` (MQA/GQA: K/V are never repeated in memory). fp16/bf16 (fp32 accepted and
            computed with fp32 products); headdim 1..256; any seqlen >= 1; any strides.
        dropout_p: must be 0.0 (dropout is not implemented: ``NotImplementedError``, never silently ignored).
        softmax_scale: defaults to ``1/sqrt(headdim)``.
        causal: bottom-right aligned when seqlen_q != seqlen_k (flash-attn >= 2.1), see ``flashring.masks``.
        window_size: ``(left, right)`` sliding window; -1 = unbounded. Query i sees keys
            ``[i + sk - sq - left, i + sk - sq + right]``.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)`` (after scaling), forward and backward.
        alibi_slopes: must be None (``NotImplementedError`` otherwise).
        deterministic: True keeps the opt-in Hopper backward (``FLASHRING_HOPPER_BWD=atomic``, ops/hopper_bwd.py)
            off its atomic dQ; every other backward has no atomics and is bitwise reproducible either way.
        return_attn_probs: if True return ``(out, softmax_lse, None)``; ``softmax_lse`` is ``(batch, nheads,
            seqlen_q)`` fp32 (natural log). A query row that sees no key gets out = 0 and lse = -1e30.
    """
    V.check_qkv(q, k, v)
    scale, window, cap = _options(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
    q, k, v = _autocast(q, k, v)
    lower, upper = flash_bounds(q.shape[1], k.shape[1], causal, window)
    out, lse = attention(q, k, v, scale, lower, upper, cap, deterministic=bool(deterministic))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` on ``qkv`` ``(batch, seqlen, 3, nheads, headdim)``. q, k, v are strided views (no
    copy); autograd writes the gradient into one tensor of qkv's shape."""
    V.check_tensor(qkv, "qkv", 5, "(batch, seqlen, 3, nheads, headdim)")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (batch, seqlen, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_func(*qkv.unbind(2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_func` with ``kv`` ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    V.check_tensor(kv, "kv", 5, "(batch, seqlen_k, 2, nheads_k, headdim)")
    if kv.shape[2] != 2:
        raise ValueError(f"kv must have shape (batch, seqlen_k, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_func(q, *kv.unbind(2), dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def check_cu_seqlens(cu, name: str, total: int, device: torch.device, batch: Optional[int] = None):
    """int32 ``(batch + 1,)`` starting at 0, non-decreasing, ending at ``total``. The value checks read the tensor
    on the host: cu_seqlens are built once per batch, not per layer, and a wrong table would read out of bounds."""
    V.check_tensor(cu, name, 1, "(batch + 1,)")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the inputs are on {device}")
    if cu.shape[0] < 2 or (batch is not None and cu.shape[0] != batch + 1):
        want = "at least 2 entries" if batch is None else f"{batch + 1} entries (batch + 1)"
        raise ValueError(f"{name} must have {want}, got {cu.shape[0]}")
    if plain_eager():          # (not while traced: a host read; fake tensors have no values)
        values = cu.tolist()
        if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must start at 0 and be non-decreasing, got {values[:8]}...")
        if values[-1] != total:
            raise ValueError(f"{name}[-1] = {values[-1]} must equal the number of packed tokens ({total})")
        return max(b - a for a, b in zip(values, values[1:]))
    return None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Attention over a packed batch of variable-length sequences (flash-attn's ``flash_attn_varlen_func``).

    Args:
        q: ``(total_q, nheads, headdim)``; k, v: ``(total_k, nheads_k, headdim)``; sequence b is rows
            ``cu_seqlens[b]:cu_seqlens[b + 1]``. No work is spent on padding.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)``, starting at 0, ending at the totals.
        max_seqlen_q, max_seqlen_k: Python ints >= the longest sequence (a smaller value raises ValueError).
        causal / window_size: per sequence, bottom-right aligned, as :func:`flash_attn_func`.
        block_table: paged K/V is served by :func:`flash_attn_with_kvcache`; must be None here.
    Returns ``out`` ``(total_q, nheads, headdim)``, or ``(out, softmax_lse, None)`` with lse ``(nheads, total_q)``.
    """
    V.check_qkv(q, k, v, ndim=3, layout="(total_tokens, nheads, headdim)")
    scale, window, cap = _options(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes)
    if block_table is not None:
        raise NotImplementedError("block_table (paged K/V) is supported by flash_attn_with_kvcache, not "
                                  "flash_attn_varlen_func; pass None")
    longest_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0], q.device)
    longest_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0], q.device, cu_seqlens_q.shape[0] - 1)
    for name, value, longest in (("max_seqlen_q", max_seqlen_q, longest_q), ("max_seqlen_k", max_seqlen_k,
                                                                             longest_k)):
        V.check_int(value, name, 0)
        if longest is not None and value < longest:
            raise ValueError(f"{name} = {value} is below the longest sequence ({longest}); rows past it would "
                             "never be computed")
    q, k, v = _autocast(q, k, v)
    lower, upper = window_offsets(causal, window)
    if not plain_eager():
        out, lse = _varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, lower,
                                  upper, cap)
    else:
        out, lse = _Eager.call(q, k, v, scale, lower, upper, cap, None,
                                Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), True)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """:func:`flash_attn_varlen_func` on ``qkv`` ``(total, 3, nheads, headdim)``."""
    V.check_tensor(qkv, "qkv", 4, "(total_tokens, 3, nheads, headdim)")
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (total_tokens, 3, nheads, headdim), got {tuple(qkv.shape)}")
    return flash_attn_varlen_func(*qkv.unbind(1), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """:func:`flash_attn_varlen_func` with ``kv`` ``(total_k, 2, nheads_k, headdim)``."""
    V.check_tensor(kv, "kv", 4, "(total_tokens, 2, nheads_k, headdim)")
    if kv.shape[1] != 2:
        raise ValueError(f"kv must have shape (total_tokens, 2, nheads_k, headdim), got {tuple(kv.shape)}")
    return flash_attn_varlen_func(q, *kv.unbind(1), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


# ------------------------------------------------------------------------------------------------- KV cache
def _kvcache_forward(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens: OptT, seqlen: int, cache_batch_idx: OptT,
                     cache_leftpad: OptT, block_table: OptT, softmax_scale: float, lower: Optional[int],
                     upper: Optional[int], softcap: float, rotary_interleaved: bool, rotate_q_per_token: bool,
                     num_splits: int, key_mask: OptT = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Append (and rotate), then attend. ``cache_seqlens`` (int32 (B,)) or, when None, ``seqlen`` for every row:
    the plain decode call then launches nothing but the attention kernel(s)."""
    b, sq = q.shape[:2]
    s_new = 0 if k is None else k.shape[1]
    # the kernels index these densely (a row's entry, a block table's page column)
    cache_seqlens, cache_batch_idx, cache_leftpad, block_table = (
        None if t is None else t.contiguous() for t in (cache_seqlens, cache_batch_idx, cache_leftpad, block_table))
    end = None
    if k is not None and dispatch.on_triton(q):     # one launch (rotary needs k: checked by the caller)
        q, end = kvcache.append_rotate(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens, seqlen, cache_batch_idx,
                                       block_table, rotary_interleaved, rotate_q_per_token)
    elif k is not None or cos is not None:
        lens = (cache_seqlens.long() if cache_seqlens is not None else
                torch.full((b,), seqlen, dtype=torch.long, device=q.device)).unsqueeze(1)
        if k is not None:
            positions = lens + torch.arange(s_new, device=q.device)
            if cos is not None:
                k = kvcache.rotate(k, cos, sin, positions, rotary_interleaved)
            rows = cache_batch_idx if cache_batch_idx is not None else torch.arange(b, device=q.device)
            kvcache.append_(k_cache, v_cache, k, v, positions, rows, block_table)
        if cos is not None:
            steps = torch.arange(sq, device=q.device) if rotate_q_per_token else torch.zeros(sq, dtype=torch.long,
                                                                                               device=q.device)
            q = kvcache.rotate(q, cos, sin, lens + steps, rotary_interleaved)
    if cache_seqlens is None:
        end = seqlen + s_new
    elif end is None:
        end = cache_seqlens + s_new if s_new else cache_seqlens
    return dispatch.decode(q, k_cache, v_cache, cache_leftpad, end, softmax_scale, lower, upper, softcap,
                           block_table, cache_batch_idx, num_splits, key_mask=key_mask)


@torch.library.custom_op("flashring::fwd_kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: OptT, v: OptT, cos: OptT,
                sin: OptT, cache_seqlens: OptT, seqlen: int, cache_batch_idx: OptT, cache_leftpad: OptT,
                block_table: OptT, softmax_scale: float, lower: Optional[int], upper: Optional[int], softcap: float,
                rotary_interleaved: bool, rotate_q_per_token: bool,
                num_splits: int, key_mask: OptT = None) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kvcache_forward(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens, seqlen, cache_batch_idx,
                            cache_leftpad, block_table, softmax_scale, lower, upper, softcap, rotary_interleaved,
                            rotate_q_per_token, num_splits, key_mask)


@_kvcache_op.register_fake
def _(q, *args):
    b, sq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=torch.float32)


def _check_index_tensor(t, name: str, shape, device) -> None:
    V.check_tensor(t, name)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_range(t: torch.Tensor, hi: int, what: str, on_device: dict, name: str) -> None:
    """``0 <= t < hi`` elementwise: a host check on CPU; a CUDA tensor goes into ``on_device`` (name -> (tensor,
    hi)) for one device-side assert over all of a call's index tensors (``kvcache.check_indices``), because a host
    check would stall the queue on every decode step (as torch's own CUDA index ops check their indices on the
    device). Traced calls (torch.compile) skip it."""
    if t.numel() == 0 or not plain_eager():
        return
    if t.is_cuda:
        on_device[name] = (t.contiguous(), hi)
    elif not bool(((t >= 0) & (t < hi)).all()):
        raise ValueError(f"{what}; got values in [{int(t.min())}, {int(t.max())}]")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            key_padding_mask=None):
    """Attention of new queries over a KV cache, flash-attn's ``flash_attn_with_kvcache`` (inference: no backward).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, seqlen_q >= 1 (decode, speculative tokens, chunked prefill).
        k_cache, v_cache: ``(batch_cache, seqlen_cache, nheads_k, headdim)``, or with ``block_table`` a paged cache
            ``(num_pages, page_size, nheads_k, headdim)``, page_size a multiple of 16.
        k, v: optional new keys/values ``(batch, seqlen_new, nheads_k, headdim)``, written into the caches *in
            place* at positions ``cache_seqlens[b] ...`` (rotated by rotary_cos/sin first when given).
        rotary_cos, rotary_sin: ``(seqlen_ro, rotary_dim / 2)``; q and the new k are rotated at their absolute
            positions (with causal or a window each query at its own position, else all at ``cache_seqlens``);
            interleaved pairs (0, 1), (2, 3)... or, with ``rotary_interleaved=False``, halves (GPT-NeoX).
        cache_seqlens: int or int32 ``(batch,)``: keys already in the cache (end index when ``cache_leftpad`` is
            given); default: the whole cache. Attention covers keys ``[cache_leftpad[b], cache_seqlens[b] +
            seqlen_new)``; causal / window are bottom-right aligned to that end.
        cache_batch_idx: int32 ``(batch,)``: the cache row of each batch row (contiguous caches only).
        cache_leftpad: int32 ``(batch,)``: first valid key of each row.
        block_table: int32 ``(batch, max_pages_per_seq)``: page ids of each row's cache (paged KV).
        num_splits: split-KV programs per (row, KV head); 0 chooses from the shape and the SM count.
        key_padding_mask: flashring's addition, bool ``(batch, cache capacity)`` over cache positions (logical
            positions when paged): only keys marked True are attended, within the range above; positions (and so
            causal / window) are unchanged. For padding *between* a row's tokens (e.g. a right-padded prompt
            followed by generated tokens), which ``cache_leftpad`` cannot express. One byte read per key. It
            covers the new ``k`` / ``v`` too: mark their slots (``cache_seqlens`` onwards) True, or they are
            appended but not attended.
    Returns ``out`` ``(batch, seqlen_q, nheads, headdim)``, and ``softmax_lse`` ``(batch, nheads, seqlen_q)`` fp32
    with ``return_softmax_lse=True``. Out-of-range ``cache_seqlens`` / ``cache_leftpad`` / ``cache_batch_idx`` /
    ``block_table`` entries raise ValueError on CPU and trip a device-side assert naming the argument on a GPU (one
    check launch per call, no host sync per decode step).
    """
    V.check_tensor(q, "q", 4, "(batch, seqlen_q, nheads, headdim)")
    paged = block_table is not None
    layout = "(num_pages, page_size, nheads_k, headdim)" if paged else "(batch_cache, seqlen_cache, nheads_k, headdim)"
    V.check_qkv(q, k_cache, v_cache, names=("q", "k_cache", "v_cache"), same_batch=False)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[1] < 1 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be {layout} with a contiguous last dimension")
    V.check_alibi(alibi_slopes)
    V.check_bool(causal, "causal")
    V.check_bool(rotary_interleaved, "rotary_interleaved")
    V.check_bool(return_softmax_lse, "return_softmax_lse")
    scale, window, cap = V.check_scale(softmax_scale, q.shape[-1]), V.check_window(window_size), \
        V.check_softcap(softcap)
    V.check_int(num_splits, "num_splits", 0)
    b, sq = q.shape[:2]
    on_device = {}                  # CUDA index tensors: name -> (tensor, bound), checked in one launch below
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new keys/values to append) or both be None")
    s_new = 0
    if k is not None:
        V.check_qkv(q, k, v, names=("q", "k", "v"))
        if k.shape[0] != b or k.shape[2:] != k_cache.shape[2:]:
            raise ValueError(f"k must have shape (batch, seqlen_new, nheads_k, headdim) = ({b}, S, "
                             f"{k_cache.shape[2]}, {k_cache.shape[3]}), got {tuple(k.shape)}")
        s_new = k.shape[1]
    if paged:
        V.check_tensor(block_table, "block_table", 2, "(batch, max_pages_per_seq)")
        _check_index_tensor(block_table, "block_table", (b, block_table.shape[1]), q.device)
        if k_cache.shape[1] % 16:
            raise ValueError(f"paged KV: the page size (k_cache.shape[1] = {k_cache.shape[1]}) must be a multiple "
                             "of 16")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (the table already maps rows)")
        capacity = block_table.shape[1] * k_cache.shape[1]
        _check_range(block_table, k_cache.shape[0], f"block_table entries must lie in [0, {k_cache.shape[0]})",
                     on_device, "block_table")
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] != b:
            raise ValueError(f"k_cache has {k_cache.shape[0]} rows but q has batch {b}; pass cache_batch_idx to "
                             "pick rows")
    if cache_batch_idx is not None:
        _check_index_tensor(cache_batch_idx, "cache_batch_idx", (b,), q.device)
        _check_range(cache_batch_idx, k_cache.shape[0], f"cache_batch_idx entries must lie in [0, "
                                                        f"{k_cache.shape[0]})", on_device, "cache_batch_idx")
    seqlen = capacity - s_new
    if cache_seqlens is None:
        pass
    elif isinstance(cache_seqlens, (int, torch.SymInt)) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity - s_new:
            raise ValueError(f"cache_seqlens = {cache_seqlens} + {s_new} new tokens exceeds the cache capacity "
                             f"({capacity})")
        seqlen, cache_seqlens = int(cache_seqlens), None
    else:
        _check_index_tensor(cache_seqlens, "cache_seqlens", (b,), q.device)
        _check_range(cache_seqlens, capacity - s_new + 1, f"cache_seqlens entries must lie in [0, {capacity - s_new}] "
                     f"(the cache capacity {capacity} less {s_new} new tokens)", on_device, "cache_seqlens")
    if cache_leftpad is not None:
        _check_index_tensor(cache_leftpad, "cache_leftpad", (b,), q.device)
        _check_range(cache_leftpad, capacity + 1, f"cache_leftpad must lie in [0, {capacity}]", on_device,
                     "cache_leftpad")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need the new k and v to append (flash-attn's contract)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            V.check_tensor(t, name, 2, "(seqlen_ro, rotary_dim / 2)")
        if rotary_cos.shape != rotary_sin.shape or 2 * rotary_cos.shape[1] > q.shape[-1]:
            raise ValueError(f"rotary_cos/rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim <= "
                             f"headdim ({q.shape[-1]}), got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        # queries rotate at cache_seqlens + i with causal / a window: past the new keys when seqlen_q > seqlen_new
        positions = capacity + (max(0, sq - s_new) if causal or window != (-1, -1) else 0)
        if rotary_cos.shape[0] < positions:
            raise ValueError(f"rotary_cos/rotary_sin cover {rotary_cos.shape[0]} positions; the cache holds "
                             f"{capacity}" + (f" and the queries reach position {positions - 1}"
                                              if positions > capacity else ""))
    if key_padding_mask is not None:
        V.check_tensor(key_padding_mask, "key_padding_mask", 2, "(batch, cache capacity)")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool, got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, capacity):
            raise ValueError(f"key_padding_mask must have shape (batch, cache capacity) = ({b}, {capacity}), got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
        key_padding_mask = key_padding_mask.contiguous()
    kvcache.check_indices(b, on_device)
    lower, upper = window_offsets(causal, window)
    # Eager calls skip the dispatcher (a decode step is short enough for its ~50 us of host time to show); the
    # custom op is what torch.compile traces.
    fn = _kvcache_forward if plain_eager() else _kvcache_op
    out, lse = fn(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, seqlen, cache_batch_idx,
                  cache_leftpad, block_table, scale, lower, upper, cap, rotary_interleaved,
                  causal or window != (-1, -1), num_splits, key_padding_mask)
    return (out, lse) if return_softmax_lse else out


# ------------------------------------------------------------------------------------------------- SDPA drop-in
FALLBACKS: Counter = Counter()


def sdpa_fallback_counts() -> Dict[str, int]:
    """How many :func:`scaled_dot_product_attention` calls went to torch's SDPA, by reason (a warning is issued
    the first time each reason occurs)."""
    return dict(FALLBACKS)


def _fallback(reason: str, *args, **kwargs):
    if reason not in FALLBACKS:
        warnings.warn(f"flashring.scaled_dot_product_attention: {reason}; using torch's SDPA for this call (warned "
                      "once per reason; flashring.sdpa_fallback_counts() counts every fallback)", stacklevel=3)
    FALLBACKS[reason] += 1
    return TORCH_SDPA(*args, **kwargs)


def _sdpa_fast_path_refusal(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Optional[str]:
    """Why flashring's kernels cannot serve this call (None: they can). Anything torch would reject goes to torch
    too, so errors are torch's own."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)) or not isinstance(is_causal, bool):
        return "arguments torch's SDPA checks itself"
    if attn_mask is not None:
        return "attn_mask is not supported by the flash kernels"
    if dropout_p:
        return "dropout_p > 0 is not supported by the flash kernels"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "inputs are not 4-D"
    if any(t.dtype not in V.DTYPES for t in (query, key, value)) or not (query.dtype == key.dtype == value.dtype):
        return "this dtype combination is not supported by the flash kernels"
    if any(t.numel() == 0 for t in (query, key, value)):
        return "empty inputs"
    if not (query.shape[0] == key.shape[0] == value.shape[0]):
        return "batch broadcasting"
    if key.shape[2] != value.shape[2] or key.shape[1] != value.shape[1]:
        return "key / value shapes torch's SDPA checks itself"
    if query.shape[-1] > V.MAX_HEADDIM or not (query.shape[-1] == key.shape[-1] == value.shape[-1]):
        return "this head dim is not supported by the flash kernels"
    if not (query.device == key.device == value.device):
        return "inputs on different devices"
    if key.shape[1] != query.shape[1] and not (enable_gqa and query.shape[1] % key.shape[1] == 0):
        return "head counts torch's SDPA checks itself"
    if scale is not None and not (V.is_real(scale) and V.finite_positive(scale)):
        return "a scale that is not a positive finite float"
    if scale is not None and scale < V.MIN_SCALE:
        return "a scale below float32's smallest normal number"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: ``(batch, nheads, seqlen, headdim)``
    layout, torch's *top-left* causal rule, torch's dtypes (autocast included) and errors. flashring's kernels
    serve what they cover; everything else (an ``attn_mask``, dropout, other dtypes or ranks, empty tensors, batch
    broadcasting, a non-positive or non-finite scale, anything torch would reject) goes to torch's own SDPA —
    never back into this function, even when ``F.scaled_dot_product_attention`` has been routed here. Each
    fallback is counted (:func:`sdpa_fallback_counts`) and warned about once per reason."""
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if enable_gqa:
        kwargs["enable_gqa"] = enable_gqa
    reason = _sdpa_fast_path_refusal(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reason is not None:
        return _fallback(reason, query, key, value, **kwargs)
    query, key, value = _autocast(query, key, value)
    # (B, H, S, D) -> (B, S, H, D) as strided views: no copy.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    s = V.check_scale(scale, q.shape[-1], name="scale")
    lower, upper = sdpa_bounds(is_causal)
    out, _ = attention(q, k, v, s, lower, upper, 0.0)
    return out.transpose(1, 2)
