"""Hopper (sm_90) dense forward in Gluon: TMA loads by a producer warp, wgmma by two consumer warpgroups.

On by default on sm_90 at head dims 64 and 128, causal or not, at every length (:func:`wanted`;
``FLASHRING_HOPPER_FWD=0`` turns it off, ``=1`` takes every call it applies to); the portable Triton kernel
(``ops.flash``) serves every case this one does not take (:func:`applies`).

One program per SM walks 128-row query tiles of (batch, head) pairs (:func:`_tile`; persistent: the next tile's
Q and first K/V tiles load during this one's epilogue). Without a mask the tiles are equal and each program takes
every P-th; causal tiles differ in length, so the producer draws the next one from a counter whenever its program
is free, in an order that runs the longest rows first inside groups of pairs whose K/V fits in L2
(:func:`head_group`). Against one program per tile (H100, CUDA-graph replays, session 12): 1.03-1.38x without a
mask at 512-4k tokens, 1.00-1.04x at 8k-16k (session 11); causal 1.06-1.26x at D=128 for 512-8k tokens (0.99x at
16k) and 1.07-1.34x at D=64 for 512-16k. Each program has two Q
buffers (tile i+1's Q loads while tile i runs; the buffer also stages tile i's output for its TMA store) and a
2-stage K/V ring whose stages and phases run on across its tiles. A 1-warp producer fills the ring by TMA
(K-ready and V-ready mbarriers apart, so S = Q K^T starts before V lands; one "empty" barrier per stage with
one arrival per consumer) and hands each tile's index to the consumers in a shared-memory slot beside its Q
buffer. Two 4-warp consumer warpgroups of 64 rows each run S = Q K^T by wgmma, the
online softmax in registers (base 2, scale folded in), and O += P V by wgmma with P in registers. Causal masks
only the tiles that cross the diagonal.

Measured (benchmarks/gluon_fwd.py, H100, CUDA-graph replays; BENCHMARKS.md sessions 7 and 11): 1.12-1.28x the
portable forward at D=128, N >= 4k, and 0.99-1.18x at D=64, N >= 8k; against cuDNN 0.78-1.12x at D=128 (cuDNN's own
time for one shape moved by 20% between runs). Tried in session 11 and not kept (benchmarks/NOTES.md): FA3's
intra-warpgroup order as written first (S_j+1 and P_j V_j issued together): ptxas 12.8 and 12.9 hoisted the wait
on P_j V_j to the top of softmax_j+1, so little overlapped, and it ran 0-12% slower; a ping-pong turnstile
between the warpgroups: -11% to +3%; P through shared memory: 21-35% slower; 3 K/V stages: -3% to +2%; half of
the exponentials as a degree-3 polynomial on the FMA pipes (FA4's trick): 2-9% slower, as issue slots rather than
the MUFU unit limit the softmax on Hopper. Then in session 12: the FA3 order with a wait that ptxas cannot hoist
(an inline-PTX ``wgmma.wait_group`` predicated on the row sums; all 66 exponentials of a tile between the two waits
in the SASS) ran at 0.65-0.93x this kernel; as a patch in ``results/h100-gluon-fwd-overlap-20261207.patch``.

The tensors are flash-attn's ``(B, S, H, D)``, contiguous, seen by TMA as 2-D ``(B*S, H*D)`` with a ``(64 or
128, D)`` box at column ``h*D``; ``S % 128 == 0`` keeps every box inside one batch. Non-finite values follow the
library's rule (a row is NaN exactly when it may see a non-finite key or value): in the one diagonal tile per
warpgroup, value rows with an inf/NaN are zeroed in shared memory before P V (a masked pair's 0 * NaN would
reach rows that cannot see that key) and the rows at or after the first such key (strictly causal: after it) are
set to NaN at the end.
Each warpgroup scans half of the rows, both meet at an mbarrier before either writes, then (only if a row is bad)
both write the same zeros, each fencing its own writes before its own wgmma.

Dynamic sparse mode (:func:`sparse_fwd`; on by default since session 16, ``FLASHRING_HOPPER_SPARSE_FWD=0`` turns
it off): q, k, v read in each head's slot order (dropped tokens' slots zero) either through the row tables by the
producer (GATHER, cp.async: the default at D=64, :func:`gather_wanted`) or from copies (D=128), each tile's key
range from ``sparse_ranges.tile_ranges``, the tiles outside its fully visible range masked by :func:`sparse_keep`,
rows that see nothing (or dropped slots) out 0 with the empty-row LSE, tiles drawn from the counter (their lengths
differ); non-finite values are not scanned for. H100 (session 16, 16k, D=64): 1.05-1.16x the portable row-table
forward with GATHER (session 15, copies: the kernel 1.2-1.3x, the call 0.63-1.02x).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

from .flash import EMPTY_LSE_C, NO_KEY_C
from .launch import Launcher, sm_count
from .sparse_ranges import SparseMeta, scatter_rows, slot_copy, slot_return, tile_ranges

try:        # Gluon and its Hopper ops: triton >= 3.5; absent or different elsewhere, and then unused
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    AVAILABLE = True
except ImportError:                                                     # pragma: no cover - depends on triton
    AVAILABLE = False

BLOCK_M = 128           # two warpgroups x 64 rows
BLOCK_N = 128
NUM_STAGES = 2          # 196 KB of shared memory at D=128 (two Q buffers); 3 stages no longer fit there (262 KB;
                        # with one Q buffer they measured within noise, sessions 7 and 11)
PERSISTENT = True       # one program per SM (launch_args)
L2_GROUP_BYTES = 16 << 20   # K and V of the (batch, head) pairs a causal walk interleaves (head_group): a third of
                            # the H100's 50 MB L2
ENV = "FLASHRING_HOPPER_FWD"
# Strictly causal calls (the band's upper = -1: query i sees keys j < i, the first query nothing) on these kernels
# and hopper_bwd's (session 13; False sends them to the portable kernels). H100, the paper recipe's attention core
# at 16k (12 layers, fwd + bwd, CUDA graphs): 80.4 ms per step against 108.7 on the portable kernels and 80.6 for
# plain causal (benchmarks/results/h100-attention-share-paper-16k-20261207-0dca822-strict-hopper.jsonl).
STRICT_CAUSAL = True


# Where it runs without the opt-in: head dims at which it beat the portable forward (H100). D=128: 1.08-1.27x at
# N >= 4k, 1.11x / 0.98x at 1k (session 8). D=64: 0.92-1.06x in session 8, then 0.99-1.19x at 8k-16k once the scale
# rode in the exponent's FMA (session 11, with the same change in the portable kernel). Causal calls of every
# length since session 12 (the counter walk and the split diagonal scan; CUDA-graph replays on one H100, Gluon /
# portable, causal: D=64 1.08x at 512, 1.06x at 1k, 1.13x at 4k; D=128 1.20x at 512, 1.27x at 1k, 1.24-1.26x at
# 2k-16k). Before, causal calls took the portable kernel below 8k (D=64) / 2k (D=128).
DEFAULT_HEAD_DIMS = (64, 128)


def wanted(head_dim: int) -> bool:
    """``FLASHRING_HOPPER_FWD``: ``1`` = every call :func:`applies` accepts, ``0`` = none, unset = the head dims in
    :data:`DEFAULT_HEAD_DIMS` (today the same as ``1``: :func:`applies` takes only those)."""
    mode = os.environ.get(ENV, "")
    if mode in ("0", "1"):
        return mode == "1"
    return head_dim in DEFAULT_HEAD_DIMS


def enabled(device: torch.device, head_dim: int) -> bool:
    """:func:`wanted`, Gluon imports, and ``device`` is an sm_90 GPU."""
    return (wanted(head_dim) and AVAILABLE and device.type == "cuda"
            and torch.cuda.get_device_capability(device) == (9, 0))


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 16-byte aligned address (what TMA descriptors need), copied only when it is not."""
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lower: Optional[int], upper: Optional[int],
            softcap: float) -> bool:
    """Whether this kernel computes the call: bf16/fp16, head dim 64 or 128, contiguous ``(B, S, H, D)`` at
    16-byte aligned addresses (TMA descriptors need them; a view at an odd element offset is contiguous but not
    aligned), equal query and key lengths that are multiples of 128, full, causal or (:data:`STRICT_CAUSAL`)
    strictly causal attention without softcap (no window, no sparse or varlen front end: those callers do not come
    here). The backward adds its own limits (``hopper_bwd.applies``)."""
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        return False
    if q.dim() != 4 or q.shape[-1] not in (64, 128) or k.shape != v.shape or k.shape[-1] != q.shape[-1]:
        return False
    b, s, h, d = q.shape
    if k.shape[0] != b or k.shape[1] != s or s % BLOCK_M or h % k.shape[2]:
        return False
    if not all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (q, k, v)):
        return False
    return softcap == 0 and lower is None and (upper in (None, 0) or (upper == -1 and STRICT_CAUSAL))


if AVAILABLE:
    @gluon.jit
    def _softmax_tile(s, start_n, rows, row_lo, cols0, m_i, l_i, qk_scale, CAUSAL: gl.constexpr,
                      STRICT: gl.constexpr, EMPTY: gl.constexpr = False):
        """Online softmax of one score tile in base 2: ``(p, alpha, m, l)``; ``row_lo`` = the rows' first. The
        scale rides in the exponent's FMA (m is kept in scaled units; the scale is > 0, so the max commutes with
        it): one FP32 instruction per score less than a multiply and a subtract; 1-6% faster at D=128 (one point of
        12 read 5% slower) and 4-11% at D=64 in three H100 runs (benchmarks/NOTES.md, session 11). STRICT (with
        CAUSAL): keys j < i; the sequence's first row sees no key, so its max stays -inf and is shifted by 0; EMPTY:
        the same for any row (sparse tiles may hide every key from a row)."""
        BN: gl.constexpr = s.shape[1]
        if CAUSAL:
            if start_n + BN - 1 > row_lo - STRICT:   # only tiles that reach past the first row are masked
                s = gl.where(rows[:, None] - STRICT >= (start_n + cols0)[None, :], s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        if STRICT or EMPTY:
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(gl.fma(s, qk_scale, -m_use[:, None]))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_i

    @gluon.jit
    def sparse_side(ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, row, blk, n_blk, N_CTX, HASH: gl.constexpr):
        """A sparse program's block ``blk`` of (batch, head) ``row``: its ``(lo, mid_lo, mid_hi, hi)`` (the block's
        entry of ``sparse_ranges.tile_ranges``, ``n_blk`` blocks per row), the row's side tensors offset to it, and
        the kept counts ``(q_n, k_n)``. One query head per K/V head: both sides share the row."""
        r = ranges + (row.to(gl.int64) * n_blk + blk) * 4
        at = row.to(gl.int64) * N_CTX
        if HASH:
            q_bkt += at
            k_bkt += at
        return (gl.load(r), gl.load(r + 1), gl.load(r + 2), gl.load(r + 3), q_pos + at, k_pos + at, q_bkt, k_bkt,
                gl.load(q_len + row), gl.load(k_len + row))

    @gluon.jit
    def sparse_keep(x, qi, kj, q_pos, k_pos, q_bkt, k_bkt, q_n, k_n, other, SP_CAUSAL: gl.constexpr,
                    HASH: gl.constexpr):
        """``x`` where query slot ``qi`` may see key slot ``kj`` (both broadcast to x's shape), else ``other``: the
        fast path of ``masks.sparse_visible`` on the slots' original positions and buckets; slots past the kept
        counts see nothing. Only the tiles outside a block's ``[mid_lo, mid_hi)`` come here (sparse forward and
        ``hopper_bwd``'s kernels)."""
        keep = (qi < q_n) & (kj < k_n)
        if SP_CAUSAL:
            keep = keep & (gl.load(k_pos + kj) <= gl.load(q_pos + qi))
        if HASH:
            keep = keep & (gl.load(k_bkt + kj) == gl.load(q_bkt + qi))
        return gl.where(keep, x, other)

    GATHER_VEC = gl.constexpr(int(os.environ.get("FLASHRING_GATHER_VEC", "8")))
    GATHER_AHEAD = gl.constexpr(os.environ.get("FLASHRING_GATHER_AHEAD", "1") == "1")

    @gluon.jit
    def gather_rows_async(smem, base, rows, slot0, count, row_stride, NUM_WARPS: gl.constexpr):
        """cp.async of a slot-order tile ``smem`` (``[M, D]``) from the rows of a (batch, head) whose row 0 is at
        ``base``: slot ``slot0 + i`` from row ``rows[slot0 + i]`` (``row_stride`` elements apart), the slots at or
        past ``count`` zero-filled (dropped tokens: a masked pair's zero weight times an inf in such a row would
        reach the kept rows of its tile). Hopper's TMA has no row gather; this reads the rows where the sparse
        front ends left them instead of a copy into slot order (GATHER). Issued in pieces of two 16-byte vectors
        per thread (32 rows at D=64, 16 at D=128 for a 4-warp producer): with 40-48 registers the producer
        compiles without stack at D=64 (triton 3.6; the backward's at D=128 gets 24, the consumers need 240 there,
        and spills 88-184 B). Completion: :func:`gathered` on the tile's barrier; the consumers fence the proxies
        after their wait (cp.async writes through the generic proxy, wgmma reads through the async one;
        FlashAttention-3's cp.async paths leave the fence out, the PTX ISA asks for it; one instruction a tile).
        Triton puts a partition barrier between the pieces (its shared-memory hazard pass sees the slices of one
        buffer as overlapping): 3-7 per tile, to be timed."""
        M: gl.constexpr = smem.shape[0]
        D: gl.constexpr = smem.shape[1]
        TPR: gl.constexpr = D // 8                          # threads per row, one 16-byte vector each
        VEC: gl.constexpr = GATHER_VEC if D <= 64 else 2     # 16-byte vectors per thread and piece
        CHUNK: gl.constexpr = min(32 * NUM_WARPS * VEC // TPR, M)   # rows per piece
        gl.static_assert(M % CHUNK == 0, "whole pieces")
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NUM_WARPS, 1], [1, 0])
        cols = gl.arange(0, D, gl.SliceLayout(0, layout))
        for c in gl.static_range(M // CHUNK):
            slots = slot0 + c * CHUNK + gl.arange(0, CHUNK, gl.SliceLayout(1, layout))
            r = gl.load(rows + slots)
            async_copy.async_copy_global_to_shared(smem.slice(c * CHUNK, CHUNK, dim=0),
                                                   base + (r * row_stride)[:, None] + cols[None, :],
                                                   mask=(slots < count)[:, None])

    @gluon.jit
    def gather_values_async(smem, base, rows, slot0, count, NUM_WARPS: gl.constexpr):
        """:func:`gather_rows_async` for one fp32 value per slot (``smem`` ``[M]``: LSE or delta rows at ``base``,
        the (batch, head)'s row 0), slots at or past ``count`` 0."""
        M: gl.constexpr = smem.shape[0]
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
        slots = slot0 + gl.arange(0, M, layout)
        async_copy.async_copy_global_to_shared(smem, base + gl.load(rows + slots), mask=slots < count)

    @gluon.jit
    def gathered(bar):
        """``bar`` (initialised with a count of 1, as for TMA) completes its phase once every cp.async this
        partition has issued so far has landed: each thread's asynchronous arrive-on (its pending count + 1, taken
        back when its copies land), then one arrival for the partition (after its threads' increments)."""
        async_copy.mbarrier_arrive(bar)
        mbarrier.arrive(bar, count=1)

    @gluon.jit
    def store_rows(x, staging, out, rows, slot0, row_stride, NUM_WARPS: gl.constexpr):
        """A slot-order result tile ``x`` (``[M, D]``, cast) written straight to its rows: slot ``slot0 + i`` to
        ``out + rows[slot0 + i] * row_stride`` (``out`` and ``rows`` at the (batch, head)'s row 0 and table), through
        ``staging`` (an idle ``[M, D]`` shared buffer of this partition's: the layout change to 16-byte row stores
        without a scratch buffer of its own, which at D=128 would not fit beside the forward's ring)."""
        M: gl.constexpr = x.shape[0]
        D: gl.constexpr = x.shape[1]
        TPR: gl.constexpr = D // 8
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NUM_WARPS, 1], [1, 0])
        staging.store(x)
        y = staging.load(layout)
        r = gl.load(rows + slot0 + gl.arange(0, M, gl.SliceLayout(1, layout)))
        cols = gl.arange(0, D, gl.SliceLayout(0, layout))
        gl.store(out + (r * row_stride)[:, None] + cols[None, :], y)

    @gluon.jit
    def zero_rows(out, rows, slot0, row_stride, M: gl.constexpr, D: gl.constexpr, NUM_WARPS: gl.constexpr):
        """Zeros to the ``M`` rows that slots ``slot0 ...`` stand for (``out`` and ``rows`` at the (batch, head)'s row
        0 and table; 16-byte stores, 32 rows per piece): the output or gradients of a tile whose every slot is a
        dropped token, written without the tile going through the pipeline (:func:`dropped_tile`)."""
        TPR: gl.constexpr = D // 8
        CHUNK: gl.constexpr = min(32, M)
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NUM_WARPS, 1], [1, 0])
        cols = gl.arange(0, D, gl.SliceLayout(0, layout))
        zero = gl.zeros([CHUNK, D], out.dtype.element_ty, layout)
        for c in gl.static_range(M // CHUNK):
            r = gl.load(rows + slot0 + c * CHUNK + gl.arange(0, CHUNK, gl.SliceLayout(1, layout)))
            gl.store(out + (r * row_stride)[:, None] + cols[None, :], zero)

    @gluon.jit
    def dropped_tile(slot0, count):
        """Whether the tile of slots from ``slot0`` lies wholly past a (batch, head)'s kept count: QK-sparse's
        dropped tokens (drop 0.8: 80% of the tiles). Such a tile has no visible pair, its results are zeros (and
        the empty-row LSE), so the kernels write those and skip it: each costs ~3.5 us of pipeline hand-offs and
        global-memory round trips otherwise, which at 4k tokens (H100, session 17) was most of the sparse
        kernels' time at drop 0.8 (forward 0.146 ms, 20% of dense's for 4% of its pairs)."""
        return slot0 >= count

    @gluon.jit
    def _nonfinite_rows(v_tile, start_n, ZERO: gl.constexpr, NUM_WARPS: gl.constexpr):
        """The first key of ``v_tile`` (shared memory) whose value row holds an inf or NaN (else a large number);
        ZERO: also overwrite those rows with zeros. Read in 32-row slices (at most 32 values per thread live)."""
        BN: gl.constexpr = v_tile.shape[0]
        CHUNK: gl.constexpr = 32
        layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
        first = start_n * 0 + NO_KEY_C
        for c in gl.static_range(BN // CHUNK):
            part = v_tile.slice(c * CHUNK, CHUNK, dim=0)
            x = part.load(layout)
            bad = gl.sum(x.to(gl.float32) * 0.0, axis=1) != 0.0         # 0 * x is NaN exactly at inf / NaN
            keys = start_n + c * CHUNK + gl.arange(0, CHUNK, gl.SliceLayout(1, layout))
            first = gl.minimum(first, gl.min(gl.where(bad, keys, NO_KEY_C), axis=0))
            if ZERO:
                if gl.max(bad.to(gl.int32), axis=0) > 0:
                    part.store(gl.where(bad[:, None], gl.zeros_like(x), x))
        return first

    @gluon.jit
    def _put_scalar(slot, x, NUM_WARPS: gl.constexpr):
        """``x`` (int32) into the one-element shared-memory ``slot``, from a partition of NUM_WARPS warps (every
        thread writes the same value)."""
        slot.store(gl.full([1], x, gl.int32, gl.BlockedLayout([1], [32], [NUM_WARPS], [0])))

    @gluon.jit
    def _diagonal_values(v_tile, start_n, scan_bar, scan_smem, phase, WG: gl.constexpr, NUM_WARPS: gl.constexpr):
        """The diagonal tile's value rows made safe for P V: each warpgroup scans half of the rows for the first
        non-finite key and leaves its answer in ``scan_smem`` (a slot pair per ``phase``, so that a warpgroup
        already on its next tile cannot overwrite what the other still reads); after the scan barrier (both
        arrive, once per tile) both take the smaller; then, only if there is one, zero the bad rows (each
        warpgroup all of them: the same zeros) and fence the writes before this warpgroup's wgmma reads them.
        Scanning halves rather than each warpgroup all 128 rows: causal forwards 1.05-1.09x at 512-1k tokens,
        1.02x at 4k (H100, session 12)."""
        HALF: gl.constexpr = v_tile.shape[0] // 2
        mine = _nonfinite_rows(v_tile.slice(WG * HALF, HALF, dim=0), start_n + WG * HALF, False, NUM_WARPS)
        slots = scan_smem.index(phase)
        _put_scalar(slots.slice(WG, 1, dim=0), mine, NUM_WARPS)
        mbarrier.arrive(scan_bar, count=1)        # after a partition barrier: every thread's store is in
        mbarrier.wait(scan_bar, phase)
        first = gl.min(slots.load(gl.BlockedLayout([1], [32], [NUM_WARPS], [0])), axis=0)
        if first < NO_KEY_C:
            _nonfinite_rows(v_tile, start_n, True, NUM_WARPS)
        fence_async_shared()              # the zeros before this warpgroup's wgmma (the async proxy) reads V
        return first

    @gluon.jit
    def _tile(t, N_M, H, GROUP, N_CTX, HEAD_GROUP, BH, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
              CAUSAL: gl.constexpr):
        """Tile ``t`` of the flat order: (batch, head) pairs in groups of ``HEAD_GROUP``, query blocks slower than
        the pairs of a group (causal: the longest rows first), so that the tiles run in order of length inside a
        group whose K/V fits in L2 (:func:`head_group`; ``HEAD_GROUP`` = 1 walks a head's blocks one after the
        other). Returns ``(start_m, q_row0, kv_row0, q_col, kv_col, lse_row, n_hi, b * H + h)`` in the 2-D
        ``(B*S, H*D)`` views (S % BLOCK_M == 0)."""
        g0 = (t // (HEAD_GROUP * N_M)) * HEAD_GROUP
        in_group = gl.minimum(HEAD_GROUP, BH - g0)          # the last group may be short
        r = t - g0 * N_M
        start_m = r // in_group
        hb = g0 + r % in_group
        if CAUSAL:
            start_m = N_M - 1 - start_m
        h = hb % H
        b = hb // H
        q_row0 = b * N_CTX + start_m * BLOCK_M
        if CAUSAL:
            n_hi = (start_m + 1) * BLOCK_M
        else:
            n_hi = N_CTX
        return (start_m, q_row0, b * N_CTX, h * HEAD_DIM, (h // GROUP) * HEAD_DIM, (b.to(gl.int64) * H + h) * N_CTX,
                n_hi, hb)

    @gluon.jit
    def _read_tile(tile_smem, buf, NUM_WARPS: gl.constexpr):
        """The tile index the producer left in slot ``buf`` (after the wait on that slot's Q barrier)."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
        return gl.max(tile_smem.index(buf).load(layout), axis=0)

    @gluon.jit
    def _consumer(WG: gl.constexpr, q_smem, k_smem, v_smem, tile_smem, q_bar, q_empty, k_ready, v_ready, kv_empty,
                  scan_bar, scan_smem, desc_o, lse_ptr, qk_scale, N_CTX, N_M, H, GROUP, N_TILES, HEAD_GROUP, BH,
                  ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, o_ptr, q_rows, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                  STRICT: gl.constexpr, SPARSE: gl.constexpr, SP_CAUSAL: gl.constexpr, HASH: gl.constexpr,
                  GATHER: gl.constexpr):
        """One consumer warpgroup: 64 query rows of each of this program's tiles. SPARSE (:func:`sparse_fwd`; not
        CAUSAL): a tile's key range from ``ranges``, the tiles outside its ``[mid_lo, mid_hi)`` masked by
        :func:`sparse_keep`; a row that sees no key (or a slot past its head's kept count) gets out 0 and the
        library's empty-row LSE. Non-finite values are not scanned for (the arithmetic decides, as in
        ``hopper_bwd``). GATHER (with SPARSE): out and lse go straight to their rows (``o_ptr``: the row-order
        output; ``q_rows``: the slot -> row tables) instead of a slot-order TMA store."""
        WG_M: gl.constexpr = BLOCK_M // 2
        NW: gl.constexpr = gl.num_warps()
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        s_row: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_row: gl.constexpr = gl.SliceLayout(1, o_layout)
        s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout)
        cols0 = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
        kv_it = 0                       # K/V tiles consumed so far: the ring's stage and phase run across tiles
        n_done = 0                      # this program's tiles so far: Q buffer and barrier phases
        mbarrier.wait(q_bar.index(0), 0)
        if GATHER:
            fence_async_shared()        # cp.async (generic proxy) wrote the tile, wgmma (async proxy) reads it
        t = _read_tile(tile_smem, 0, NW)
        while t < N_TILES:              # the producer ends the walk with an index >= N_TILES
            start_m, q_row0, kv_row0, q_col, kv_col, lse_row, n_hi, hb = _tile(t, N_M, H, GROUP, N_CTX, HEAD_GROUP,
                                                                               BH, BLOCK_M, HEAD_DIM, CAUSAL)
            if SPARSE:
                n_lo, mid_lo, mid_hi, n_hi, sq_pos, sk_pos, sq_bkt, sk_bkt, q_n, k_n = sparse_side(
                    ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, hb, start_m, N_M, N_CTX, HASH)
                n_it = (n_hi - n_lo + BLOCK_N - 1) // BLOCK_N
            else:
                n_lo = 0
                n_it = n_hi // BLOCK_N
            buf = n_done % 2
            q = q_smem.index(2 * buf + WG)
            m_i = gl.full([WG_M], float("-inf"), gl.float32, s_row)
            l_i = gl.full([WG_M], 0.0, gl.float32, s_row)
            acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, o_layout)
            row_lo = start_m * BLOCK_M + WG * WG_M
            rows = row_lo + gl.arange(0, WG_M, s_row)
            bad_from = N_CTX                # rows at or after this key index may see a non-finite value
            for it in range(n_it):
                stage = kv_it % NUM_STAGES
                phase = (kv_it // NUM_STAGES) & 1
                start_n = n_lo + it * BLOCK_N
                mbarrier.wait(k_ready.index(stage), phase)
                if GATHER:
                    fence_async_shared()
                s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
                if SPARSE:
                    if (start_n < mid_lo) or (start_n >= mid_hi):
                        s = sparse_keep(s, rows[:, None], (start_n + cols0)[None, :], sq_pos, sk_pos, sq_bkt, sk_bkt,
                                        q_n, k_n, float("-inf"), SP_CAUSAL=SP_CAUSAL, HASH=HASH)
                p, alpha, m_i, l_i = _softmax_tile(s, start_n, rows, row_lo, cols0, m_i, l_i, qk_scale, CAUSAL,
                                                   STRICT, EMPTY=SPARSE)
                acc = acc * gl.convert_layout(alpha, o_row)[:, None]
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                mbarrier.wait(v_ready.index(stage), phase)
                if GATHER:
                    fence_async_shared()
                if CAUSAL:
                    # the diagonal tile (the last, for both warpgroups, as BLOCK_M == BLOCK_N): masked pairs meet
                    # these values; one scan-barrier phase per tile
                    if start_n + BLOCK_N - 1 > row_lo - STRICT:
                        first = _diagonal_values(v_smem.index(stage), start_n, scan_bar, scan_smem, n_done & 1, WG,
                                                 NW)
                        bad_from = gl.minimum(bad_from, first)
                o_tok = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
                mbarrier.arrive(kv_empty.index(stage), count=1)
                kv_it += 1

            # epilogue: normalise, stage through this warpgroup's (now idle) Q buffer, TMA store, then hand the
            # buffer back to the producer (the tile after next loads its Q there)
            if STRICT or SPARSE:        # a row that saw no key: out 0, the library's empty-row LSE
                l_safe = gl.where(l_i == 0.0, 1.0, l_i)
            else:
                l_safe = l_i
            l_o = gl.convert_layout(l_safe, o_row)
            out = acc / l_o[:, None]
            if CAUSAL:                  # rows that may see the first non-finite key (STRICT: those after it)
                rows_o = row_lo + gl.arange(0, WG_M, o_row)
                out = gl.where((rows_o - STRICT >= bad_from)[:, None], float("nan"), out)
            if SPARSE:                  # slots past the kept count (a mid tile does not mask them) stand for dropped
                out = gl.where((row_lo + gl.arange(0, WG_M, o_row) < q_n)[:, None], out, 0.0)      # rows
            if GATHER:                  # (batch, head) row 0 of the output (rows H * D apart) and its row table
                o_row0 = o_ptr + ((hb // H).to(gl.int64) * N_CTX * H + hb % H) * HEAD_DIM
                store_rows(out.to(dtype), q, o_row0, q_rows + lse_row, row_lo, H * HEAD_DIM, NW)
            else:
                q.store(out.to(dtype))
                fence_async_shared()
                tma.async_copy_shared_to_global(desc_o, [q_row0 + WG * WG_M, q_col], q)
            lse = (m_i + gl.log2(l_safe)) * 0.6931471805599453    # natural log (scores carried log2(e) * scale)
            if STRICT:
                lse = gl.where(l_i == 0.0, EMPTY_LSE_C, lse)
            if SPARSE:
                lse = gl.where((l_i == 0.0) | (rows >= q_n), EMPTY_LSE_C, lse)
            if GATHER:
                gl.store(lse_ptr + lse_row + gl.load(q_rows + lse_row + rows), lse)
            else:
                gl.store(lse_ptr + lse_row + rows, lse)
                tma.store_wait(pendings=0)
            mbarrier.arrive(q_empty.index(buf), count=1)
            n_done += 1
            mbarrier.wait(q_bar.index(n_done % 2), (n_done // 2) & 1)
            if GATHER:
                fence_async_shared()
            t = _read_tile(tile_smem, n_done % 2, NW)

    @gluon.jit
    def fill_kv_stage(k_smem, v_smem, k_ready, v_ready, kv_empty, desc_k, desc_v, row, col, i,
                      NUM_STAGES: gl.constexpr):
        """A producer's step (this forward's and ``hopper_bwd``'s dQ kernel): the K and V boxes at ``(row, col)``
        into slot ``i % NUM_STAGES`` of the ring once both consumers have released it (fresh mbarriers count as
        "phase 1 complete": waiting on phase ^ 1 lets the first NUM_STAGES fills through)."""
        stage = i % NUM_STAGES
        mbarrier.wait(kv_empty.index(stage), ((i // NUM_STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(stage), desc_k.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [row, col], k_ready.index(stage), k_smem.index(stage))
        mbarrier.expect(v_ready.index(stage), desc_v.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_v, [row, col], v_ready.index(stage), v_smem.index(stage))

    @gluon.jit
    def gather_kv_stage(k_smem, v_smem, k_ready, v_ready, kv_empty, k_base, v_base, rows, slot0, count, row_stride,
                        i, NUM_STAGES: gl.constexpr):
        """:func:`fill_kv_stage` reading rows through a slot -> row table (:func:`gather_rows_async`; GATHER): slots
        ``slot0 ...`` of K and V into slot ``i % NUM_STAGES`` of the ring, those at or past ``count`` zero."""
        stage = i % NUM_STAGES
        mbarrier.wait(kv_empty.index(stage), ((i // NUM_STAGES) & 1) ^ 1)
        gather_rows_async(k_smem.index(stage), k_base, rows, slot0, count, row_stride, gl.num_warps())
        gathered(k_ready.index(stage))
        gather_rows_async(v_smem.index(stage), v_base, rows, slot0, count, row_stride, gl.num_warps())
        gathered(v_ready.index(stage))

    @gluon.jit
    def gather_kv_loop(k_smem, v_smem, k_ready, v_ready, kv_empty, k_base, v_base, rows, n_lo, n_it, count,
                       row_stride, N_CTX, kv_it, NUM_STAGES: gl.constexpr):
        """A producer's K / V tiles ``n_lo, n_lo + BLOCK_N, ...`` (``n_it`` of them) gathered into the ring from slot
        ``kv_it`` on; returns the ring position after them. GATHER_AHEAD (one piece per tile: D=64): each tile's
        row-table entries are loaded once for K and V, and the next tile's while this one's copies are in flight
        (before the wait for its stage), so no row-table round trip stands between a free stage and its copies;
        else :func:`gather_kv_stage` per tile."""
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        D: gl.constexpr = k_smem.shape[2]
        NW: gl.constexpr = gl.num_warps()
        TPR: gl.constexpr = D // 8
        if GATHER_AHEAD and D <= 64 and BLOCK_N * TPR <= 32 * NW * GATHER_VEC:
            layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NW, 1], [1, 0])
            cols = gl.arange(0, D, gl.SliceLayout(0, layout))
            slots = n_lo + gl.arange(0, BLOCK_N, gl.SliceLayout(1, layout))
            r = gl.load(rows + slots, mask=slots < N_CTX, other=0)
            for it in range(n_it):
                stage = kv_it % NUM_STAGES
                offs = (r * row_stride)[:, None] + cols[None, :]
                keep = (slots < count)[:, None]
                mbarrier.wait(kv_empty.index(stage), ((kv_it // NUM_STAGES) & 1) ^ 1)
                async_copy.async_copy_global_to_shared(k_smem.index(stage), k_base + offs, mask=keep)
                gathered(k_ready.index(stage))
                async_copy.async_copy_global_to_shared(v_smem.index(stage), v_base + offs, mask=keep)
                gathered(v_ready.index(stage))
                slots += BLOCK_N
                r = gl.load(rows + slots, mask=slots < N_CTX, other=0)      # the next tile's, ahead
                kv_it += 1
        else:
            for it in range(n_it):
                gather_kv_stage(k_smem, v_smem, k_ready, v_ready, kv_empty, k_base, v_base, rows, n_lo + it * BLOCK_N,
                                count, row_stride, kv_it, NUM_STAGES)
                kv_it += 1
        return kv_it

    @gluon.jit
    def _next_tile(counter_ptr, n_drawn, DYNAMIC: gl.constexpr):
        """This program's next tile: drawn from the launch's counter (DYNAMIC: whichever program is free takes the
        next tile in order, as the hardware's block scheduler would) or the static stride ``pid + n_drawn * P``."""
        if DYNAMIC:
            t = gl.atomic_add(counter_ptr, 1)
        else:
            t = gl.program_id(0) + n_drawn * gl.num_programs(0)
        return t


    @gluon.jit
    def _load_tile(q_smem, k_smem, v_smem, tile_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, desc_q, desc_k,
                   desc_v, t, start_m, q_row0, kv_row0, q_col, kv_col, hb, n_lo, n_it, q_n, k_len, N_CTX, H, q_ptr,
                   k_ptr, v_ptr, q_rows, k_rows, n_done, kv_it, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                   NUM_STAGES: gl.constexpr, GATHER: gl.constexpr):
        """The producer's hand-off of tile ``t`` (its ``n_done``-th): once its Q buffer is free, the tile index into
        the slot beside it, Q, then its ``n_it`` K / V tiles from ``n_lo`` into the ring from position ``kv_it``;
        returns the ring position after them."""
        WG_M: gl.constexpr = BLOCK_M // 2
        BLOCK_N: gl.constexpr = k_smem.shape[1]
        buf = n_done % 2
        # fresh mbarriers count as "phase 1 complete": waiting on phase ^ 1 lets the first use of each through
        mbarrier.wait(q_empty.index(buf), ((n_done // 2) & 1) ^ 1)
        _put_scalar(tile_smem.index(buf), t, gl.num_warps())     # read by the consumers after the Q barrier
        if GATHER:                  # the (batch, head)'s row 0 (rows H * D apart), row tables and kept counts
            at = hb.to(gl.int64) * N_CTX
            row0 = ((hb // H).to(gl.int64) * N_CTX * H + hb % H) * HEAD_DIM
            for w in gl.static_range(2):
                gather_rows_async(q_smem.index(2 * buf + w), q_ptr + row0, q_rows + at,
                                  start_m * BLOCK_M + w * WG_M, q_n, H * HEAD_DIM, gl.num_warps())
            gathered(q_bar.index(buf))
            kv_it = gather_kv_loop(k_smem, v_smem, k_ready, v_ready, kv_empty, k_ptr + row0, v_ptr + row0,
                                   k_rows + at, n_lo, n_it, gl.load(k_len + hb), H * HEAD_DIM, N_CTX, kv_it,
                                   NUM_STAGES)
        else:
            mbarrier.expect(q_bar.index(buf), 2 * desc_q.block_type.nbytes)
            for w in gl.static_range(2):
                tma.async_copy_global_to_shared(desc_q, [q_row0 + w * WG_M, q_col], q_bar.index(buf),
                                                q_smem.index(2 * buf + w))
            for it in range(n_it):
                fill_kv_stage(k_smem, v_smem, k_ready, v_ready, kv_empty, desc_k, desc_v,
                              kv_row0 + n_lo + it * BLOCK_N, kv_col, kv_it, NUM_STAGES)
                kv_it += 1
        return kv_it

    @gluon.jit
    def _producer(q_smem, k_smem, v_smem, tile_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, desc_q, desc_k,
                  desc_v, counter_ptr, N_CTX, N_M, H, GROUP, N_TILES, HEAD_GROUP, BH, ranges, q_len, k_len, q_ptr,
                  k_ptr, v_ptr, q_rows, k_rows, o_ptr, lse_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr,
                  SPARSE: gl.constexpr, GATHER: gl.constexpr, SKIP_DROPPED: gl.constexpr):
        """The producer (1 warp; 4 with GATHER): draws the tiles, loads each one's Q and its K / V tiles by TMA or
        (GATHER, with SPARSE; one query head per K/V head) by cp.async through the row tables ``q_rows`` / ``k_rows``
        from the row-order tensors at ``q_ptr`` / ``k_ptr`` / ``v_ptr``. SKIP_DROPPED (with SPARSE;
        :func:`skip_dropped`): a tile of dropped slots only (:func:`dropped_tile`) never reaches the consumers; the
        producer writes its results itself: the empty-row LSE (``lse_ptr``; slot order, or GATHER: through the row
        table) and, GATHER, zero output rows (``o_ptr``; with copies the copy back zeroes dropped rows without
        reading them)."""
        kv_it = 0
        n_done = 0                  # tiles handed to the consumers
        n_drawn = 0                 # tiles drawn (SPARSE: dropped ones too)
        t = _next_tile(counter_ptr, n_drawn, DYNAMIC)
        while t < N_TILES:
            start_m, q_row0, kv_row0, q_col, kv_col, lse_row, n_hi, hb = _tile(t, N_M, H, GROUP, N_CTX, HEAD_GROUP,
                                                                               BH, BLOCK_M, HEAD_DIM, CAUSAL)
            if SPARSE:                  # the tile's key range (sparse_ranges.tile_ranges), as the consumers read it
                r = ranges + (hb.to(gl.int64) * N_M + start_m) * 4
                n_lo = gl.load(r)
                n_it = (gl.load(r + 3) - n_lo + BLOCK_N - 1) // BLOCK_N
                q_n = gl.load(q_len + hb)
                if SKIP_DROPPED:
                    if dropped_tile(start_m * BLOCK_M, q_n):
                        slots_layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
                        slots = start_m * BLOCK_M + gl.arange(0, BLOCK_M, slots_layout)
                        empty = gl.full([BLOCK_M], EMPTY_LSE_C, gl.float32, slots_layout)
                        if GATHER:
                            at = hb.to(gl.int64) * N_CTX
                            row0 = ((hb // H).to(gl.int64) * N_CTX * H + hb % H) * HEAD_DIM
                            zero_rows(o_ptr + row0, q_rows + at, start_m * BLOCK_M, H * HEAD_DIM, BLOCK_M, HEAD_DIM,
                                      gl.num_warps())
                            gl.store(lse_ptr + lse_row + gl.load(q_rows + at + slots), empty)
                        else:
                            gl.store(lse_ptr + lse_row + slots, empty)
                    else:
                        kv_it = _load_tile(q_smem, k_smem, v_smem, tile_smem, q_bar, q_empty, k_ready, v_ready,
                                           kv_empty, desc_q, desc_k, desc_v, t, start_m, q_row0, kv_row0, q_col,
                                           kv_col, hb, n_lo, n_it, q_n, k_len, N_CTX, H, q_ptr, k_ptr, v_ptr, q_rows,
                                           k_rows, n_done, kv_it, BLOCK_M, HEAD_DIM, NUM_STAGES, GATHER)
                        n_done += 1
                else:
                    kv_it = _load_tile(q_smem, k_smem, v_smem, tile_smem, q_bar, q_empty, k_ready, v_ready, kv_empty,
                                       desc_q, desc_k, desc_v, t, start_m, q_row0, kv_row0, q_col, kv_col, hb, n_lo,
                                       n_it, q_n, k_len, N_CTX, H, q_ptr, k_ptr, v_ptr, q_rows, k_rows, n_done, kv_it,
                                       BLOCK_M, HEAD_DIM, NUM_STAGES, GATHER)
                    n_done += 1
            else:
                kv_it = _load_tile(q_smem, k_smem, v_smem, tile_smem, q_bar, q_empty, k_ready, v_ready, kv_empty,
                                   desc_q, desc_k, desc_v, t, start_m, q_row0, kv_row0, q_col, kv_col, hb, 0,
                                   n_hi // BLOCK_N, N_CTX, k_len, N_CTX, H, q_ptr, k_ptr, v_ptr, q_rows, k_rows,
                                   n_done, kv_it, BLOCK_M, HEAD_DIM, NUM_STAGES, GATHER)
                n_done += 1
            n_drawn += 1
            t = _next_tile(counter_ptr, n_drawn, DYNAMIC)
        buf = n_done % 2            # the end of the walk: an index >= N_TILES in the next slot, no Q load
        mbarrier.wait(q_empty.index(buf), ((n_done // 2) & 1) ^ 1)
        _put_scalar(tile_smem.index(buf), t, gl.num_warps())
        mbarrier.arrive(q_bar.index(buf), count=1)

    @gluon.jit
    def _attn_fwd_hopper(desc_q, desc_k, desc_v, desc_o, lse_ptr, counter_ptr, sm_scale, N_CTX, H, GROUP, N_TILES,
                         HEAD_GROUP, ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, q_ptr, k_ptr, v_ptr, o_ptr,
                         q_rows, k_rows, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                         NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, DYNAMIC: gl.constexpr,
                         STRICT: gl.constexpr, SPARSE: gl.constexpr, SP_CAUSAL: gl.constexpr, HASH: gl.constexpr,
                         GATHER: gl.constexpr, SKIP_DROPPED: gl.constexpr):
        """P programs walk :func:`_tile`'s order: program i takes tiles i, i + P, i + 2P..., or (DYNAMIC) the next
        tile of a counter whenever it is free (``counter_ptr``: an int32 zero). P is one per tile or, persistent,
        one per SM (the next tile's Q and first K/V tiles load during this one's epilogue). The producer draws
        the tiles and hands each one's index to the consumers in a shared-memory slot beside its Q buffer."""
        gl.static_assert(gl.num_warps() == 4, "two 4-warp consumer partitions plus the default one")
        gl.static_assert(SPARSE or not GATHER, "GATHER reads through a sparse call's row tables")
        WG_M: gl.constexpr = BLOCK_M // 2
        dtype: gl.constexpr = desc_q.dtype
        qk_scale = sm_scale * 1.4426950408889634
        N_M = N_CTX // BLOCK_M

        q_smem = gl.allocate_shared_memory(dtype, [4, WG_M, HEAD_DIM], desc_q.layout)    # 2 tiles x 2 warpgroups
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        scan_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        tile_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        scan_smem = gl.allocate_shared_memory(gl.int32, [2, 2], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        BH = N_TILES // N_M
        mbarrier.init(scan_bar, count=2)                   # both warpgroups have scanned the diagonal values
        for i in gl.static_range(2):
            mbarrier.init(q_bar.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)       # both warpgroups' outputs have left the buffer
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)      # one arrival per consumer warpgroup
        fence_async_shared()          # the TMA unit (async proxy) signals these barriers: initialised first

        # Argument tuples are built inline: a tuple assigned to a local turns its constexprs into tensors.
        gl.warp_specialize([
            (_consumer, (0, q_smem, k_smem, v_smem, tile_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, scan_bar,
                         scan_smem, desc_o, lse_ptr, qk_scale, N_CTX, N_M, H, GROUP, N_TILES, HEAD_GROUP, BH,
                         ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, o_ptr, q_rows, BLOCK_M, BLOCK_N, HEAD_DIM,
                         NUM_STAGES, CAUSAL, STRICT, SPARSE, SP_CAUSAL, HASH, GATHER)),
            (_consumer, (1, q_smem, k_smem, v_smem, tile_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, scan_bar,
                         scan_smem, desc_o, lse_ptr, qk_scale, N_CTX, N_M, H, GROUP, N_TILES, HEAD_GROUP, BH,
                         ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, o_ptr, q_rows, BLOCK_M, BLOCK_N, HEAD_DIM,
                         NUM_STAGES, CAUSAL, STRICT, SPARSE, SP_CAUSAL, HASH, GATHER)),
            (_producer, (q_smem, k_smem, v_smem, tile_smem, q_bar, q_empty, k_ready, v_ready, kv_empty, desc_q,
                         desc_k, desc_v, counter_ptr, N_CTX, N_M, H, GROUP, N_TILES, HEAD_GROUP, BH, ranges, q_len,
                         k_len, q_ptr, k_ptr, v_ptr, q_rows, k_rows, o_ptr, lse_ptr, BLOCK_M, BLOCK_N, HEAD_DIM,
                         NUM_STAGES, CAUSAL, DYNAMIC, SPARSE, GATHER, SKIP_DROPPED)),
        ], [4, 4 if GATHER else 1], [240, 32] if not GATHER else [232, 48])
        # Registers (64,512 per program at 384 threads, counted per warpgroup): consumers need ~232-240 (128
        # spills); the producer addresses and draws tiles (24 spilled 24 B at D=64 causal), so consumer 0 (the
        # default partition, given the rest) has 232; no spills in either (compile_probe, triton 3.6). GATHER: a
        # 4-warp producer with 48 (its cp.async addresses; 40 spills 8 B at D=64) leaves consumer 0 224, enough at
        # D=64 (no stack); D=128: 56 B, outside the MMA loops.

        mbarrier.invalidate(scan_bar)
        for i in gl.static_range(2):
            mbarrier.invalidate(q_bar.index(i))
            mbarrier.invalidate(q_empty.index(i))
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(k_ready.index(i))
            mbarrier.invalidate(v_ready.index(i))
            mbarrier.invalidate(kv_empty.index(i))


@functools.lru_cache(maxsize=None)
def shared_layout(box: Tuple[int, ...], dtype) -> "gl.NVMMASharedLayout":
    """The NVMMA shared-memory layout of a TMA box of ``dtype`` (a Gluon dtype), built once: ``get_default_for``
    costs ~7 us of host time (CPU box), and a forward + backward build 17 descriptors per call."""
    return gl.NVMMASharedLayout.get_default_for(list(box), dtype)


def head_group(seqlen: int, head_dim: int, itemsize: int) -> int:
    """How many (batch, head) pairs :func:`_tile` interleaves in causal launches: as many as keep their K and V
    within :data:`L2_GROUP_BYTES`. Inside a group the tiles run longest first, so the last tiles of the launch are
    the shortest and the SMs finish together: a greedy model of the scheduler (132 SMs, 16k tokens per batch, a
    tile's cost its key blocks + 0.5) puts the longest program 5-7% over the mean at D=128, N = 1k-8k, with a
    head's blocks one after the other, and 0.1-1.8% with groups."""
    return max(1, L2_GROUP_BYTES // (2 * seqlen * head_dim * itemsize))


def launch_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                out: torch.Tensor, lse: torch.Tensor, stages: int = NUM_STAGES,
                programs: Optional[int] = None, dynamic: Optional[bool] = None,
                heads_per_group: Optional[int] = None, strict: bool = False,
                sparse: Optional[SparseMeta] = None, gather: bool = False,
                skip: Optional[bool] = None) -> Tuple[tuple, tuple]:
    """``(grid, args)`` of one launch (``_attn_fwd_hopper[grid](*args, num_warps=4)``): TMA descriptors over the
    2-D ``(B*S, H*D)`` views. Split out so that a machine without a GPU can compile the kernel (tests).
    ``programs``: how many programs walk the tiles (benchmarks, tests); default one per SM where :data:`PERSISTENT`,
    else one per tile. ``dynamic``: the programs draw tiles from a counter (default: causal persistent launches,
    whose tiles differ in length) rather than a fixed stride. ``heads_per_group``: :func:`head_group` (default:
    that for causal calls, 1 otherwise). ``strict`` (with ``causal``): keys j < i. ``sparse``: the tensors are in
    slot order (:func:`sparse_fwd`), ``causal`` False, one query head per K/V head; tiles differ in length, so
    the persistent programs draw them from a counter. ``gather`` (with ``sparse`` and its row tables): q / k / v /
    out / lse are in row order (contiguous); the producer reads rows through the tables (cp.async) and the
    consumers write out and lse to their rows. ``skip`` (default :func:`skip_dropped`; :func:`skips` says where
    it applies): tiles of dropped slots only are written by the producer and skipped."""
    b, s, h, d = q.shape
    hk = k.shape[2]
    if sparse is not None and (causal or h != hk):
        raise ValueError("a sparse forward takes causal=False (the side tensors' positions carry causality) and one "
                         f"query head per K/V head; got causal={causal}, {h} / {hk} heads")
    if gather and (sparse is None or sparse.q_rows is None or sparse.k_rows is None
                   or not all(t.is_contiguous() for t in (q, k, v, out))):
        raise ValueError("gather reads through a sparse call's row tables (sparse with q_rows / k_rows) from "
                         "contiguous q / k / v / out")
    n_tiles = b * h * (s // BLOCK_M)
    if programs is None and PERSISTENT:
        programs = sm_count(q.device.index) if q.is_cuda else 132
    programs = n_tiles if programs is None else max(1, min(n_tiles, programs))
    if dynamic is None:
        dynamic = (causal or sparse is not None) and programs < n_tiles
    if heads_per_group is None:
        heads_per_group = head_group(s, d, q.element_size()) if causal else 1
    counter = torch.zeros(1, dtype=torch.int32, device=q.device) if dynamic else lse
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[q.dtype]
    q_box, kv_box = [BLOCK_M // 2, d], [BLOCK_N, d]
    q_lay, kv_lay = shared_layout(tuple(q_box), gdt), shared_layout(tuple(kv_box), gdt)
    desc = lambda t, heads, box, lay: TensorDescriptor(t, [b * s, heads * d], [heads * d, 1], box, lay)  # noqa
    rows = (q, k, v, out, sparse.q_rows, sparse.k_rows) if gather else (lse,) * 6
    if sparse is None:          # unused pointers
        side, flags = (lse,) * 7, (False, False, False)
    else:
        side = (tile_ranges(sparse, 1, BLOCK_M, BLOCK_N, from_keys=False), sparse.q_pos, sparse.k_pos,
                sparse.q_bkt if sparse.q_bkt is not None else sparse.q_pos,
                sparse.k_bkt if sparse.k_bkt is not None else sparse.k_pos, sparse.q_len, sparse.k_len)
        flags = (True, sparse.causal, sparse.q_bkt is not None)
    args = (desc(q, h, q_box, q_lay), desc(k, hk, kv_box, kv_lay), desc(v, hk, kv_box, kv_lay),
            desc(out, h, q_box, q_lay), lse, counter, softmax_scale, s, h, h // hk, n_tiles,
            max(1, min(heads_per_group, b * h)), *side, *rows, BLOCK_M, BLOCK_N, d, stages, causal, dynamic,
            int(causal and strict), *flags, gather, skips(sparse, skip))
    return (programs, ), args


def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
        causal: bool, **config) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` as ``ops.flash.fwd`` returns them (lse ``(B, H, S)`` fp32, natural log), for a call that
    :func:`applies`; ``config``: :func:`launch_args`' keywords (``strict``; benchmarks)."""
    b, s, h, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    grid, args = launch_args(q, k, v, softmax_scale, causal, out, lse, **config)
    LAUNCH[grid](*args, num_warps=4)
    return out, lse


SPARSE_ENV = "FLASHRING_HOPPER_SPARSE_FWD"
# The sparse kernels write the results of tiles whose every slot is a dropped token (QK-sparse: the tiles past a
# head's kept count) without running them (``dropped_tile``; this forward's producer, hopper_bwd's programs).
# Written in session 17 after a profile at 4k tokens (H100, B=4, H=32, D=64, QK drop 0.8: forward 0.146 ms, dK/dV
# 0.207, dQ 0.169 for 4% of the causal pairs, 20-23% of the dense kernels' time), compiled for sm_90 (no new
# stack, the dense kernels' SASS unchanged) but not yet run on a GPU: off unless FLASHRING_HOPPER_SKIP_DROPPED=1.
SKIP_DROPPED_ENV = "FLASHRING_HOPPER_SKIP_DROPPED"


def skip_dropped() -> bool:
    """Whether the sparse kernels skip tiles of dropped slots (:data:`SKIP_DROPPED_ENV`; off by default)."""
    return os.environ.get(SKIP_DROPPED_ENV, "0") == "1"


def skips(sparse: Optional[SparseMeta], skip: Optional[bool] = None) -> bool:
    """Whether a launch skips tiles of dropped slots (``skip``, default :func:`skip_dropped`): QK-sparse calls with
    row tables only. Hash-sparse keeps every token (no tile is all dropped). Without row tables (tensors already in
    slot order, ``sparse_attn_compact_func``) the kernels' slot-order results are returned as they are, so the
    dropped slots' zero output and gradients must come from the kernels (the review of session 17)."""
    return (sparse is not None and sparse.q_bkt is None and sparse.q_rows is not None and sparse.k_rows is not None
            and (skip_dropped() if skip is None else bool(skip)))



def sparse_wanted() -> bool:
    """Whether the sparse front ends' forward goes to this kernel (:func:`sparse_fwd`): on unless
    ``FLASHRING_HOPPER_SPARSE_FWD=0``, where the dense forward is on (:func:`enabled`: ``FLASHRING_HOPPER_FWD=0``
    turns both off). H100, session 16 (``sparse_tiles.py``, 16k, B=1, H=32, causal, every kernel of the call): at
    D=64 with the rows gathered in the kernel (:func:`gather_wanted`) the forward is 1.05-1.16x the portable
    row-table forward (QK drop 0.5 / 0.8, hash 8 / 16) and forward + backward 1.06-1.09x the portable forward with
    the Gluon backward; at D=128 (copies) forward + backward 1.02-1.07x."""
    return os.environ.get(SPARSE_ENV, "1") != "0"


def sparse_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparse: SparseMeta, softcap: float) -> bool:
    """Whether the Gluon kernels take a sparse front end's call (:func:`sparse_fwd`, ``hopper_bwd.sparse_bwd``):
    bf16/fp16, head dim 64 or 128, ``(B, S, H, D)`` tensors of one length S, a multiple of 128, one query head per
    K/V head (a GQA group's heads have tile ranges of their own), no softcap, B * H * S < 2**31. Any strides: the
    tensors are gathered into slot order; the side tensors contiguous, as the front ends make them (anything else
    goes to the portable kernels, whose checks name it)."""
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype) or q.dim() != 4:
        return False
    b, s, h, d = q.shape
    side = [t for t in (sparse.q_pos, sparse.k_pos, sparse.q_bkt, sparse.k_bkt, sparse.q_rows, sparse.k_rows)
            if t is not None]
    return (softcap == 0 and d in (64, 128) and q.shape == k.shape == v.shape and s % BLOCK_M == 0
            and b * h * s < 2**31 and all(t.shape == (b, h, s) and t.is_contiguous() for t in side)
            and all(t.shape == (b, h) and t.is_contiguous() for t in (sparse.q_len, sparse.k_len)))


# The sparse kernels read q / k / v (and dout) through the row tables by cp.async in the producer warps instead of
# copies into slot order, and write their results straight to the rows (``gather``): no copies at all. H100,
# session 16 (sparse_tiles.py, 16k, B=1, H=32, causal; every kernel of a forward + backward on both Gluon kernels):
# D=64 0.88-0.98x the time of the copies' (QK drop 0.5 3.05 -> 2.98 ms, drop 0.8 1.01 -> 0.92, hash 8 2.57 -> 2.33,
# hash 16 2.02 -> 1.77), with one piece per tile and the row-table entries read a tile ahead (first form, 2-vector
# pieces: 1.1-1.3x slower); D=128 (2-vector pieces, no read-ahead: the registers do not allow them) 1.2-1.7x slower.
# FLASHRING_HOPPER_SPARSE_GATHER=1 / 0 forces it on / off.
GATHER_ENV = "FLASHRING_HOPPER_SPARSE_GATHER"
GATHER_HEAD_DIMS = (64,)


def gather_wanted(sparse: SparseMeta, head_dim: int) -> bool:
    """Whether the Gluon sparse kernels read rows through ``sparse``'s row tables (:data:`GATHER_ENV`; default:
    the head dims of :data:`GATHER_HEAD_DIMS`), which needs them."""
    mode = os.environ.get(GATHER_ENV, "")
    wanted = mode == "1" if mode in ("0", "1") else head_dim in GATHER_HEAD_DIMS
    return wanted and sparse.q_rows is not None and sparse.k_rows is not None


def sparse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, sparse: SparseMeta,
               gather: Optional[bool] = None, **config) -> Tuple[torch.Tensor, torch.Tensor]:
    """A sparse front end's ``(out, lse)`` (:func:`sparse_applies`) on this kernel: q / k / v gathered into slot
    order (``sparse.q_rows`` / ``k_rows``; without them they are in slot order already; padding slots zero:
    ``sparse_ranges.slot_copy``), each tile's key range
    from ``sparse_ranges.tile_ranges``, the tiles across the pattern masked by position and bucket, out and lse
    scattered back to their rows (a dropped row: out 0, the empty-row LSE). ``gather`` (default
    :func:`gather_wanted`; with row tables): no copies, the kernel reads and writes rows through the tables.
    ``config``: :func:`launch_args`' keywords."""
    rows = sparse.q_rows is not None and sparse.k_rows is not None
    gather = rows and (gather_wanted(sparse, q.shape[-1]) if gather is None else gather)
    if gather:
        q, k, v = aligned(q), aligned(k), aligned(v)
    else:
        q, = slot_copy([q], sparse.q_rows, sparse.q_len)
        k, v = slot_copy([k, v], sparse.k_rows, sparse.k_len)
    b, s, h, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((b, h, s), dtype=torch.float32, device=q.device)
    grid, args = launch_args(q, k, v, softmax_scale, False, out, lse, sparse=sparse, gather=gather, **config)
    LAUNCH[grid](*args, num_warps=4)
    if rows and not gather:
        return slot_return([out], sparse.q_rows, sparse.q_len)[0], scatter_rows(lse, sparse.q_rows)
    return out, lse


# Triton's generic launch path costs ~50 us of host time per call on the GPU machines (ops/launch.py); the forward
# of a 1k-token batch is shorter than that. None where Gluon is missing.
LAUNCH = Launcher(_attn_fwd_hopper) if AVAILABLE else None
