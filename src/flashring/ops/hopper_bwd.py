"""Hopper (sm_90) dense backward in Gluon: dK/dV by key block with wgmma, dQ by atomics or by a second kernel.

On by default on sm_90 with the separate dQ kernel (:func:`dq_mode`; ``FLASHRING_HOPPER_BWD=0`` turns it off,
``=atomic`` asks for the atomic dQ). Its first GPU run (session 8, H100, 2 x 8k, bf16) passed every check and
timed the backward at 0.89-0.94x cuDNN's (separate dQ; 1.06-1.46x the portable backward), the atomic dQ at
0.52-0.68x (0.81-0.93x since session 13's exchange of dS^T between the warpgroups). The portable Triton backward
(``ops.flash.bwd``) serves every call this one does not take (:func:`applies`).

dK/dV kernel: one program = 128 keys (two 4-warp consumer warpgroups of 64 keys) of one (batch, kv head); a 1-warp
producer loads the program's K and V once and then, for every query head of the group and every query block (64
rows; 128 at D=64 with the separate dQ), the Q and dO tiles and their LSE / delta values by TMA into a 2-stage ring
(Q-ready and dO-ready mbarriers apart, so S^T = K Q^T starts before dO lands; one "empty" barrier per stage with
one arrival per warpgroup). Per step a warpgroup computes, with every matrix transposed so that its 64 keys are
wgmma's M: S^T = K Q^T and dP^T = V dO^T (both operands in shared memory, both issued before either is waited on),
P^T = exp2(S^T * scale * log2(e) - lse * log2(e)) in registers, dV += P^T dO and dK += dS^T Q with
dS^T = P^T (dP^T - delta) taken from registers as the A operand (no shared-memory round trip, as the forward's
P). dK picks up the softmax scale once, in the epilogue. Causal skips a warpgroup's query blocks wholly above its
keys (it still waits for the stage and arrives, so the ring's count stays right) and masks only the diagonal
tile. delta = rowsum(dO * O) (minus a gradient on the LSE) comes from the portable backward's preprocess kernel.

dQ, chosen by :func:`dq_mode` (the GPU session times both: ``benchmarks/gluon_bwd.py``):
- ``"separate"`` (deterministic; what ``FLASHRING_HOPPER_BWD=1`` runs): a second kernel shaped like the forward
  (128 query rows, K/V ring) recomputes S, P, dP and accumulates dQ = dS K with dS from registers: 3 more
  matmuls, 7 in all; every gradient is written by one program in a fixed order, so runs are bitwise equal.
- ``"atomic"`` (``FLASHRING_HOPPER_BWD=atomic``, never under ``deterministic=True`` nor torch's deterministic
  mode): the dK/dV program also computes dQ = dS K and adds it into a zeroed fp32 (B, S, H, D) buffer with fp32
  atomics; a cast makes dq. 5 matmuls, in an order of additions that varies from run to run. The two warpgroups
  exchange their dS^T tiles through shared memory every step and each adds half of dQ's columns summed over the
  program's 128 keys (A = the transposed view of the tiles): half the atomic traffic of each adding its own 64
  keys' share (that form would move ~4 TB/s of fp32 reductions at cuDNN's speed, estimated from the tile sizes),
  at the price of a meeting per step. Session 13 (H100): 1.13-1.47x that form's backward, still 0.83-0.94x the
  separate kernel (``benchmarks/results/h100-gluon-bwd-pair-20261207-dcefab5.jsonl``).

Compiled for sm_90 on the CPU box with triton 3.6.0 / ptxas 12.8, the GPU image's (``benchmarks/compile_probe.py
--hopper-bwd --loops``; per kernel 168 registers, then ``setmaxnreg`` gives the consumers 240):

    kernel, dQ variant     D=64: stack / smem / HGMMA      D=128: stack / smem / HGMMA
    dK/dV, separate        0 B / 100,688 B / 48 (*)        0 B / 132,432 B / 48
    dQ kernel              0 B /  98,608 B / 32            0 B / 196,912 B / 48
    dK/dV, atomic          0 B /  99,760 B / 48 (53)       16 B / 165,296 B / 64 (69)   (no mask (causal))
    (*) 128-row query blocks (:data:`BLOCK_Q_D64`, session 12); with 64 rows 66,896 B / 32. 128 rows at D=128
    spill 280-288 B; the atomic dQ keeps 64 (two dS^T pairs of 128 rows would not fit at D=128). The atomic
    kernel's causal form at D=128 has 40 B of stack: scalars, a few one-register reloads in the step loop.

What the numbers decided, at D=128 (the tight case; before session 13's exchange, each warpgroup adding its own
keys' share of every column):
- atomic dQ as one 64 x D accumulator beside dK and dV: 64-72 B of stack with spill loads inside the step loop,
  and ptxas serialised the wgmmas (C7512, "insufficient register resources"). In 64-column slices (32 registers
  each, the second slice after the first one's atomics): 40 B. Issuing dV after dS instead of before (the bf16
  P^T operand no longer held by an in-flight wgmma while dP^T, P^T and delta are live): 8 B, the one spill pair
  outside the step loop (a value kept across the warp-specialised region's end); triton 3.8's ptxas: 0 B. The
  separate variant keeps dV in flight during dS (no spills either way, more overlap).
- the atomics compile to ``REDG.E.ADD.F32x2`` (two fp32 per instruction): 32 per thread and step at D=128.
- the dQ kernel at 128 keys per step (S, dP and dQ accumulators live together) compiles spill-free, as does 64;
  128 is kept, as the forward's tile.
All of these are compile-time facts; which variant is faster is for ``benchmarks/gluon_bwd.py`` on the GPU.

Contract (:func:`applies`, as the forward's): bf16/fp16, D in {64, 128}, contiguous ``(B, S, H, D)`` tensors at
16-byte aligned addresses, Sq == Sk with S % 128 == 0, full, causal or strictly causal (keys j < i), no softcap, GQA
(B * H * S < 2**31: the LSE rows' int32 TMA coordinate). Non-finite inputs are not handled beyond what the
arithmetic gives, and no registers are spent on them: a query row that sees a non-finite key or value has NaN out
(the forwards' rule), hence NaN delta and dS, so it makes dq of that row and dk / dv of every key it sees NaN, as it
should; it also reaches the keys after it in its causal diagonal tile (a masked pair's 0 * NaN), which the portable
backward avoids by forcing masked pairs' dS to 0. Strictly causal, a non-finite value or key j also makes row j's
own dq NaN (row j does not see key j), and one in the first 128 keys row 0's (session 13's review); forcing dS to 0
in the masked tiles would cost registers at the 240 edge and leave the key side as it is.

Dynamic sparse mode (:func:`sparse_bwd`, SPARSE; on by default since session 15, ``FLASHRING_HOPPER_SPARSE_BWD=0``
turns it off): the sparse front ends' calls with one query head per K/V head. q, k, v, dout, LSE and delta are
copied into each head's slot order (``sparse_ranges.slot_copy``: dropped tokens' slots zero, their LSE +inf, so
they add nothing), each program walks the tile range ``sparse_ranges.tile_ranges`` gives its block (dK/dV: 128
keys by 64-query steps; dQ: 128 queries by 128-key tiles) instead of the causal band, the tiles outside the
block's fully visible range are masked by ``hopper.sparse_keep`` (the slots' positions and buckets), the dropped
slots' gradients are zeroed in the epilogues, and the results go back to their rows (``slot_return``, or with
:data:`SPARSE_ROWS_OUT` straight from the epilogues). H100 (session 15): 1.00-1.47x the portable row-table
backward's forward + backward at 8k / 16k, D=64. At D=64 (``hopper.gather_wanted``; GATHER, the default since
session 16) nothing is copied: a 4-warp producer reads q, k, v, dout, LSE and delta rows through the row tables by
cp.async (``hopper.gather_rows_async``; dropped slots zero-filled) and the gradients go straight to their rows:
with the Gluon forward, 0.88-0.98x the time of the copies at 16k.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import flash, hopper
from .launch import Launcher
from .sparse_ranges import SLOT_PAD_TO, SparseMeta, slot_copy, slot_return, tile_ranges

try:        # Gluon and its Hopper ops: triton >= 3.5; absent or different elsewhere, and then unused
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    AVAILABLE = True
except ImportError:                                                     # pragma: no cover - depends on triton
    AVAILABLE = False

ENV = "FLASHRING_HOPPER_BWD"
DQ_MODES = ("separate", "atomic")
BLOCK_KEYS = 128        # dK/dV program: two warpgroups x 64 keys
BLOCK_Q = 64            # dK/dV step: query rows per Q / dO tile
BLOCK_Q_D64 = 128       # at D=64 with the separate dQ kernel: the backward 1.11x (1k) / 1.10x (8k) without a mask,
                        # 1.00x / 1.05x causal (H100, session 12); at D=128 (280-288 B) and with the atomic dQ it spills
DQ_BLOCK_M = 128        # dQ program: two warpgroups x 64 query rows
DQ_BLOCK_N = 128        # dQ step: keys per K / V tile (64 also compiles spill-free: 131,376 B of smem)
NUM_STAGES = 2          # 132 KB of shared memory for dK/dV at D=128: 3 stages would fit (~164 KB), not timed
# Head dims whose separate dQ kernel holds the wait for dP behind the tile's exponentials (launch_args' dq_hold).
# H100, session 15 (gluon_bwd.py, 16k tokens, N 1k-16k, causal and not; h100-gluon-bwd-hold-20261207-14f49e0.jsonl):
# D=128 backward 0.98-1.07x (7 of 8 points faster, mean +1.3%), D=64 0.96-1.03x (7 of 8 slower, mean -3%); with
# the atomic dQ 0.84-1.03x, slower everywhere at D=128.
DQ_HOLD_D = (128,)
LOG2E = 1.4426950408889634
# slot_copy leaves the padding past the next SLOT_PAD_TO slots unwritten: every tile of these kernels and the
# forward's must fit inside that multiple, or one would multiply garbage
assert all(SLOT_PAD_TO % n == 0 for n in (hopper.BLOCK_M, hopper.BLOCK_N, BLOCK_KEYS, BLOCK_Q, BLOCK_Q_D64,
                                          DQ_BLOCK_M, DQ_BLOCK_N)), "sparse_ranges.SLOT_PAD_TO"


def dq_mode(deterministic: bool = True) -> Optional[str]:
    """Which dQ variant ``FLASHRING_HOPPER_BWD`` asks for, or None (off): unset / ``1`` / ``separate`` = the
    separate kernel (the default: 0.87-1.07x cuDNN, the atomic one 0.81-0.93x; H100, session 13), ``0`` = off,
    ``atomic`` = the atomic one unless ``deterministic`` (or torch's deterministic mode) is on."""
    mode = os.environ.get(ENV, "")
    if mode in ("", "1", "separate"):
        return "separate"
    if mode == "atomic":
        return "separate" if deterministic or torch.are_deterministic_algorithms_enabled() else "atomic"
    return None


def enabled(device: torch.device) -> bool:
    """The switch is on, Gluon imports, and ``device`` is an sm_90 GPU."""
    return (dq_mode() is not None and AVAILABLE and device.type == "cuda"
            and torch.cuda.get_device_capability(device) == (9, 0))


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lower: Optional[int], upper: Optional[int],
            softcap: float) -> bool:
    """Whether these kernels compute the call's gradients: the forward's contract (``hopper.applies``: dtypes,
    shapes, 16-byte aligned contiguous tensors) with B * H * S < 2**31 (int32 LSE offsets). ``out`` and ``dout``
    are made contiguous and aligned by :func:`bwd`."""
    if not hopper.applies(q, k, v, lower, upper, softcap):
        return False
    b, s, h, _ = q.shape
    return s % BLOCK_KEYS == 0 and b * h * s < 2**31


if AVAILABLE:
    LOG2E_C = gl.constexpr(LOG2E)                    # what a kernel may read of a module global
    GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}

    @gluon.jit
    def _pair_dq(ds_smem, k_smem, ds_ready, ds_free, dst, n_ds, both, dq_zero, WG: gl.constexpr,
                 DQ_N: gl.constexpr, STORE: gl.constexpr):
        """The atomic dQ's exchange: this warpgroup's dS^T (STORE; a warpgroup that skipped the tile stores nothing)
        into its slot of the step's pair, then, once both have arrived, its DQ_N columns of dQ = dS K over the
        program's keys: warpgroup 1's dS^T against its K rows, then warpgroup 0's added (``both``) or in its
        place (warpgroup 1 skipped: its slot holds an older tile, whose product is dropped). An async token."""
        slot = n_ds % 2
        phase = (n_ds // 2) & 1
        # both read this pair two exchanges ago (a fresh barrier passes); waited for even without a store, so
        # that no arrival below runs a phase ahead of the other warpgroup's wait
        mbarrier.wait(ds_free.index(slot), phase ^ 1)
        if STORE:
            ds_smem.index(slot * 2 + WG).store(dst)
            fence_async_shared()          # the generic-proxy stores before either warpgroup's wgmma reads them
        mbarrier.arrive(ds_ready.index(slot), count=1)        # after a partition barrier: every thread's store is in
        mbarrier.wait(ds_ready.index(slot), phase)
        dq = warpgroup_mma(ds_smem.index(slot * 2 + 1).permute((1, 0)),
                           k_smem.index(1).slice(WG * DQ_N, DQ_N, dim=1), dq_zero, use_acc=False, is_async=True)
        return warpgroup_mma(ds_smem.index(slot * 2).permute((1, 0)), k_smem.index(0).slice(WG * DQ_N, DQ_N, dim=1),
                             dq, use_acc=both, is_async=True)

    @gluon.jit
    def _pair_release(qdo_empty, ds_free, stage, n_ds, dq, dq_tile, offs):
        """After the exchange's wgmmas: the Q / dO stage and the dS^T pair released, this warpgroup's dQ columns added
        (``dq_tile``: the tile's first row, int64; ``offs``: int32 offsets inside it, < 64 * H * D)."""
        mbarrier.arrive(qdo_empty.index(stage), count=1)
        mbarrier.arrive(ds_free.index(n_ds % 2), count=1)
        gl.atomic_add(dq_tile + offs, dq, sem="relaxed")      # scaled in the cast

    @gluon.jit
    def _dkdv_consumer(WG: gl.constexpr, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, kv_bar,
                       q_ready, do_ready, qdo_empty, ds_ready, ds_free, desc_dk, desc_dv, dq_ptr, qk_scale, dq_row,
                       N_CTX, GROUP, j_lo, n_q, q_pos, k_pos, q_bkt, k_bkt, q_n, k_n, mid_lo, mid_hi, dk_out, dv_out,
                       out_rows, out_stride, BLOCK_KEYS: gl.constexpr, BLOCK_Q: gl.constexpr, HEAD_DIM: gl.constexpr,
                       NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, ATOMIC_DQ: gl.constexpr, STRICT: gl.constexpr,
                       HOLD: gl.constexpr, SPARSE: gl.constexpr, SP_CAUSAL: gl.constexpr, HASH: gl.constexpr,
                       ROWS_OUT: gl.constexpr, GATHER: gl.constexpr):
        """One consumer warpgroup: 64 keys' dK and dV (and, ATOMIC_DQ, dQ: ``dq_ptr`` at this program's (batch,
        first query head), ``dq_row`` elements per query row). Few live scalars (ids are read again, not passed):
        at D=128 the atomic variant sits at the 240-register edge.

        ATOMIC_DQ: the two warpgroups exchange their dS^T tiles in shared memory each step (:func:`_pair_dq`), and
        each adds half of dQ's columns summed over both warpgroups' keys: half the fp32 atomics of each warpgroup
        adding its own 64 keys' share of every column (the form before session 13; H100: 1.13-1.47x faster
        backward, 2 x 8k and 16 x 1k, D 64 / 128, causal and not), at the price of a meeting per step. HOLD (with
        ATOMIC_DQ): the wait for dP^T behind :func:`_wait_after_rows` on P^T's row sums, as in the dQ kernel (SASS
        without a mask: 6-8 of a step's exponentials ahead of that wait, all of them with HOLD).

        SPARSE (:func:`sparse_bwd`; GROUP 1, not ATOMIC_DQ): ``q_pos`` ... ``k_n`` = the (batch, head)'s side
        tensors and kept counts (:func:`hopper.sparse_side`); query tiles outside ``[mid_lo, mid_hi)`` are masked by
        :func:`hopper.sparse_keep`, and the key slots past ``k_n`` (they stand for dropped rows) get zero dK / dV.
        ROWS_OUT (with SPARSE): dK / dV go straight to their rows (``hopper.store_rows`` into ``dk_out`` / ``dv_out``
        through ``out_rows``, staged in this warpgroup's K / V buffers), not through the slot-order TMA store."""
        WG_N: gl.constexpr = BLOCK_KEYS // 2
        NW: gl.constexpr = gl.num_warps()
        dtype: gl.constexpr = k_smem.dtype
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                            instr_shape=[16, BLOCK_Q, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        q_col_layout: gl.constexpr = gl.SliceLayout(0, st_layout)        # one value per query (column of S^T)
        DQ_N: gl.constexpr = HEAD_DIM // 2                     # this warpgroup's columns of dQ (ATOMIC_DQ)
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                            instr_shape=[16, DQ_N, 16])
        dq_zero = gl.zeros([BLOCK_Q, DQ_N], gl.float32, dq_layout)
        dq_rows = gl.arange(0, BLOCK_Q, gl.SliceLayout(1, dq_layout)) * dq_row
        dq_cols = gl.arange(0, DQ_N, gl.SliceLayout(0, dq_layout))

        k_wg = k_smem.index(WG)
        v_wg = v_smem.index(WG)
        key_lo = gl.program_id(0) * BLOCK_KEYS + WG * WG_N
        keys = key_lo + gl.arange(0, WG_N, gl.SliceLayout(1, st_layout))
        cols0 = gl.arange(0, BLOCK_Q, q_col_layout)
        st_zero = gl.zeros([WG_N, BLOCK_Q], gl.float32, st_layout)
        dk = gl.zeros([WG_N, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([WG_N, HEAD_DIM], gl.float32, acc_layout)
        key_lo0 = gl.program_id(0) * BLOCK_KEYS          # warpgroup 0's first key: it works whenever either does
        n_ds = 0                                         # dS^T exchanges so far (both warpgroups count alike)
        mbarrier.wait(kv_bar, 0)
        if GATHER:
            fence_async_shared()          # cp.async (generic proxy) wrote K / V, wgmma (async proxy) reads them
        for it in range(GROUP * n_q):
            stage = it % NUM_STAGES
            phase = (it // NUM_STAGES) & 1
            g = it // n_q
            m0 = (j_lo + it % n_q) * BLOCK_Q
            q_tile = q_smem.index(stage)
            do_tile = do_smem.index(stage)
            # waited for even when skipped: an arrival must not run ahead of the fill it releases, or two of one
            # warpgroup could complete a phase the other has not finished with
            mbarrier.wait(q_ready.index(stage), phase)
            if GATHER:
                fence_async_shared()
            if (not CAUSAL) or m0 + BLOCK_Q > key_lo:        # causal: some query of the tile sees one of our keys
                st_tok = warpgroup_mma(k_wg, q_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
                mbarrier.wait(do_ready.index(stage), phase)
                if GATHER:
                    fence_async_shared()
                dpt_tok = warpgroup_mma(v_wg, do_tile.permute((1, 0)), st_zero, use_acc=False, is_async=True)
                st = warpgroup_mma_wait(num_outstanding=1, deps=(st_tok, ))
                lse2 = lse_smem.index(stage).load(q_col_layout) * LOG2E_C
                pt = gl.exp2(st * qk_scale - lse2[None, :])
                if CAUSAL:
                    if m0 < key_lo + WG_N:                # a tile that reaches the diagonal: query >= key
                        pt = gl.where((m0 + cols0)[None, :] - STRICT >= keys[:, None], pt, 0.0)
                if SPARSE:
                    if (m0 < mid_lo) or (m0 >= mid_hi):
                        pt = hopper.sparse_keep(pt, (m0 + cols0)[None, :], keys[:, None], q_pos, k_pos, q_bkt,
                                                k_bkt, q_n, k_n, 0.0, SP_CAUSAL=SP_CAUSAL, HASH=HASH)
                if ATOMIC_DQ:
                    # dV after dS: no in-flight wgmma holds P^T's bf16 registers while dP^T, P^T and delta are
                    # live (D=128: 40 -> 8 B of stack, none left in the loop)
                    if HOLD:
                        _wait_after_rows(gl.sum(pt, axis=1))
                    dpt = warpgroup_mma_wait(num_outstanding=0, deps=(dpt_tok, ))
                    delta = delta_smem.index(stage).load(q_col_layout)
                    dst = (pt * (dpt - delta[None, :])).to(dtype)
                    dv_tok = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do_tile, dv, is_async=True)
                else:
                    dv_tok = warpgroup_mma(gl.convert_layout(pt.to(dtype), a_layout), do_tile, dv, is_async=True)
                    dpt = warpgroup_mma_wait(num_outstanding=1, deps=(dpt_tok, ))     # in order: S^T, dP^T, dV
                    delta = delta_smem.index(stage).load(q_col_layout)
                    dst = (pt * (dpt - delta[None, :])).to(dtype)
                dk_tok = warpgroup_mma(gl.convert_layout(dst, a_layout), q_tile, dk, is_async=True)
                if ATOMIC_DQ:
                    dq_tok = _pair_dq(ds_smem, k_smem, ds_ready, ds_free, dst, n_ds,
                                      (not CAUSAL) or m0 + BLOCK_Q > key_lo0 + WG_N, dq_zero, WG, DQ_N, True)
                    dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok, dq_tok))
                    _pair_release(qdo_empty, ds_free, stage, n_ds, dq, dq_ptr + m0.to(gl.int64) * dq_row,
                                  dq_rows[:, None] + (g * HEAD_DIM + WG * DQ_N + dq_cols)[None, :])
                    n_ds += 1
                else:
                    dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok))
                    mbarrier.arrive(qdo_empty.index(stage), count=1)
            elif ATOMIC_DQ and WG == 1 and m0 + BLOCK_Q > key_lo0:  # 1 skips, 0 works: 1's dQ columns still
                dq_tok = _pair_dq(ds_smem, k_smem, ds_ready, ds_free, st_zero, n_ds, False, dq_zero, WG, DQ_N, False)
                dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ))
                _pair_release(qdo_empty, ds_free, stage, n_ds, dq, dq_ptr + m0.to(gl.int64) * dq_row,
                              dq_rows[:, None] + (g * HEAD_DIM + WG * DQ_N + dq_cols)[None, :])
                n_ds += 1
            else:
                mbarrier.arrive(qdo_empty.index(stage), count=1)

        # epilogue: stage through this warpgroup's own K / V buffers, TMA store; with ATOMIC_DQ the other
        # warpgroup's last dQ wgmma reads this K buffer too: wait until it has released the last exchange
        if ATOMIC_DQ:
            mbarrier.wait(ds_free.index((n_ds - 1) % 2), ((n_ds - 1) // 2) & 1)
        if SPARSE:          # slots past the kept count stand for dropped rows: their gradients are 0
            kept = key_lo + gl.arange(0, WG_N, gl.SliceLayout(1, acc_layout)) < k_n
            dk = gl.where(kept[:, None], dk, 0.0)
            dv = gl.where(kept[:, None], dv, 0.0)
        if ROWS_OUT:
            hopper.store_rows((dk * (qk_scale / LOG2E_C)).to(dtype), k_wg, dk_out, out_rows, key_lo, out_stride, NW)
            hopper.store_rows(dv.to(dtype), v_wg, dv_out, out_rows, key_lo, out_stride, NW)
        else:
            k_wg.store((dk * (qk_scale / LOG2E_C)).to(dtype))      # the softmax scale, from a live scalar
            v_wg.store(dv.to(dtype))
            fence_async_shared()
            kv_row = gl.program_id(2) * N_CTX + key_lo
            tma.async_copy_shared_to_global(desc_dk, [kv_row, gl.program_id(1) * HEAD_DIM], k_wg)
            tma.async_copy_shared_to_global(desc_dv, [kv_row, gl.program_id(1) * HEAD_DIM], v_wg)
            tma.store_wait(pendings=0)

    @gluon.jit
    def _dkdv_producer(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_ready, do_ready,
                       qdo_empty, desc_q, desc_k, desc_v, desc_do, desc_lse, desc_delta, N_CTX, H, b, hk, GROUP, n0,
                       j_lo, n_q, q_n, k_n, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, q_rows, k_rows,
                       BLOCK_KEYS: gl.constexpr, BLOCK_Q: gl.constexpr, HEAD_DIM: gl.constexpr,
                       NUM_STAGES: gl.constexpr, GATHER: gl.constexpr):
        """Loads by TMA, or (GATHER: sparse, GROUP 1) by cp.async through the row tables ``q_rows`` / ``k_rows``
        (the (batch, head)'s, as ``*_ptr`` are at its row 0 and ``lse_ptr`` / ``delta_ptr`` at its LSE row)."""
        WG_N: gl.constexpr = BLOCK_KEYS // 2
        if GATHER:
            NWP: gl.constexpr = gl.num_warps()
            for w in gl.static_range(2):
                hopper.gather_rows_async(k_smem.index(w), k_ptr, k_rows, n0 + w * WG_N, k_n, H * HEAD_DIM, NWP)
                hopper.gather_rows_async(v_smem.index(w), v_ptr, k_rows, n0 + w * WG_N, k_n, H * HEAD_DIM, NWP)
            hopper.gathered(kv_bar)
            TPR: gl.constexpr = HEAD_DIM // 8
            if hopper.GATHER_AHEAD and HEAD_DIM <= 64 and BLOCK_Q * TPR <= 32 * NWP * hopper.GATHER_VEC:
                # one piece per tile: the row-table entries loaded once for Q and dO, the next step's ahead
                layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPR, TPR], [NWP, 1], [1, 0])
                cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, layout))
                slots = j_lo * BLOCK_Q + gl.arange(0, BLOCK_Q, gl.SliceLayout(1, layout))
                r = gl.load(q_rows + slots, mask=slots < N_CTX, other=0)
                for it in range(n_q):
                    stage = it % NUM_STAGES
                    m0 = (j_lo + it) * BLOCK_Q
                    offs = (r * (H * HEAD_DIM))[:, None] + cols[None, :]
                    keep = (slots < q_n)[:, None]
                    mbarrier.wait(qdo_empty.index(stage), ((it // NUM_STAGES) & 1) ^ 1)
                    async_copy.async_copy_global_to_shared(q_smem.index(stage), q_ptr + offs, mask=keep)
                    hopper.gather_values_async(lse_smem.index(stage), lse_ptr, q_rows, m0, q_n, NWP)
                    hopper.gathered(q_ready.index(stage))
                    async_copy.async_copy_global_to_shared(do_smem.index(stage), do_ptr + offs, mask=keep)
                    hopper.gather_values_async(delta_smem.index(stage), delta_ptr, q_rows, m0, q_n, NWP)
                    hopper.gathered(do_ready.index(stage))
                    slots += BLOCK_Q
                    r = gl.load(q_rows + slots, mask=slots < N_CTX, other=0)
            else:
                for it in range(n_q):
                    stage = it % NUM_STAGES
                    m0 = (j_lo + it) * BLOCK_Q
                    mbarrier.wait(qdo_empty.index(stage), ((it // NUM_STAGES) & 1) ^ 1)
                    hopper.gather_rows_async(q_smem.index(stage), q_ptr, q_rows, m0, q_n, H * HEAD_DIM, NWP)
                    hopper.gather_values_async(lse_smem.index(stage), lse_ptr, q_rows, m0, q_n, NWP)
                    hopper.gathered(q_ready.index(stage))
                    hopper.gather_rows_async(do_smem.index(stage), do_ptr, q_rows, m0, q_n, H * HEAD_DIM, NWP)
                    hopper.gather_values_async(delta_smem.index(stage), delta_ptr, q_rows, m0, q_n, NWP)
                    hopper.gathered(do_ready.index(stage))
        else:
            mbarrier.expect(kv_bar, 2 * desc_k.block_type.nbytes + 2 * desc_v.block_type.nbytes)
            for w in gl.static_range(2):
                tma.async_copy_global_to_shared(desc_k, [b * N_CTX + n0 + w * WG_N, hk * HEAD_DIM], kv_bar,
                                                k_smem.index(w))
                tma.async_copy_global_to_shared(desc_v, [b * N_CTX + n0 + w * WG_N, hk * HEAD_DIM], kv_bar,
                                                v_smem.index(w))
            for it in range(GROUP * n_q):
                stage = it % NUM_STAGES
                phase = (it // NUM_STAGES) & 1
                h = hk * GROUP + it // n_q
                m0 = (j_lo + it % n_q) * BLOCK_Q
                # fresh mbarriers count as "phase 1 complete": waiting on phase ^ 1 lets the first NUM_STAGES through
                mbarrier.wait(qdo_empty.index(stage), phase ^ 1)
                row = b * N_CTX + m0
                lse_at = (b * H + h) * N_CTX + m0               # (B, H, S) seen as one row; int32: B*H*S < 2**31
                mbarrier.expect(q_ready.index(stage), desc_q.block_type.nbytes + desc_lse.block_type.nbytes)
                tma.async_copy_global_to_shared(desc_q, [row, h * HEAD_DIM], q_ready.index(stage), q_smem.index(stage))
                tma.async_copy_global_to_shared(desc_lse, [lse_at], q_ready.index(stage), lse_smem.index(stage))
                mbarrier.expect(do_ready.index(stage), desc_do.block_type.nbytes + desc_delta.block_type.nbytes)
                tma.async_copy_global_to_shared(desc_do, [row, h * HEAD_DIM], do_ready.index(stage),
                                                do_smem.index(stage))
                tma.async_copy_global_to_shared(desc_delta, [lse_at], do_ready.index(stage), delta_smem.index(stage))

    @gluon.jit
    def _bwd_dkdv_hopper(desc_q, desc_k, desc_v, desc_do, desc_lse, desc_delta, desc_dk, desc_dv, dq_ptr, sm_scale,
                         N_CTX, H, GROUP, ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, dk_out, dv_out, k_rows,
                         q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, q_rows, BLOCK_KEYS: gl.constexpr,
                         BLOCK_Q: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                         CAUSAL: gl.constexpr, ATOMIC_DQ: gl.constexpr, STRICT: gl.constexpr, HOLD: gl.constexpr,
                         SPARSE: gl.constexpr, SP_CAUSAL: gl.constexpr, HASH: gl.constexpr, ROWS_OUT: gl.constexpr,
                         GATHER: gl.constexpr, SKIP_DROPPED: gl.constexpr):
        """One program per 128 keys of a (batch, K/V head) (module docstring). GATHER (with SPARSE and ROWS_OUT):
        q / k / v / dout, LSE and delta are in row order (``*_ptr``; contiguous) and the producer reads them
        through the row tables ``q_rows`` / ``k_rows`` (``hopper.gather_rows_async``): no copies into slot
        order."""
        gl.static_assert(gl.num_warps() == 4, "two 4-warp consumer partitions plus the default one")
        gl.static_assert(BLOCK_Q % (BLOCK_KEYS // 2) == 0, "whole warpgroups of query rows (launch_args checks "
                         "N_CTX % BLOCK_Q)")
        WG_N: gl.constexpr = BLOCK_KEYS // 2
        dtype: gl.constexpr = desc_q.dtype
        n0 = gl.program_id(0) * BLOCK_KEYS      # program 0 holds the most causal work: it runs first as it is
        hk = gl.program_id(1)
        b = gl.program_id(2)
        qk_scale = sm_scale * LOG2E_C
        if ATOMIC_DQ:           # at (batch b, row 0, head hk * GROUP): the consumers add row and group offsets
            dq_ptr += (b.to(gl.int64) * N_CTX * H + hk * GROUP) * HEAD_DIM
        if SPARSE:              # the key block's query tiles (sparse_ranges.tile_ranges from the keys; GROUP 1)
            lo, mid_lo, mid_hi, hi, q_pos, k_pos, q_bkt, k_bkt, q_n, k_n = hopper.sparse_side(
                ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, b * H + hk, gl.program_id(0), gl.num_programs(0),
                N_CTX, HASH)
            j_lo = lo // BLOCK_Q
            n_q = (hi - lo + BLOCK_Q - 1) // BLOCK_Q       # hi: the head's kept count, not rounded
            if SKIP_DROPPED and not HASH:   # a block of dropped keys only (QK): zero gradients, nothing loaded
                if hopper.dropped_tile(n0, k_n):
                    # the (batch, head) offsets of ROWS_OUT below, computed here: exiting after that block costs
                    # 8 B more stack at D=128 (triton 3.6)
                    if ROWS_OUT:        # (slot order: the copy back zeroes dropped rows without reading them)
                        row0 = (b.to(gl.int64) * N_CTX * H + hk) * HEAD_DIM
                        table = k_rows + (b.to(gl.int64) * H + hk) * N_CTX
                        hopper.zero_rows(dk_out + row0, table, n0, H * HEAD_DIM, BLOCK_KEYS, HEAD_DIM, gl.num_warps())
                        hopper.zero_rows(dv_out + row0, table, n0, H * HEAD_DIM, BLOCK_KEYS, HEAD_DIM, gl.num_warps())
                    return
        elif CAUSAL:
            j_lo = n0 // BLOCK_Q                # query blocks wholly above the program's keys are never loaded
            n_q = N_CTX // BLOCK_Q - j_lo
        else:
            j_lo = n0 * 0
            n_q = N_CTX // BLOCK_Q - j_lo
        if not SPARSE:          # unused
            mid_lo = j_lo
            mid_hi = j_lo
            q_n = j_lo
            k_n = j_lo
        if ROWS_OUT:            # (batch, head) row 0 of the row-order dK / dV and the head's slot -> row table
            dk_out += (b.to(gl.int64) * N_CTX * H + hk) * HEAD_DIM
            dv_out += (b.to(gl.int64) * N_CTX * H + hk) * HEAD_DIM
            k_rows += (b.to(gl.int64) * H + hk) * N_CTX
        if GATHER:              # the same for the inputs (GROUP 1: query head hk), LSE and delta rows
            gl.static_assert(SPARSE and ROWS_OUT and not ATOMIC_DQ, "GATHER: a sparse call's rows, results to rows")
            row0 = (b.to(gl.int64) * N_CTX * H + hk) * HEAD_DIM
            q_ptr += row0
            k_ptr += row0
            v_ptr += row0
            do_ptr += row0
            lse_ptr += (b.to(gl.int64) * H + hk) * N_CTX
            delta_ptr += (b.to(gl.int64) * H + hk) * N_CTX
            q_rows += (b.to(gl.int64) * H + hk) * N_CTX

        k_smem = gl.allocate_shared_memory(dtype, [2, WG_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [2, WG_N, HEAD_DIM], desc_v.layout)
        q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_Q, HEAD_DIM], desc_q.layout)
        do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_Q, HEAD_DIM], desc_do.layout)
        lse_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_Q], desc_lse.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, BLOCK_Q], desc_delta.layout)
        if ATOMIC_DQ:
            ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WG_N, BLOCK_Q], dtype)
            # two exchanges in flight (a warpgroup may start the next step's exchange before the other has read
            # this one's pair), each a (warpgroup 0, warpgroup 1) pair of dS^T tiles
            ds_smem = gl.allocate_shared_memory(dtype, [4, WG_N, BLOCK_Q], ds_layout)
        else:
            ds_smem = q_smem                    # unused
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        qdo_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())     # ATOMIC_DQ's
        ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)     # both warpgroups' dS^T are in
            mbarrier.init(ds_free.index(i), count=2)      # both warpgroups have read the pair
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(qdo_empty.index(i), count=2)     # one arrival per consumer warpgroup
        fence_async_shared()          # the TMA unit (async proxy) signals these barriers: initialised first

        # Argument tuples are built inline: a tuple assigned to a local turns its constexprs into tensors.
        gl.warp_specialize([
            (_dkdv_consumer, (0, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, kv_bar, q_ready,
                              do_ready, qdo_empty, ds_ready, ds_free, desc_dk, desc_dv, dq_ptr, qk_scale,
                              H * HEAD_DIM, N_CTX, GROUP, j_lo, n_q, q_pos, k_pos, q_bkt, k_bkt, q_n, k_n, mid_lo,
                              mid_hi, dk_out, dv_out, k_rows, H * HEAD_DIM, BLOCK_KEYS, BLOCK_Q, HEAD_DIM,
                              NUM_STAGES, CAUSAL, ATOMIC_DQ, STRICT, HOLD, SPARSE, SP_CAUSAL, HASH, ROWS_OUT,
                              GATHER)),
            (_dkdv_consumer, (1, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, ds_smem, kv_bar, q_ready,
                              do_ready, qdo_empty, ds_ready, ds_free, desc_dk, desc_dv, dq_ptr, qk_scale,
                              H * HEAD_DIM, N_CTX, GROUP, j_lo, n_q, q_pos, k_pos, q_bkt, k_bkt, q_n, k_n, mid_lo,
                              mid_hi, dk_out, dv_out, k_rows, H * HEAD_DIM, BLOCK_KEYS, BLOCK_Q, HEAD_DIM,
                              NUM_STAGES, CAUSAL, ATOMIC_DQ, STRICT, HOLD, SPARSE, SP_CAUSAL, HASH, ROWS_OUT,
                              GATHER)),
            (_dkdv_producer, (k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, kv_bar, q_ready, do_ready,
                              qdo_empty, desc_q, desc_k, desc_v, desc_do, desc_lse, desc_delta, N_CTX, H, b, hk,
                              GROUP, n0, j_lo, n_q, q_n, k_n, q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, q_rows,
                              k_rows, BLOCK_KEYS, BLOCK_Q, HEAD_DIM, NUM_STAGES, GATHER)),
        ], [4, 4 if GATHER else 1], [232, 40] if GATHER and HEAD_DIM == 64 else [240, 24])

        mbarrier.invalidate(kv_bar)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(q_ready.index(i))
            mbarrier.invalidate(do_ready.index(i))
            mbarrier.invalidate(qdo_empty.index(i))
        for i in gl.static_range(2):
            mbarrier.invalidate(ds_ready.index(i))
            mbarrier.invalidate(ds_free.index(i))

    @gluon.jit
    def _dq_consumer(WG: gl.constexpr, q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready, kv_empty,
                     desc_dq, lse_ptr, delta_ptr, qk_scale, sm_scale, lse_row, q_row0, q_col, row_lo0, n_lo, n_hi,
                     q_pos, k_pos, q_bkt, k_bkt, q_n, k_n, mid_lo, mid_hi, dq_out, out_rows, out_stride,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
                     CAUSAL: gl.constexpr, STRICT: gl.constexpr, HOLD: gl.constexpr, SPARSE: gl.constexpr,
                     SP_CAUSAL: gl.constexpr, HASH: gl.constexpr, ROWS_OUT: gl.constexpr, GATHER: gl.constexpr):
        """One consumer warpgroup of the separate dQ kernel: 64 query rows, key tiles from ``n_lo`` (a multiple of
        BLOCK_N) to ``n_hi``. HOLD: :func:`_wait_after_rows` keeps the tile's exponentials ahead of the wait for dP
        (they run while dP's wgmma does). SPARSE: as the dK/dV consumer's (tiles outside ``[mid_lo, mid_hi)``
        masked; a query slot past the kept count has an LSE of +inf from :func:`sparse_bwd`, so its dQ is 0).
        ROWS_OUT: dQ straight to its rows (``hopper.store_rows``, staged in this warpgroup's Q buffer). GATHER: LSE
        and delta in row order, read through the row table ``out_rows`` (a dropped slot: +inf and 0, as the
        copies give it)."""
        WG_M: gl.constexpr = BLOCK_M // 2
        NW: gl.constexpr = gl.num_warps()
        dtype: gl.constexpr = q_smem.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        s_row: gl.constexpr = gl.SliceLayout(1, s_layout)

        q = q_smem.index(WG)
        do = do_smem.index(WG)
        row_lo = row_lo0 + WG * WG_M
        rows = row_lo + gl.arange(0, WG_M, s_row)
        cols0 = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
        if GATHER:
            at = gl.load(out_rows + rows)
            lse2 = gl.load(lse_ptr + lse_row + at, mask=rows < q_n, other=float("inf")) * LOG2E_C
            delta = gl.load(delta_ptr + lse_row + at, mask=rows < q_n, other=0.0)
        else:
            lse2 = gl.load(lse_ptr + lse_row + rows) * LOG2E_C          # 2 rows per thread: loaded once
            delta = gl.load(delta_ptr + lse_row + rows)
        s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout)
        dq = gl.zeros([WG_M, HEAD_DIM], gl.float32, acc_layout)
        mbarrier.wait(qdo_bar, 0)
        if GATHER:
            fence_async_shared()          # cp.async (generic proxy) wrote Q / dO, wgmma (async proxy) reads them
        for it in range((n_hi - n_lo + BLOCK_N - 1) // BLOCK_N):
            stage = it % NUM_STAGES
            phase = (it // NUM_STAGES) & 1
            start_n = n_lo + it * BLOCK_N
            k_tile = k_smem.index(stage)
            mbarrier.wait(k_ready.index(stage), phase)
            if GATHER:
                fence_async_shared()
            s_tok = warpgroup_mma(q, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            mbarrier.wait(v_ready.index(stage), phase)
            if GATHER:
                fence_async_shared()
            dp_tok = warpgroup_mma(do, v_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
            p = gl.exp2(s * qk_scale - lse2[:, None])
            if CAUSAL:
                if start_n + BLOCK_N - 1 > row_lo - STRICT:   # only tiles that reach past the first row are masked
                    p = gl.where(rows[:, None] - STRICT >= (start_n + cols0)[None, :], p, 0.0)
            if SPARSE:
                if (start_n < mid_lo) or (start_n >= mid_hi):
                    p = hopper.sparse_keep(p, rows[:, None], (start_n + cols0)[None, :], q_pos, k_pos, q_bkt, k_bkt,
                                           q_n, k_n, 0.0, SP_CAUSAL=SP_CAUSAL, HASH=HASH)
            if HOLD:
                _wait_after_rows(gl.sum(p, axis=1))
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok, ))
            ds = (p * (dp - delta[:, None])).to(dtype)
            dq_tok = warpgroup_mma(gl.convert_layout(ds, a_layout), k_tile, dq, is_async=True)
            dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq_tok, ))
            mbarrier.arrive(kv_empty.index(stage), count=1)

        # epilogue: stage through this warpgroup's (now idle) Q buffer, TMA store
        if SPARSE:          # slots past the kept count stand for dropped rows: 0, whatever an inf in K gave them
            dq = gl.where((row_lo + gl.arange(0, WG_M, gl.SliceLayout(1, acc_layout)) < q_n)[:, None], dq, 0.0)
        if ROWS_OUT:
            hopper.store_rows((dq * sm_scale).to(dtype), q, dq_out, out_rows, row_lo, out_stride, NW)
        else:
            q.store((dq * sm_scale).to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(desc_dq, [q_row0 + WG * WG_M, q_col], q)
            tma.store_wait(pendings=0)

    @gluon.jit
    def _wait_after_rows(x):
        """A ``wgmma.wait_group 0`` predicated on ``x`` (row sums of P: >= 0 or NaN, so the predicate ``x != -1`` is
        always true and the instruction runs warp-uniformly). ptxas hoists Gluon's operand-less wait for dP above
        the exponentials (SASS, triton 3.6: 15 of a tile's 64 between the waits at D=128); a wait that reads a sum
        of all of them cannot move above any (session 11 found the same for the forward). Costs the sums: ~31
        FADDs and 2 shuffle steps per row and thread."""
        gl.inline_asm_elementwise(
            "{ .reg .pred p; setp.neu.f32 p, $1, 0fBF800000; @p wgmma.wait_group.sync.aligned 0; mov.b32 $0, $1; }",
            "=r,r", [x], dtype=gl.float32, is_pure=False, pack=1)

    @gluon.jit
    def _dq_producer(q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready, kv_empty, desc_q, desc_do, desc_k,
                     desc_v, q_row0, q_col, kv_row0, kv_col, n_lo, n_hi, row_lo0, q_n, k_n, q_ptr, k_ptr, v_ptr,
                     do_ptr, q_rows, k_rows, row_stride, N_CTX, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     NUM_STAGES: gl.constexpr, GATHER: gl.constexpr):
        """Loads by TMA, or (GATHER) by cp.async through the (batch, head)'s row tables ``q_rows`` / ``k_rows``
        from the row-order tensors at ``*_ptr`` (its row 0)."""
        WG_M: gl.constexpr = BLOCK_M // 2
        if GATHER:
            NWP: gl.constexpr = gl.num_warps()
            for w in gl.static_range(2):
                hopper.gather_rows_async(q_smem.index(w), q_ptr, q_rows, row_lo0 + w * WG_M, q_n, row_stride, NWP)
                hopper.gather_rows_async(do_smem.index(w), do_ptr, q_rows, row_lo0 + w * WG_M, q_n, row_stride, NWP)
            hopper.gathered(qdo_bar)
            hopper.gather_kv_loop(k_smem, v_smem, k_ready, v_ready, kv_empty, k_ptr, v_ptr, k_rows, n_lo,
                                  (n_hi - n_lo + BLOCK_N - 1) // BLOCK_N, k_n, row_stride, N_CTX, n_lo * 0, NUM_STAGES)
        else:
            mbarrier.expect(qdo_bar, 2 * desc_q.block_type.nbytes + 2 * desc_do.block_type.nbytes)
            for w in gl.static_range(2):
                tma.async_copy_global_to_shared(desc_q, [q_row0 + w * WG_M, q_col], qdo_bar, q_smem.index(w))
                tma.async_copy_global_to_shared(desc_do, [q_row0 + w * WG_M, q_col], qdo_bar, do_smem.index(w))
            for it in range((n_hi - n_lo + BLOCK_N - 1) // BLOCK_N):
                hopper.fill_kv_stage(k_smem, v_smem, k_ready, v_ready, kv_empty, desc_k, desc_v,
                                     kv_row0 + n_lo + it * BLOCK_N, kv_col, it, NUM_STAGES)

    @gluon.jit
    def _bwd_dq_hopper(desc_q, desc_k, desc_v, desc_do, desc_dq, lse_ptr, delta_ptr, sm_scale, N_CTX, H, GROUP,
                       ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, dq_out, q_rows, q_ptr, k_ptr, v_ptr, do_ptr,
                       k_rows, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                       NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, STRICT: gl.constexpr, HOLD: gl.constexpr,
                       SPARSE: gl.constexpr, SP_CAUSAL: gl.constexpr, HASH: gl.constexpr, ROWS_OUT: gl.constexpr,
                       GATHER: gl.constexpr, SKIP_DROPPED: gl.constexpr):
        """One program per 128 query rows of a (batch, head) (module docstring). GATHER (with SPARSE and
        ROWS_OUT): q / k / v / dout, LSE and delta in row order, read through the row tables ``q_rows`` /
        ``k_rows`` (``hopper.gather_rows_async``)."""
        gl.static_assert(gl.num_warps() == 4, "two 4-warp consumer partitions plus the default one")
        WG_M: gl.constexpr = BLOCK_M // 2
        dtype: gl.constexpr = desc_q.dtype
        start_m = gl.program_id(0)
        if CAUSAL:      # longest rows first, so the last wave holds the short ones
            start_m = gl.num_programs(0) - 1 - start_m
        h = gl.program_id(1)
        b = gl.program_id(2)
        q_row0 = b * N_CTX + start_m * BLOCK_M
        lse_row = (b.to(gl.int64) * H + h) * N_CTX
        if SPARSE:              # the query block's key tiles (sparse_ranges.tile_ranges; GROUP 1)
            n_lo, mid_lo, mid_hi, n_hi, q_pos, k_pos, q_bkt, k_bkt, q_n, k_n = hopper.sparse_side(
                ranges, q_pos, k_pos, q_bkt, k_bkt, q_len, k_len, b * H + h, start_m, gl.num_programs(0), N_CTX,
                HASH)
            if SKIP_DROPPED and not HASH:   # a block of dropped queries only (QK): dQ 0 (as in the dK/dV kernel)
                if hopper.dropped_tile(start_m * BLOCK_M, q_n):
                    if ROWS_OUT:
                        hopper.zero_rows(dq_out + (b.to(gl.int64) * N_CTX * H + h) * HEAD_DIM,
                                         q_rows + (b.to(gl.int64) * H + h) * N_CTX, start_m * BLOCK_M, H * HEAD_DIM,
                                         BLOCK_M, HEAD_DIM, gl.num_warps())
                    return
        else:
            n_lo = start_m * 0
            if CAUSAL:
                n_hi = (start_m + 1) * BLOCK_M
            else:
                n_hi = N_CTX
            mid_lo = n_lo       # unused
            mid_hi = n_lo
            q_n = n_lo
            k_n = n_lo
        if ROWS_OUT:            # (batch, head) row 0 of the row-order dQ and the head's slot -> row table
            dq_out += (b.to(gl.int64) * N_CTX * H + h) * HEAD_DIM
            q_rows += (b.to(gl.int64) * H + h) * N_CTX
        if GATHER:              # the same for the inputs (GROUP 1)
            gl.static_assert(SPARSE and ROWS_OUT, "GATHER: a sparse call's rows, results to rows")
            row0 = (b.to(gl.int64) * N_CTX * H + h) * HEAD_DIM
            q_ptr += row0
            k_ptr += row0
            v_ptr += row0
            do_ptr += row0
            k_rows += (b.to(gl.int64) * H + h) * N_CTX

        q_smem = gl.allocate_shared_memory(dtype, [2, WG_M, HEAD_DIM], desc_q.layout)
        do_smem = gl.allocate_shared_memory(dtype, [2, WG_M, HEAD_DIM], desc_do.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], desc_k.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], desc_v.layout)
        qdo_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(qdo_bar, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(kv_empty.index(i), count=2)
        fence_async_shared()

        gl.warp_specialize([
            (_dq_consumer, (0, q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready, kv_empty, desc_dq,
                            lse_ptr, delta_ptr, sm_scale * LOG2E_C, sm_scale, lse_row, q_row0, h * HEAD_DIM,
                            start_m * BLOCK_M, n_lo, n_hi, q_pos, k_pos, q_bkt, k_bkt, q_n, k_n, mid_lo, mid_hi,
                            dq_out, q_rows, H * HEAD_DIM, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, STRICT,
                            HOLD, SPARSE, SP_CAUSAL, HASH, ROWS_OUT, GATHER)),
            (_dq_consumer, (1, q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready, kv_empty, desc_dq,
                            lse_ptr, delta_ptr, sm_scale * LOG2E_C, sm_scale, lse_row, q_row0, h * HEAD_DIM,
                            start_m * BLOCK_M, n_lo, n_hi, q_pos, k_pos, q_bkt, k_bkt, q_n, k_n, mid_lo, mid_hi,
                            dq_out, q_rows, H * HEAD_DIM, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL, STRICT,
                            HOLD, SPARSE, SP_CAUSAL, HASH, ROWS_OUT, GATHER)),
            (_dq_producer, (q_smem, do_smem, k_smem, v_smem, qdo_bar, k_ready, v_ready, kv_empty, desc_q, desc_do,
                            desc_k, desc_v, q_row0, h * HEAD_DIM, b * N_CTX, (h // GROUP) * HEAD_DIM, n_lo, n_hi,
                            start_m * BLOCK_M, q_n, k_n, q_ptr, k_ptr, v_ptr, do_ptr, q_rows, k_rows, H * HEAD_DIM,
                            N_CTX, BLOCK_M, BLOCK_N, NUM_STAGES, GATHER)),
        ], [4, 4 if GATHER else 1], [232, 40] if GATHER and HEAD_DIM == 64 else [240, 24])

        mbarrier.invalidate(qdo_bar)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.invalidate(k_ready.index(i))
            mbarrier.invalidate(v_ready.index(i))
            mbarrier.invalidate(kv_empty.index(i))


def _desc(t: torch.Tensor, rows: int, cols: int, box):
    """A TMA descriptor over ``t`` seen as a row-major ``(rows, cols)`` matrix (``cols`` = 0: one flat row)."""
    lay = hopper.shared_layout(tuple(box), GL_DTYPES[t.dtype])
    if not cols:
        return TensorDescriptor(t, [rows], [1], box, lay)
    return TensorDescriptor(t, [rows, cols], [cols, 1], box, lay)


def launch_args(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                delta: torch.Tensor, softmax_scale: float, causal: bool, dq: torch.Tensor, dk: torch.Tensor,
                dv: torch.Tensor, atomic: bool, block_q: int = 0, strict: bool = False,
                dq_hold: Optional[bool] = None, sparse: Optional[SparseMeta] = None, rows_out: bool = False,
                gather: bool = False, skip: Optional[bool] = None):
    """``[(kernel, grid, args), ...]`` of one backward (each launched as ``kernel[grid](*args, num_warps=4)``):
    the dK/dV kernel, then (not ``atomic``) the dQ kernel. ``dq``: the fp32 accumulator when ``atomic``. Split
    out so that a machine without a GPU can compile the kernels (tests, ``compile_probe.py --hopper-bwd``).
    ``block_q``: query rows per dK/dV step (default :data:`BLOCK_Q_D64` at D=64 without ``atomic``, else
    :data:`BLOCK_Q`). ``strict`` (with ``causal``): keys j < i (:data:`hopper.STRICT_CAUSAL`). ``dq_hold``: the kernel
    that computes dQ (the dQ kernel, or with ``atomic`` the dK/dV kernel) waits for dP behind a predicated wait that
    reads all of the step's exponentials (default: the separate dQ kernel at the head dims of :data:`DQ_HOLD_D`).
    ``sparse``: the tensors are in slot order (:func:`sparse_bwd`), ``causal`` False, ``atomic`` False, one query
    head per K/V head. ``rows_out`` (with ``sparse`` and its row tables): ``dq`` / ``dk`` / ``dv`` are in row
    order and the kernels write each slot's gradient straight to its row. ``gather`` (with ``rows_out``): so are
    ``q`` / ``k`` / ``v`` / ``do`` (contiguous), ``lse`` and ``delta``, and the producers read them through the
    row tables. ``skip`` (default ``hopper.skip_dropped``; ``hopper.skips`` says where it applies): blocks of dropped
    slots only write zero gradients and exit."""
    b, s, h, d = q.shape
    hk = k.shape[2]
    if dq_hold is None:
        dq_hold = d in DQ_HOLD_D and not atomic
    half = [BLOCK_KEYS // 2, d]
    # sparse: 64 rows (at D=64, 128 spill 128-136 B in the hash-sparse dK/dV kernel: the masked tiles' query
    # positions and buckets, 32 registers each; and smaller tiles cut across the pattern less)
    bq = block_q or (BLOCK_Q_D64 if d == 64 and not atomic and sparse is None else BLOCK_Q)
    if bq not in (64, 128) or s % bq:
        raise ValueError(f"block_q must be 64 or 128 and divide the sequence length {s}, got {bq}")
    if atomic and bq != BLOCK_Q:
        raise ValueError(f"the atomic dQ takes block_q={BLOCK_Q} (the size it was measured at; at D=128 its dS^T "
                         f"pairs of 128 rows would not fit shared memory), got {bq}")
    if sparse is not None and (causal or atomic or h != hk):
        raise ValueError("a sparse backward takes causal=False (the side tensors' positions carry causality), the "
                         f"separate dQ and one query head per K/V head; got causal={causal}, atomic={atomic}, "
                         f"{h} / {hk} heads")
    if rows_out and (sparse is None or sparse.q_rows is None or sparse.k_rows is None):
        raise ValueError("rows_out writes through a sparse call's row tables: it needs sparse with q_rows / k_rows")
    if gather and not (rows_out and all(t.is_contiguous() for t in (q, k, v, do))):
        raise ValueError("gather reads row-order inputs through the row tables: it needs rows_out and contiguous "
                         "q / k / v / do")
    outs_kq, outs_qk = ((dk, dv, sparse.k_rows), (dq, sparse.q_rows)) if rows_out else ((lse,) * 3, (lse,) * 2)
    ins_kq, ins_qk = ((q, k, v, do, lse, delta, sparse.q_rows), (q, k, v, do, sparse.k_rows)) if gather else \
        ((lse,) * 7, (lse,) * 5)
    skip = hopper.skips(sparse, skip)
    if sparse is None:          # unused pointers
        side, ranges_kq, ranges_qk, flags = (lse,) * 6, lse, lse, (False, False, False)
    else:
        side = (sparse.q_pos, sparse.k_pos, sparse.q_bkt if sparse.q_bkt is not None else sparse.q_pos,
                sparse.k_bkt if sparse.k_bkt is not None else sparse.k_pos, sparse.q_len, sparse.k_len)
        ranges_kq = tile_ranges(sparse, 1, BLOCK_KEYS, bq, from_keys=True)
        ranges_qk = tile_ranges(sparse, 1, DQ_BLOCK_M, DQ_BLOCK_N, from_keys=False)
        flags = (True, sparse.causal, sparse.q_bkt is not None)
    dkdv = (_desc(q, b * s, h * d, [bq, d]), _desc(k, b * s, hk * d, half), _desc(v, b * s, hk * d, half),
            _desc(do, b * s, h * d, [bq, d]), _desc(lse, b * h * s, 0, [bq]),
            _desc(delta, b * h * s, 0, [bq]), _desc(dk, b * s, hk * d, half), _desc(dv, b * s, hk * d, half),
            dq, softmax_scale, s, h, h // hk, ranges_kq, *side, *outs_kq, *ins_kq, BLOCK_KEYS, bq, d, NUM_STAGES,
            causal, atomic, int(causal and strict), bool(dq_hold and atomic), *flags, rows_out, gather, skip)
    launches = [(_bwd_dkdv_hopper, (s // BLOCK_KEYS, hk, b), dkdv)]
    if not atomic:
        wg = [DQ_BLOCK_M // 2, d]
        kv = [DQ_BLOCK_N, d]
        dq_args = (_desc(q, b * s, h * d, wg), _desc(k, b * s, hk * d, kv), _desc(v, b * s, hk * d, kv),
                   _desc(do, b * s, h * d, wg), _desc(dq, b * s, h * d, wg), lse, delta, softmax_scale, s, h,
                   h // hk, ranges_qk, *side, *outs_qk, *ins_qk, DQ_BLOCK_M, DQ_BLOCK_N, d, NUM_STAGES, causal,
                   int(causal and strict), bool(dq_hold), *flags, rows_out, gather, skip)
        launches.append((_bwd_dq_hopper, (s // DQ_BLOCK_M, h, b), dq_args))
    return launches


def _delta(out: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
           sparse: Optional[SparseMeta] = None) -> torch.Tensor:
    """rowsum(dO * O) - dlse, ``(B, H, S)`` fp32: the portable backward's preprocess kernel (``sparse`` with row
    tables: the kept tokens' rows only)."""
    b, s, h, _ = out.shape
    return flash.preprocess(out, do, lse, dlse, (h, s, s, None, None), sparse=sparse)


def bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        softmax_scale: float, causal: bool, dlse: Optional[torch.Tensor] = None,
        dq_mode: str = "separate", **config) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the inputs' dtype for a call that :func:`applies`; lse ``(B, H, S)`` fp32 natural log
    (as the forwards return it), ``dlse`` an optional gradient on it; ``config``: :func:`launch_args`' keywords
    (``strict``; benchmarks)."""
    if dq_mode not in DQ_MODES:
        raise ValueError(f"dq_mode must be one of {DQ_MODES}, got {dq_mode!r}")
    do, out, lse = hopper.aligned(do), hopper.aligned(out), lse.contiguous()
    delta = _delta(out, do, lse, dlse)
    atomic = dq_mode == "atomic"
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else torch.empty_like(q)
    for kernel, grid, args in launch_args(do, q, k, v, lse, delta, softmax_scale, causal, dq, dk, dv, atomic,
                                          **config):
        LAUNCH[kernel][grid](*args, num_warps=4)
    if atomic:          # the softmax scale and the cast in one pass (the kernel adds unscaled dS K)
        dq = torch.mul(dq, softmax_scale, out=torch.empty_like(q))
    return dq, dk, dv


SPARSE_ENV = "FLASHRING_HOPPER_SPARSE_BWD"
# sparse_bwd's kernels write dq / dk / dv straight to their rows (no scatter launches: 3 of the backward's 7
# copies) instead of in slot order. H100, session 16 (sparse_tiles.py, 16k, B=1, H=32, D=64, causal, every kernel of
# a forward + backward on the portable forward; h100-sparse-tiles-20261207-212557-8fc485b.jsonl): 0.08-0.15 ms
# less than the copies back (QK drop 0.5 3.22 -> 3.14 ms, drop 0.8 1.04 -> 0.96, hash 8 2.72 -> 2.57, hash 16 2.08
# -> 1.94), gradients bitwise equal (GPU test)
SPARSE_ROWS_OUT = True


def sparse_wanted() -> bool:
    """Whether the sparse front ends' backward goes to these kernels (:func:`sparse_bwd`): on unless
    ``FLASHRING_HOPPER_SPARSE_BWD=0``. H100, session 15 (``benchmarks/sparse_tiles.py``, B=1, H=32, D=64, causal,
    every kernel of a forward + backward on the portable forward): 1.00-1.47x faster than the portable row-table
    backward at 8k / 16k, QK drop 0.5 / 0.8 and hash 8 / 16 (16k, drop 0.5: 4.87 -> 3.32 ms;
    ``results/h100-sparse-tiles-20261207-190624-14f49e0.jsonl``)."""
    return os.environ.get(SPARSE_ENV, "1") != "0"


def sparse_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, softmax_scale: float, sparse: SparseMeta, dlse: Optional[torch.Tensor] = None,
               rows_out: Optional[bool] = None, gather: Optional[bool] = None,
               **config) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sparse front end's ``(dq, dk, dv)`` (``hopper.sparse_applies``) on the dense kernels: the tensors gathered
    into slot order (``sparse.q_rows`` / ``k_rows``; without them they are in slot order already; padding slots
    zero: ``sparse_ranges.slot_copy``), each program's tiles from ``sparse_ranges.tile_ranges``, the tiles that
    cross the pattern masked by the slots' positions and buckets, the gradients scattered back to their rows. A
    query slot past its head's kept count gets an LSE of +inf and a delta of 0 (its P is 0, so it adds nothing and
    its dQ is 0); key slots past the count get zero dK / dV in the kernel. ``rows_out`` (default
    :data:`SPARSE_ROWS_OUT`; with row tables): the kernels write the gradients straight to their rows instead of
    the copies back. ``gather`` (default ``hopper.gather_wanted``; with row tables): no copies at all, the
    producers read the rows through the tables and the gradients go straight to their rows. ``config``:
    :func:`launch_args`' keywords (benchmarks)."""
    delta = _delta(hopper.aligned(out), hopper.aligned(do), lse.contiguous(), dlse, sparse)     # per row
    rows = sparse.q_rows is not None and sparse.k_rows is not None
    gather = rows and (hopper.gather_wanted(sparse, q.shape[-1]) if gather is None else gather)
    rows_out = gather or (rows and (SPARSE_ROWS_OUT if rows_out is None else rows_out))
    if gather:
        q, k, v, do, lse = (hopper.aligned(t) for t in (q, k, v, do, lse))
    else:
        (q, do), (lse, delta) = slot_copy([q, do], sparse.q_rows, sparse.q_len, sides=(lse.contiguous(), delta))
        k, v = slot_copy([k, v], sparse.k_rows, sparse.k_len)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)      # contiguous, either order
    for kernel, grid, args in launch_args(do, q, k, v, lse, delta, softmax_scale, False, dq, dk, dv, False,
                                          sparse=sparse, rows_out=rows_out, gather=gather, **config):
        LAUNCH[kernel][grid](*args, num_warps=4)
    if rows_out:
        return dq, dk, dv
    return (*slot_return([dq], sparse.q_rows, sparse.q_len), *slot_return([dk, dv], sparse.k_rows, sparse.k_len))


# Triton's generic launch path costs ~50 us of host time per call on the GPU machines (ops/launch.py), as much as a
# 1k-token backward; empty where Gluon is missing.
LAUNCH = {kernel: Launcher(kernel) for kernel in (_bwd_dkdv_hopper, _bwd_dq_hopper)} if AVAILABLE else {}
