"""Dynamic sparse flash attention (Pagliardini, Paliotta, Jaggi, Fleuret 2023: "Faster Causal Attention Over Large
Sequences Through Sparse Flash Attention").

Two patterns, both exact attention restricted to a per-head, per-batch-row, data-dependent set of (query, key) pairs,
computed by the dense kernels' sparse mode (``flashring.ops.flash``, ``ops.sparse_ranges``) with no complexity overhead:

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

import operator
from typing import Optional

import torch

from .. import validation as V
from ..interface import attention, plain_eager
from ..ops import dispatch, partition
from ..ops.sparse_ranges import PAD_POS, SparseMeta

__all__ = ["qk_sparse_attn_func", "hash_sparse_attn_func", "sparse_attn_compact_func", "lsh_buckets",
           "lsh_rotations"]


# ------------------------------------------------------------------------------------------------- validation
def _check_side(x, name, like, kind, values=True, hi=PAD_POS):
    """``x`` must be (batch, seqlen, nheads) matching tensor ``like`` (batch, seqlen, nheads, headdim), bucket ids
    in ``[0, hi)``. ``values=False`` skips the range check (the caller guards it on the device, _bucket_guard)."""
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
        if values and x.numel():
            lo, top = (int(t) for t in torch.aminmax(x))          # one reduction; a host sync on a GPU
            if lo < 0 or top >= hi:
                raise ValueError(f"{name} must hold bucket ids in [0, {hi}), got range [{lo}, {top}]")


def _bucket_guard(sorted_ids, name, hi=PAD_POS):
    """Range check of bucket ids already sorted per (batch, head) (B, H, S): only the two ends are looked at.

    CPU tensors were checked on the host (_check_side: a clear ValueError, and no GPU queue to drain). On a GPU a
    host-side check is a sync per call: it drains the queue, so every later launch of the call (~30) is exposed on
    the GPU timeline, which at S = 4k cost more than the sparse kernel itself. There the check stays on the device,
    as torch's own index ops (gather, embedding) check their ids on CUDA: a device-side assert naming the
    argument, never a silent wrong result (ids past int32 would alias after the int32 cast).
    """
    if sorted_ids.device.type == "cpu":
        return
    # (B, H, 1 or 2): min and max, widened: PAD_POS compared with an int16 tensor wraps to 0 (a false assert)
    ends = sorted_ids[..., ::max(sorted_ids.shape[-1] - 1, 1)].long()
    torch._assert_async(((ends >= 0) & (ends < hi)).all(), f"{name} must hold bucket ids in [0, {hi})")


def _check_common(q, k, v, causal, softmax_scale):
    V.check_qkv(q, k, v)
    V.check_bool(causal, "causal")
    return V.check_scale(softmax_scale, q.shape[-1])


# ------------------------------------------------------------------------------------------------- slot order
# The front ends describe each (batch, head)'s tokens in slot order (kept, or (bucket, position), first) as a
# full-length permutation, ``SparseMeta.q_rows`` / ``k_rows``; the kernels read q, k, v, dout and write out, lse,
# dq, dk, dv through it, so nothing is gathered into slot order and back (those copies were 8 of a hash-sparse
# forward+backward's 15 launches, and the call was host-bound: session 9's profile). Never a (B, max len, H)
# prefix: sizing it needs max(len) on the host, a sync that drains the GPU queue. Slots past a head's length
# (dropped tokens) cost little: the kernels see range rows [0, 0, 0, 0] there and write out 0 / EMPTY_ROW_LSE and
# zero gradients at those tokens' rows.
def _positions(perm, valid, shift):
    """Slot -> original position (+ causal shift) as contiguous int32 (B, H, S), the layout the kernels index;
    ``valid`` (bool, broadcastable) marks the slots inside each head's length, the rest get PAD_POS."""
    pos = perm + shift if shift else perm
    return _int32(pos if valid is None else torch.where(valid, pos, PAD_POS))


def _int32(x):
    # Cast and make contiguous in one copy: tensors derived from the (B, S, H) inputs' transposed views keep
    # their (B, S, H) strides. (``to`` returns an int32 input as it is, whatever memory_format says: int32 bucket
    # ids stayed transposed and the kernels read them with the wrong strides -- found in review.)
    return x.contiguous() if x.dtype == torch.int32 else x.to(torch.int32, memory_format=torch.contiguous_format)


def _causal_shifts(q, k, causal, strict: int = 0):
    """Offsets added to query / key positions so that query i sees key j iff ``j + k_shift <= i + q_shift``
    (bottom-right causal; ``strict``: j < i). Both stay >= 0: the tile-range builder packs (bucket, position) into
    one sort key, where a negative position would borrow from the bucket (a query at -1 read as the previous
    bucket's), so when seqlen_q > seqlen_k or strict the keys move up instead of the queries down."""
    if not causal:
        return 0, 0
    shift = k.shape[1] - q.shape[1] - strict
    base = max(0, -shift)
    return shift + base, base


def _partition_takes(ids, n_keys, keep=False) -> bool:
    """Whether the front ends order ``ids``' tokens by ``ops.partition``'s kernels: on the kernels' path, in plain
    eager calls (torch.compile and make_fx trace the torch ops instead; torch.func's wrapped tensors have no storage
    a kernel could read), where :func:`ops.partition.applies`."""
    return (dispatch.on_triton(ids) and plain_eager() and not torch._C._are_functorch_transforms_active()
            and partition.applies(n_keys, ids.shape[1], keep))


def _compact(keep, shift):
    """QK-sparse: a stable partition per (batch, head), kept tokens first in position order, then the dropped.

    keep (B, S, H) bool -> perm (slot -> token, (B, H, S) int64, contiguous), lens (B, H) int32, pos (B, H, S)
    int32. Kernels: a counting sort with two keys (``ops.partition``, 2 launches); the chunked CPU path: cumsum +
    scatter (one scan) rather than a segmented argsort.
    """
    if _partition_takes(keep, 2, keep=True):
        perm, lens, pos, _, _ = partition.partition(keep, 2, shift, keep=True)
        return perm, lens, pos
    kt = keep.transpose(1, 2)                                                   # (B, H, S) view
    ar = torch.arange(kt.shape[-1], device=keep.device)
    rank = kt.cumsum(-1)                                                        # kept tokens up to here, int64
    lens = rank[..., -1:]                                                       # (B, H, 1)
    inv = torch.where(kt, rank - 1, lens + (ar - rank))       # kept: rank - 1; dropped: lens + dropped before
    perm = torch.empty(inv.shape, dtype=inv.dtype, device=inv.device).scatter_(-1, inv, ar.expand_as(inv))
    return perm, _int32(lens.squeeze(-1)), _positions(perm, ar < lens, shift)


def _sort_by_bucket(ids, name, hi=PAD_POS):
    """Stable sort of bucket ids ``(..., B, H, S)`` along S: perm (int64, contiguous), lens ``(B, H)`` int32 (all
    S) and the sorted ids as contiguous int32; ids outside ``[0, hi)`` fail the device guard."""
    ids, perm = torch.sort(ids, dim=-1, stable=True)
    _bucket_guard(ids, name, hi)
    lens = torch.full(perm.shape[-3:-1], perm.shape[-1], dtype=torch.int32, device=perm.device)
    return perm.contiguous(), lens, _int32(ids)


def _bucket_sort(buckets, shift, name, hi=PAD_POS):
    """Hash-sparse: tokens sorted by (bucket, position) per (batch, head) (stable sort of the ids).

    buckets (B, S, H) -> perm (B, H, S) int64; lens (B, H) int32 (all S); pos, bkt (B, H, S) int32.
    """
    perm, lens, ids = _sort_by_bucket(buckets.transpose(1, 2), name, hi)
    return perm, lens, _positions(perm, None, shift), ids


def _bucket_partition(buckets, n_buckets, shift, name):
    """:func:`_bucket_sort` by a counting sort (``ops.partition``: 2 launches) for ids known to lie in
    ``[0, n_buckets)``; a GPU checks that on the device (CPU tensors were checked on the host)."""
    perm, lens, pos, bkt, bad = partition.partition(buckets, n_buckets, shift, keep=False)
    if bad.is_cuda and bad.numel():
        torch._assert_async(bad.max() == 0, f"{name} must hold bucket ids in [0, num_buckets = {n_buckets})")
    return perm, lens, pos, bkt


def _bucket_sorts(q_buckets, k_buckets, q_shift, k_shift, num_buckets=None):
    """Both sides' :func:`_bucket_sort`: by :func:`_bucket_partition` when ``num_buckets`` bounds the ids (and
    ``ops.partition`` takes it) on the kernels' path, else as one sort of the two stacked when their shapes match
    (self-attention without GQA): torch.sort cost ~0.3 ms of host time per call on the H100 machines, where a
    hash-sparse forward+backward was host-bound (2.9 ms host, 1.3 ms GPU; session 9's profile)."""
    hi = PAD_POS if num_buckets is None else num_buckets
    if _partition_takes(q_buckets, num_buckets) and _partition_takes(k_buckets, num_buckets):
        q_side = _bucket_partition(q_buckets, num_buckets, q_shift, "q_buckets")
        if k_buckets is q_buckets:          # shared-QK models hash once: the same order, positions moved by the shift
            perm, lens, pos, bkt = q_side
            return q_side, (perm, lens, pos + (k_shift - q_shift) if k_shift != q_shift else pos, bkt)
        return q_side, _bucket_partition(k_buckets, num_buckets, k_shift, "k_buckets")
    if q_buckets.shape != k_buckets.shape:
        return _bucket_sort(q_buckets, q_shift, "q_buckets", hi), _bucket_sort(k_buckets, k_shift, "k_buckets", hi)
    wide = torch.promote_types(q_buckets.dtype, k_buckets.dtype)      # never narrowed: the guard sees true ids
    both = torch.stack([q_buckets.to(wide), k_buckets.to(wide)]).transpose(2, 3)     # (2, B, H, S) view
    perm, lens, ids = _sort_by_bucket(both, "q_buckets / k_buckets", hi)
    return tuple((perm[i], lens, _positions(perm[i], None, shift), ids[i])
                 for i, shift in enumerate((q_shift, k_shift)))


def _sparse_call(q, k, v, scale, causal, q_side, k_side, return_attn_probs):
    """Shared tail of the front ends: q_side / k_side = (perm, lens, pos, bkt or None). Dropped queries' rows get
    out 0 / EMPTY_ROW_LSE from the kernels (the slots past their head's length)."""
    (q_perm, q_len, q_pos, q_bkt), (k_perm, k_len, k_pos, k_bkt) = q_side, k_side
    meta = SparseMeta(q_pos, k_pos, q_len, k_len, q_bkt, k_bkt, causal, q_perm, k_perm)
    out, lse = attention(q, k, v, scale, None, None, 0.0, meta)
    return (out, lse, None) if return_attn_probs else out


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
        elif ln.dtype.is_floating_point or ln.dtype.is_complex or ln.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor of row counts, got {ln.dtype}")
        elif ln.numel() and (int(ln.min()) < 0 or int(ln.max()) > s):
            raise ValueError(f"{name} entries must lie in [0, {s}]")
        lens.append(ln.to(device=q.device, dtype=torch.int32).contiguous())
    q_len, k_len = lens
    # (B, S', H) -> (B, H, S') int32, PAD_POS past each head's length.
    _side = lambda x, ln: _positions(x.transpose(1, 2).long(),  # noqa: E731
                                     torch.arange(x.shape[1], device=x.device) < ln.unsqueeze(-1), 0)
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
    out, lse = attention(q, k, v, scale, None, None, 0.0, meta)
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
    q_shift, k_shift = _causal_shifts(q, k, causal)
    q_side = _compact(q_keep, q_shift) + (None,)
    k_side = _compact(k_keep, k_shift) + (None,)
    return _sparse_call(q, k, v, scale, causal, q_side, k_side, return_attn_probs)


def hash_sparse_attn_func(q, k, v, q_buckets, k_buckets, causal=True, softmax_scale=None, return_attn_probs=False,
                          strict_causal=False, num_buckets=None):
    """Attention restricted to (query, key) pairs in the same bucket (and j <= i when causal).

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``; k, v: ``(batch, seqlen_k, nheads_k, headdim)``.
        q_buckets ``(batch, seqlen_q, nheads)``, k_buckets ``(batch, seqlen_k, nheads_k)``: integer ids in
            ``[0, 2**30)`` (checked on the host for CPU tensors, by a device-side assert on a GPU).
    Causal: query i sees key j <= i only if they share a bucket; with q and k bucketed by the same hash of the
    same token (self-attention) the diagonal shares a bucket, so no causal row is empty.
    ``strict_causal=True`` (with causal): j < i, no token attends to itself, as in Pagliardini et al.'s
    shared-QK language models (a query's own key would always share its bucket); a query with no earlier key in
    its bucket (the first one, at least) outputs 0 with LSE -1e30.
    ``num_buckets`` (optional int): the ids lie in ``[0, num_buckets)`` (``lsh_buckets(x, n)``: n). Given (and
    <= 128, and per-row count tables that stay small: ``ops.partition.applies``), the kernels' path orders tokens
    by a counting sort instead of torch.sort (fewer launches, less host time); ids outside it are a ValueError
    (CPU) or a device-side assert (GPU), as any out-of-range id is.
    """
    scale = _check_common(q, k, v, causal, softmax_scale)
    V.check_bool(strict_causal, "strict_causal")
    if strict_causal and not causal:
        raise ValueError("strict_causal=True needs causal=True")
    if num_buckets is not None:
        if isinstance(num_buckets, bool) or not hasattr(num_buckets, "__index__"):
            raise TypeError(f"num_buckets must be an int or None, got {type(num_buckets).__name__}")
        num_buckets = operator.index(num_buckets)
    if num_buckets is not None and not 1 <= num_buckets <= PAD_POS:
        raise ValueError(f"num_buckets must lie in [1, {PAD_POS}], got {num_buckets}")
    on_cpu = q.device.type == "cpu"
    hi = PAD_POS if num_buckets is None else num_buckets
    _check_side(q_buckets, "q_buckets", q, "int", values=on_cpu, hi=hi)
    _check_side(k_buckets, "k_buckets", k, "int", values=on_cpu, hi=hi)
    # a query at (shifted) position p sees keys at positions <= p; strict: <= p - 1
    q_shift, k_shift = _causal_shifts(q, k, causal, int(strict_causal))
    q_side, k_side = _bucket_sorts(q_buckets, k_buckets, q_shift, k_shift, num_buckets)
    return _sparse_call(q, k, v, scale, causal, q_side, k_side, return_attn_probs)


# ------------------------------------------------------------------------------------------------- LSH
def _check_buckets(n_buckets) -> None:
    # angular LSH takes the argmax over [xR, -xR]: a bucket count is 2 x (rotated dims), so even and >= 2
    if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be an even int >= 2, got {n_buckets!r}")


def lsh_rotations(nheads: int, headdim: int, n_buckets: int, generator: Optional[torch.Generator] = None,
                  device=None, dtype=torch.float32, unit_norm: bool = False) -> torch.Tensor:
    """Random Gaussian projections ``(nheads, headdim, n_buckets // 2)`` for angular LSH. With a CPU ``generator``
    they are drawn on the CPU (a seed gives the same buckets on every device); otherwise on ``device`` itself, so a
    training step draws fresh rotations without a host-to-device copy (and stays capturable in a CUDA graph).
    ``unit_norm``: each projection direction scaled to length 1 (Pagliardini et al.'s released code), so no
    direction wins the argmax by its length alone."""
    V.check_bool(unit_norm, "unit_norm")
    _check_buckets(n_buckets)
    for name, value in (("nheads", nheads), ("headdim", headdim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    on = generator.device if generator is not None else torch.device(device or "cpu")
    r = torch.randn(nheads, headdim, n_buckets // 2, generator=generator, dtype=torch.float32, device=on)
    if unit_norm:
        r = r / r.norm(dim=1, keepdim=True)
    return r.to(device=device, dtype=dtype)


def lsh_buckets(x, n_buckets: int, rotations: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, unit_norm: bool = False) -> torch.Tensor:
    """Angular LSH per head: bucket = argmax over ``[xR, -xR]`` (Andoni et al. 2015, as in Reformer).

    x ``(batch, seqlen, nheads, headdim)`` -> int64 buckets ``(batch, seqlen, nheads)`` in ``[0, n_buckets)``.
    Pass the same ``rotations`` (or a generator seeded the same) for queries and keys so they share buckets;
    ``unit_norm`` applies to rotations drawn here (see :func:`lsh_rotations`).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("x must be a (batch, seqlen, nheads, headdim) tensor")
    _check_buckets(n_buckets)
    if rotations is None:
        rotations = lsh_rotations(x.shape[2], x.shape[3], n_buckets, generator, device=x.device, unit_norm=unit_norm)
    elif tuple(rotations.shape) != (x.shape[2], x.shape[3], n_buckets // 2):
        raise ValueError(f"rotations must have shape (nheads, headdim, n_buckets // 2) = "
                         f"{(x.shape[2], x.shape[3], n_buckets // 2)}, got {tuple(rotations.shape)}")
    proj = torch.einsum("bshd,hdr->bshr", x.float(), rotations.to(x.device, torch.float32))
    return torch.cat([proj, -proj], dim=-1).argmax(dim=-1)
