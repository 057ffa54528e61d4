"""Ring attention (Liu, Zaharia, Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context", arXiv:2310.01889) on top of flashring's FlashAttention-2 kernels.

Each of the P ranks of a process group holds a shard of the sequence (q, k, v). The K/V shards travel around the
ring (rank r sends to r+1, receives from r-1) for P steps; at every step each rank runs the flash forward of its
local queries against the K/V block it currently holds and merges the partial result by log-sum-exp. The next
block's transfer is posted before the current block's compute and waited after it, so communication overlaps
compute. The backward runs the ring again: K/V travel as in the forward and the fp32 dK/dV accumulators travel
with them, so after P steps every rank holds the complete dK/dV of its own K/V shard.
"""
from __future__ import annotations

import struct

import torch

from .. import validation as V
from ..masks import EMPTY_ROW_LSE
from ..ops import dispatch
from .comm import RingComm, agree_padded, dtype_code, group_rank_world
from .layout import LAYOUTS, check_layout, step_plan

_KV_TAG, _DKV_TAG = 0, 1          # gloo matches P2P messages by (peer, tag): keep the two backward streams apart


def _pair(a: torch.Tensor, b: torch.Tensor, world: int):
    """K and V as one ring message: stacked ``(2, B, S, Hk, D)`` when they travel (one P2P op per step instead
    of two), the plain pair when nothing moves (world size 1: no copy)."""
    return torch.stack((a, b)) if world > 1 else (a, b)


def merge_partial(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """Fold a partial attention result into a running one, in place.

    out ``(B, S, H, D)`` fp32, lse ``(B, H, S)`` fp32 (running); blk_out/blk_lse the same for one key block.
    new = logaddexp(lse, blk_lse) is computed stably (max + log1p(exp(-|diff|))), and both weights exp(x - new)
    are <= 1, so nothing overflows. EMPTY_ROW_LSE (-1e30) on either side is the identity: its weight is
    exp(-1e30 - x) = 0, and two empty rows stay at -1e30 (fp32 cannot represent -1e30 + log 2 differently).
    """
    new = torch.logaddexp(lse, blk_lse)
    w_run = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)          # (B, H, S) -> (B, S, H, 1)
    w_blk = torch.exp(blk_lse - new).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_run).add_(blk_out.float() * w_blk)
    lse.copy_(new)


def _ring_forward(q, k, v, scale, causal, layout, group, comm_cls=RingComm):
    comm = comm_cls(group, tag=_KV_TAG)
    rank, world = comm.rank, comm.world
    b, s, h, d = q.shape
    out = torch.zeros(b, s, h, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, s), EMPTY_ROW_LSE, dtype=torch.float32, device=q.device)
    kv = _pair(k, v, world)
    for step in range(world):
        if step + 1 < world:
            comm.start(kv)                                   # next block is on its way while we compute this one
        plan = step_plan(rank, (rank - step) % world, causal, layout, s)
        if plan is not None:                                 # skipped steps still forward K/V (done above)
            qs, ks, lower, upper = plan
            # fp32 partials: the merge then rounds to the input dtype once, as the single-device kernel does.
            blk_out, blk_lse = dispatch.fwd(q[:, qs], kv[0][:, ks], kv[1][:, ks], scale, lower, upper,
                                         out_dtype=torch.float32)
            merge_partial(out[:, qs], lse[:, :, qs], blk_out, blk_lse)
        if step + 1 < world:
            kv = comm.wait()
    return out.to(q.dtype), lse


def _ring_backward(dout, dlse, q, k, v, out, lse, scale, causal, layout, group, comm_cls=RingComm):
    kv_comm, dkv_comm = comm_cls(group, tag=_KV_TAG), comm_cls(group, tag=_DKV_TAG)
    rank, world = kv_comm.rank, kv_comm.world
    s = q.shape[1]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = _pair(k, v, world)
    dkv = None
    for step in range(world):
        if step + 1 < world:
            kv_comm.start(kv)
        plan = step_plan(rank, (rank - step) % world, causal, layout, s)
        grads = None
        if plan is not None:
            qs, ks, lower, upper = plan
            # Global out/lse (not the step's partial ones): P = exp(s - lse_global) and delta = rowsum(dO * O)
            # make this block's gradients exactly its share of the full-sequence gradients.
            # The Triton backward indexes lse/dlse as contiguous (B, H, S): copy the (small) slices.
            dq_s, dk_s, dv_s = dispatch.bwd(dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs],
                                         lse[:, :, qs].contiguous(), scale, lower, upper,
                                         dlse=None if dlse is None else dlse[:, :, qs].contiguous(),
                                         grad_dtype=torch.float32)
            dq[:, qs] += dq_s
            grads = (ks, dk_s, dv_s)
        # The dK/dV accumulator of the block we hold arrives from rank-1 (it left there one step ago and moved
        # while we computed); add our share and pass it on. Step 0's block is our own: start from zeros.
        if step == 0:
            dkv = torch.zeros((2,) + tuple(k.shape), dtype=torch.float32, device=k.device)   # (2, B, S, Hk, D)
        else:
            dkv = dkv_comm.wait()
        if grads is not None:
            ks, dk_s, dv_s = grads
            dkv[0][:, ks] += dk_s
            dkv[1][:, ks] += dv_s
        if world > 1:
            dkv_comm.start(dkv)
        if step + 1 < world:
            kv = kv_comm.wait()
    if world > 1:
        # After P steps the accumulator we sent last is our right neighbour's complete dK/dV, and the one that
        # arrives is ours: it started here at step 0 and collected every rank's share on the way round.
        dkv = dkv_comm.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingAttnFn(torch.autograd.Function):
    """``(out, lse)`` of ring attention on validated shards; ``comm_cls`` = :class:`RingComm`, or
    ``LoopbackComm`` to time the compute alone."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, layout, group, comm_cls=RingComm):
        out, lse = _ring_forward(q, k, v, scale, causal, layout, group, comm_cls)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, causal, layout, group, comm_cls)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, layout, group, comm_cls = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _ring_backward(dout, dlse, q, k, v, out, lse, scale, causal, layout, group, comm_cls)
        return dq, dk, dv, None, None, None, None, None


def _validate(q, k, v, causal, softmax_scale, layout):
    V.check_qkv(q, k, v)
    scale = V.check_scale(softmax_scale, q.shape[-1])
    V.check_bool(causal, "causal")
    check_layout(layout)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"q and k/v must hold the same local sequence shard (ring self-attention), got seqlen "
                         f"{q.shape[1]} for q and {k.shape[1]} for k/v")
    if layout == "zigzag" and q.shape[1] % 2 != 0:
        raise ValueError(f"layout='zigzag' needs an even local seqlen (each rank holds two chunks of the "
                         f"sequence), got {q.shape[1]}; use layout='contiguous' or pad the sequence")
    return scale


def ring_flash_attn_func(q, k, v, causal=False, softmax_scale=None, group=None, layout="zigzag",
                         return_attn_probs=False):
    """Exact attention over a sequence sharded across the ranks of ``group`` (ring attention).

    Args:
        q: this rank's shard ``(batch, seqlen_local, nheads, headdim)``; k, v: ``(batch, seqlen_local, nheads_k,
            headdim)`` with ``nheads % nheads_k == 0`` (GQA/MQA). fp16/bf16/fp32, headdim 1..256. Shards come
            from :func:`shard_sequence` with the same ``layout``; all ranks pass the same shapes and options.
        causal: causal mask over the *global* sequence positions.
        softmax_scale: defaults to ``1/sqrt(headdim)``.
        group: a ``torch.distributed`` process group (default: the world). Not initialised -> one process.
        layout: ``"zigzag"`` (rank r holds chunks r and 2P-1-r of 2P; balances causal work; needs an even
            ``seqlen_local``) or ``"contiguous"`` (rank r holds the r-th 1/P slice; any ``seqlen_local``).
        return_attn_probs: if True return ``(out, softmax_lse, None)``, lse ``(batch, nheads, seqlen_local)``
            fp32 natural-log (gradients through it are supported).

    Shapes, dtypes and options are compared across ranks (one small all_gather) before any ring step, so a
    mismatch raises ValueError on every rank instead of hanging. Partial results are merged in fp32; gradients
    accumulate in fp32 and are cast to the inputs' dtype at the end.
    """
    err, scale = None, None
    try:
        scale = _validate(q, k, v, causal, softmax_scale, layout)
    except (TypeError, ValueError) as e:
        err = e
    _, world = group_rank_world(group)
    if world == 1:
        if err is not None:
            raise err
    else:
        fields = [] if err is not None else [
            ("batch", q.shape[0]), ("seqlen_local", q.shape[1]), ("nheads", q.shape[2]), ("headdim", q.shape[3]),
            ("nheads_k", k.shape[2]), ("dtype", dtype_code(q.dtype)), ("layout", LAYOUTS.index(layout)),
            ("causal", int(causal)), ("softmax_scale (float64 bits)", struct.unpack("<q", struct.pack("<d", scale))[0]),
            ("device type", 1 if q.is_cuda else 0)]
        agree_padded("ring_flash_attn_func", fields, err, group, q.device if err is None else None)
    out, lse = RingAttnFn.apply(q, k, v, scale, causal, layout, group)
    return (out, lse, None) if return_attn_probs else out
