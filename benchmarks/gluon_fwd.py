"""A Hopper (sm_90) attention forward in Gluon, FA3-style: a prototype for issue 13, kept apart from the library.

    PYTHONPATH=src python3 benchmarks/gluon_fwd.py [--out DIR]     # GPU: check + time; no GPU: compile for sm_90

One program = one 128-row query tile of one (batch, head): a 1-warp TMA producer fills a 2-stage K/V ring (separate
K-ready and V-ready mbarriers, so S can start before V lands; one "empty" barrier per stage, one arrival per
consumer), and two 4-warp consumer warpgroups (64 query rows each) compute S = Q K^T with wgmma (Q, K in shared
memory), an online softmax in registers (base 2, the scale folded in), and O += P V with P kept in registers as the
wgmma A operand. OVERLAP: FA3's intra-warpgroup order (issue S_j, rescale O, issue P_{j-1} V_{j-1}, softmax(S_j)
while that runs); PINGPONG: the two warpgroups take turns issuing their wgmmas through two mbarrier tokens.
Layout (B, H, N, D) contiguous, N a multiple of 128, D <= 256, bf16/fp16; causal (top-left = bottom-right when
Sq = Sk) and GQA. No varlen, window, softcap, sparse modes or backward: those stay on the portable kernels.

Status (2026-11-23): written and compiled for sm_90 with triton 3.6 on a machine without a GPU (168 registers, no
spills, 164 KB of shared memory at D=128 with 2 stages); never run. Findings from the compiled code, and the Gluon
pitfalls met, are in benchmarks/NOTES.md (session 6). This driver is what the next device session runs: on a GPU
it checks every configuration against the float64 reference with flashring.testing's rule (a hang would be a
barrier-protocol bug: run it under `timeout`), then times the passing ones against flashring's kernel and SDPA.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.experimental.gluon.language.nvidia.hopper import (
    tma,
    mbarrier,
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)


@gluon.jit
def _consumer(WG: gl.constexpr, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, desc_o, lse_ptr,
              qk_scale, N_CTX, start_m, off_hz, q_row0, n_lo, n_hi,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, OVERLAP: gl.constexpr, PINGPONG: gl.constexpr, NUM_WG: gl.constexpr):
    """One consumer partition.  NUM_WG=2: a single warpgroup (4 warps) handling WG_M = BLOCK_M // 2 query rows;
    NUM_WG=1: one 8-warp partition (both warpgroups in lock-step) handling all BLOCK_M rows."""
    WG_M: gl.constexpr = BLOCK_M // NUM_WG
    NW: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_row: gl.constexpr = gl.SliceLayout(1, s_layout)
    s_col: gl.constexpr = gl.SliceLayout(0, s_layout)
    o_row: gl.constexpr = gl.SliceLayout(1, o_layout)

    q = q_smem.index(WG)
    mbarrier.wait(q_bar, 0)

    m_i = gl.full([WG_M], float("-inf"), gl.float32, s_row)
    l_i = gl.full([WG_M], 0.0, gl.float32, s_row)
    acc = gl.zeros([WG_M, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([WG_M, BLOCK_N], gl.float32, s_layout)

    row_lo = start_m * BLOCK_M + WG * WG_M
    rows = row_lo + gl.arange(0, WG_M, s_row)
    cols0 = gl.arange(0, BLOCK_N, s_col)

    num_iters = (n_hi - n_lo) // BLOCK_N
    if OVERLAP:
        acc, m_i, l_i = _overlap_fa3_order(q, k_smem, v_smem, k_ready, v_ready, kv_empty, qk_scale, n_lo, num_iters,
                                           rows, row_lo, cols0, acc, m_i, l_i, s_zero, o_row, p_layout, BLOCK_N,
                                           NUM_STAGES, CAUSAL, turn, WG, PINGPONG)
    else:
        for it in range(num_iters):
            stage = it % NUM_STAGES
            phase = (it // NUM_STAGES) & 1
            start_n = n_lo + it * BLOCK_N
            mbarrier.wait(k_ready.index(stage), phase)
            s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
            p, alpha, m_i, l_i = _softmax_tile(s, start_n, rows, row_lo, cols0, m_i, l_i, qk_scale, CAUSAL)
            acc = acc * gl.convert_layout(alpha, o_row)[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            mbarrier.wait(v_ready.index(stage), phase)
            o_tok = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
            mbarrier.arrive(kv_empty.index(stage), count=1)

    # epilogue: normalise, stage through this warpgroup's (now idle) Q buffer, TMA store.
    l_o = gl.convert_layout(l_i, o_row)
    out = (acc / l_o[:, None]).to(dtype)
    q.store(out)
    fence_async_shared()
    tma.async_copy_shared_to_global(desc_o, [q_row0 + WG * WG_M, 0], q)
    # natural-log LSE (scores were scaled by log2(e) * sm_scale)
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    gl.store(lse_ptr + off_hz * N_CTX + rows, lse)
    tma.store_wait(pendings=0)


@gluon.jit
def _softmax_tile(s, start_n, rows, row_lo, cols0, m_i, l_i, qk_scale, CAUSAL: gl.constexpr):
    """Online softmax of one score tile in base 2: (p, alpha, m, l); ``row_lo`` = rows' first (a scalar)."""
    BLOCK_N: gl.constexpr = s.shape[1]
    s = s * qk_scale
    if CAUSAL:
        # only tiles that reach past this warpgroup's first row are masked (a uniform branch): at N = 4k with
        # 128-row tiles, 1 tile in 16 on average instead of all of them
        if start_n + BLOCK_N - 1 > row_lo:
            keep = rows[:, None] >= (start_n + cols0)[None, :]
            s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@gluon.jit
def _overlap_fa3_order(q, k_smem, v_smem, k_ready, v_ready, kv_empty, qk_scale, n_lo, num_iters, rows, row_lo, cols0,
                       acc, m_i, l_i, s_zero, o_row: gl.constexpr, p_layout: gl.constexpr, BLOCK_N: gl.constexpr,
                       NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """The statement order of FA3's intra-warpgroup overlap (its Hopper main loop): issue S_j; rescale O by the
    previous tile's alpha while no wgmma writes O; issue O += P_{j-1} V_{j-1}; wait(1) -> S_j; softmax(S_j);
    wait(0) -> O; release the stage; only the bf16 conversion of P_j follows the PV wait."""
    dtype: gl.constexpr = q.dtype
    mbarrier.wait(k_ready.index(0), 0)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), 0)
    s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG), count=1)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
    p, alpha, m_i, l_i = _softmax_tile(s, n_lo, rows, row_lo, cols0, m_i, l_i, qk_scale, CAUSAL)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for it in range(1, num_iters):
        stage = it % NUM_STAGES
        phase = (it // NUM_STAGES) & 1
        prev = (it - 1) % NUM_STAGES
        prev_phase = ((it - 1) // NUM_STAGES) & 1
        mbarrier.wait(k_ready.index(stage), phase)
        mbarrier.wait(v_ready.index(prev), prev_phase)
        if PINGPONG:
            mbarrier.wait(turn.index(WG), it & 1)
        s_tok = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = acc * gl.convert_layout(alpha, o_row)[:, None]
        o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG), count=1)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
        p, alpha, m_i, l_i = _softmax_tile(s, n_lo + it * BLOCK_N, rows, row_lo, cols0, m_i, l_i, qk_scale, CAUSAL)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
        mbarrier.arrive(kv_empty.index(prev), count=1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
    last = (num_iters - 1) % NUM_STAGES
    last_phase = ((num_iters - 1) // NUM_STAGES) & 1
    mbarrier.wait(v_ready.index(last), last_phase)
    if PINGPONG:
        mbarrier.wait(turn.index(WG), num_iters & 1)
    acc = acc * gl.convert_layout(alpha, o_row)[:, None]
    o_tok = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG), count=1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
    mbarrier.arrive(kv_empty.index(last), count=1)
    return acc, m_i, l_i


@gluon.jit
def _producer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, desc_q, desc_k, desc_v, q_row0, kv_row0,
              n_lo, n_hi, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
              NUM_WG: gl.constexpr):
    WG_M: gl.constexpr = BLOCK_M // NUM_WG
    mbarrier.expect(q_bar, NUM_WG * desc_q.block_type.nbytes)
    for w in gl.static_range(NUM_WG):
        tma.async_copy_global_to_shared(desc_q, [q_row0 + w * WG_M, 0], q_bar, q_smem.index(w))
    num_iters = (n_hi - n_lo) // BLOCK_N
    for it in range(num_iters):
        stage = it % NUM_STAGES
        phase = (it // NUM_STAGES) & 1
        # fresh mbarriers count as "phase 1 complete": waiting on phase^1 lets the first NUM_STAGES loads through
        mbarrier.wait(kv_empty.index(stage), phase ^ 1)
        row = kv_row0 + n_lo + it * BLOCK_N
        mbarrier.expect(k_ready.index(stage), desc_k.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [row, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.expect(v_ready.index(stage), desc_v.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_v, [row, 0], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def attn_fwd_ws_kernel(desc_q, desc_k, desc_v, desc_o, lse_ptr, sm_scale, N_CTX, H, H_KV,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                       NUM_STAGES: gl.constexpr, CAUSAL: gl.constexpr, OVERLAP: gl.constexpr,
                       PINGPONG: gl.constexpr, PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       NUM_WG: gl.constexpr):
    gl.static_assert(gl.num_warps() == 4 * (3 - NUM_WG), "NUM_WG=2: num_warps=4; NUM_WG=1: num_warps=8")
    WG_M: gl.constexpr = BLOCK_M // NUM_WG
    dtype: gl.constexpr = desc_q.dtype
    start_m = gl.program_id(0)
    if CAUSAL:      # longest rows first, so the last wave holds the short ones (LPT order)
        start_m = gl.num_programs(0) - 1 - start_m
    off_hz = gl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    off_hkv = off_h // (H // H_KV)  # GQA: query head -> kv head
    q_row0 = off_hz * N_CTX + start_m * BLOCK_M
    kv_row0 = (off_z * H_KV + off_hkv) * N_CTX
    qk_scale = sm_scale * 1.4426950408889634
    n_lo = 0
    if CAUSAL:
        n_hi = gl.minimum((start_m + 1) * BLOCK_M, N_CTX)
    else:
        n_hi = N_CTX

    q_smem = gl.allocate_shared_memory(dtype, [NUM_WG, WG_M, HEAD_DIM], desc_q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_DIM], desc_v.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=NUM_WG)  # one arrive per consumer partition
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # ping-pong turnstile
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    # the TMA unit (the async proxy) signals these barriers: make their initialisation visible to it first
    fence_async_shared()
    if PINGPONG:
        gl.static_assert(OVERLAP != 0, "ping-pong is implemented on the overlapped loop only")
        gl.static_assert(NUM_WG == 2, "ping-pong needs the two warpgroups in separate partitions")
        mbarrier.arrive(turn.index(0), count=1)  # warpgroup 0 issues first

    # NB: build the argument tuples inline.  Assigning a tuple to a local first (`args = (..., BLOCK_M)`) turns its
    # constexpr elements into int32 tensors (plain assignment sanitises constexprs), which breaks layouts/shapes.
    if NUM_WG == 2:
        gl.warp_specialize([
            (_consumer, (0, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, desc_o, lse_ptr, qk_scale,
                         N_CTX, start_m, off_hz, q_row0, n_lo, n_hi, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL,
                         OVERLAP, PINGPONG, NUM_WG)),
            (_consumer, (1, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, desc_o, lse_ptr, qk_scale,
                         N_CTX, start_m, off_hz, q_row0, n_lo, n_hi, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL,
                         OVERLAP, PINGPONG, NUM_WG)),
            (_producer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, desc_q, desc_k, desc_v, q_row0,
                         kv_row0, n_lo, n_hi, BLOCK_M, BLOCK_N, NUM_STAGES, NUM_WG)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_consumer, (0, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, turn, desc_o, lse_ptr, qk_scale,
                         N_CTX, start_m, off_hz, q_row0, n_lo, n_hi, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES, CAUSAL,
                         OVERLAP, PINGPONG, NUM_WG)),
            (_producer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, desc_q, desc_k, desc_v, q_row0,
                         kv_row0, n_lo, n_hi, BLOCK_M, BLOCK_N, NUM_STAGES, NUM_WG)),
        ], [1], [PRODUCER_REGS])

    mbarrier.invalidate(q_bar)
    mbarrier.invalidate(turn.index(0))
    mbarrier.invalidate(turn.index(1))
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(k_ready.index(i))
        mbarrier.invalidate(v_ready.index(i))
        mbarrier.invalidate(kv_empty.index(i))


def make_descs(q, k, v, o, BLOCK_M, BLOCK_N, NUM_WG=2):
    B, H, N, D = q.shape
    H_KV = k.shape[1]
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[q.dtype]
    q_blk, kv_blk = [BLOCK_M // NUM_WG, D], [BLOCK_N, D]
    q_lay = gl.NVMMASharedLayout.get_default_for(q_blk, gdt)
    kv_lay = gl.NVMMASharedLayout.get_default_for(kv_blk, gdt)
    dq = TensorDescriptor(q, [B * H * N, D], [D, 1], q_blk, q_lay)
    dk = TensorDescriptor(k, [B * H_KV * N, D], [D, 1], kv_blk, kv_lay)
    dv = TensorDescriptor(v, [B * H_KV * N, D], [D, 1], kv_blk, kv_lay)
    do = TensorDescriptor(o, [B * H * N, D], [D, 1], q_blk, q_lay)
    return dq, dk, dv, do


def prepare(q, k, v, sm_scale, causal, BLOCK_M=128, BLOCK_N=128, NUM_STAGES=2, OVERLAP=0, PINGPONG=False,
            producer_regs=24, consumer_regs=240, NUM_WG=2):
    """(grid, args, num_warps, o, lse) of one call: descriptors and outputs built once, so a launch of
    ``attn_fwd_ws_kernel[grid](*args, num_warps=num_warps)`` times the kernel, not their set-up."""
    B, H, N, D = q.shape
    assert N % BLOCK_M == 0 and N % BLOCK_N == 0, "prototype: no ragged tails"
    o = torch.empty_like(q)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    dq, dk, dv, do = make_descs(q, k, v, o, BLOCK_M, BLOCK_N, NUM_WG)
    args = (dq, dk, dv, do, lse, sm_scale, N, H, k.shape[1], BLOCK_M, BLOCK_N, D, NUM_STAGES, causal, OVERLAP,
            PINGPONG, producer_regs, consumer_regs, NUM_WG)
    return (N // BLOCK_M, B * H), args, 4 if NUM_WG == 2 else 8, o, lse


CONFIGS = [dict(OVERLAP=0, PINGPONG=False), dict(OVERLAP=1, PINGPONG=False), dict(OVERLAP=1, PINGPONG=True),
           dict(OVERLAP=0, PINGPONG=False, NUM_STAGES=3)]     # 3 stages fit in shared memory at D = 64 only
# (B, H, H_KV, N, D): GQA at 1k, then issue 13's grid (16k tokens per batch, hidden 2048)
SHAPES = [(2, 8, 2, 1024, 128), (4, 16, 16, 4096, 128), (2, 16, 16, 8192, 128), (1, 16, 16, 16384, 128),
          (2, 32, 32, 8192, 64), (1, 32, 32, 16384, 64)]


def compile_only(args) -> int:
    """No GPU here: compile every configuration for sm_90 and print its resources."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compile_probe import TargetOnly, usage
    triton.runtime.driver.set_active(TargetOnly(90))
    print(f"triton {triton.__version__}, sm_90, compiled only (no GPU)")
    for b, h, hkv, n, d in SHAPES:
        q = torch.empty(b, h, n, d, dtype=torch.bfloat16)
        k = torch.empty(b, hkv, n, d, dtype=torch.bfloat16)
        for cfg in CONFIGS:
            for causal in (False, True):
                grid, kargs, num_warps, _, _ = prepare(q, k, k, d ** -0.5, causal, **cfg)
                kern = attn_fwd_ws_kernel.warmup(*kargs, grid=grid, num_warps=num_warps)
                print(f"B={b} H={h}/{hkv} N={n} D={d} causal={causal!s:<5} {cfg}: {usage(kern, False)}")
    return 0


def finite(c: dict) -> dict:
    """A check result JSON can hold (a NaN error becomes None)."""
    return {k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else None) for k, v in c.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="append one JSON line per result to DIR/gluon-fwd.jsonl as it is measured")
    p.add_argument("--configs", default=",".join(str(i) for i in range(len(CONFIGS))),
                   help="comma list of indices into CONFIGS (one per process lets a hang cost only its own)")
    args = p.parse_args(argv)
    try:
        configs = [CONFIGS[int(i)] for i in args.configs.split(",")]
    except (ValueError, IndexError):
        p.error(f"--configs: expected indices in 0..{len(CONFIGS) - 1}, got {args.configs!r}")
    if not torch.cuda.is_available():
        return compile_only(args)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import flashring
    from flashring.bench.harness import attention_flops, cuda_graph, time_ms
    from flashring.metadata import run_metadata
    from flashring.testing import OUT_FACTOR, check_close, reference_pair
    dev = torch.device("cuda")
    sink = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        sink = open(Path(args.out) / "gluon-fwd.jsonl", "a")

    def emit(row):            # written as measured: a hang (killed by timeout) or a fault keeps what came before
        if sink is not None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    def graph_ms(fn):
        """Device time of fn replayed from a CUDA graph (no launch overhead, for all three alike), or None."""
        try:
            return time_ms(cuda_graph(fn, dev), dev)
        except Exception as exc:                      # e.g. no cuDNN kernel for the shape
            print(f"   timing failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            return None

    emit(run_metadata(dev, ["benchmarks/gluon_fwd.py", *(argv or sys.argv[1:])]))
    print(f"{'shape':<28} {'causal':<6} {'config':<28} {'check':<6} {'gluon':>7} {'flashring':>9} {'cudnn':>7}  "
          "TFLOP/s (ms: CUDA-graph replays)")
    broken = False
    for b, h, hkv, n, d in SHAPES:
        q = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        for causal in (False, True):
            fl = attention_flops(b, n, n, h, d, causal, "fwd")
            qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))       # flashring's (B, S, H, D)
            t_ring = graph_ms(lambda: flashring.flash_attn_func(qf, kf, vf, causal=causal))
            kr, vr = (t.repeat_interleave(h // hkv, dim=1) for t in (k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t_cudnn = graph_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=causal))
            # the float64 reference and the bf16 one on the first batch element and the query heads of its first
            # KV head (scores materialised: 2 GB per head at 16k)
            g = h // hkv
            refs = reference_pair(qf[:1, :, :g], kf[:1, :, :1], vf[:1, :, :1], None, upper=0 if causal else None)
            for cfg in configs:
                row = dict(type="result", B=b, H=h, H_KV=hkv, N=n, D=d, causal=causal, **cfg)
                try:
                    grid, kargs, num_warps, out, lse = prepare(q, k, v, d ** -0.5, causal, **cfg)

                    def run():
                        attn_fwd_ws_kernel[grid](*kargs, num_warps=num_warps)
                    run()
                    torch.cuda.synchronize()
                    c_out = check_close(out[:1, :g].transpose(1, 2), refs["ref"]["out"], refs["low"]["out"],
                                        OUT_FACTOR, q.dtype)
                    c_lse = check_close(lse[:1, :g], refs["ref"]["lse"], refs["low"]["lse"], OUT_FACTOR, torch.float32)
                    ok = c_out["ok"] and c_lse["ok"]
                    row.update(check="PASS" if ok else "FAIL", check_detail=dict(out=finite(c_out),
                                                                                 lse=finite(c_lse)))
                    if ok:
                        row["ms"] = graph_ms(run)
                except Exception as exc:             # a compile or launch failure is a result here, not a crash
                    row.update(check="ERROR", check_detail=f"{type(exc).__name__}: {str(exc)[:200]}")
                    broken = "cuda" in str(exc).lower()      # a device fault leaves the context unusable
                row.update(flashring_ms=t_ring, cudnn_ms=t_cudnn)
                emit(row)
                ms = row.get("ms")
                tf = " / ".join("-" if t is None else f"{fl / t / 1e9:.0f}" for t in (ms, t_ring, t_cudnn))
                nan = float("nan")
                print(f"B={b} H={h}/{hkv} N={n} D={d:<4} {causal!s:<6} {str(cfg):<28} {row['check']:<6} "
                      f"{ms or nan:>7.3f} {t_ring or nan:>9.3f} {t_cudnn or nan:>7.3f}  {tf}", flush=True)
                if broken:
                    print("stopping: the CUDA context is unusable after that error", flush=True)
                    return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
