"""Probe (issue 13): does a TMA (tensor-descriptor) forward, with or without Triton's automatic warp
specialization, beat the portable pointer-load forward on an H100? A minimal dense kernel (Sq == Sk, causal or not,
GQA), timed side by side with ``flashring.ops.flash.fwd`` and cuDNN in one process. Not library code: the winner's
ideas go into ``ops/flash.py``.

    PYTHONPATH=src python benchmarks/hopper_probe.py --out OUT
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from flashring.bench import harness as H
from flashring.metadata import run_metadata
from flashring.ops import flash
from flashring.testing import check_close, reference_pair


@triton.jit
def _inner(acc, l_i, m_i, q, desc_k, desc_v, b, hk, offs_m, lo, hi, qk_scale, BLOCK_N: tl.constexpr,
           HEAD_DIM: tl.constexpr, MASK: tl.constexpr, WS: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WS):
        k = desc_k.load([b, start_n, hk, 0]).reshape(BLOCK_N, HEAD_DIM)
        s = tl.dot(q, k.T) * qk_scale
        if MASK:
            s = tl.where((start_n + offs_n)[None, :] <= offs_m[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([b, start_n, hk, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_tma(desc_q, desc_k, desc_v, desc_o, LSE, seqlen, qk_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = desc_q.load([b, start_m, h, 0]).reshape(BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    hi = seqlen
    if CAUSAL:
        hi = start_m                              # unmasked tiles strictly left of the diagonal block
    acc, l_i, m_i = _inner(acc, l_i, m_i, q, desc_k=desc_k, desc_v=desc_v, b=b, hk=hk, offs_m=offs_m, lo=0, hi=hi,
                           qk_scale=qk_scale, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASK=False, WS=WS)
    if CAUSAL:
        acc, l_i, m_i = _inner(acc, l_i, m_i, q, desc_k=desc_k, desc_v=desc_v, b=b, hk=hk, offs_m=offs_m,
                               lo=start_m, hi=tl.minimum(start_m + BLOCK_M, seqlen), qk_scale=qk_scale,
                               BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, MASK=True, WS=WS)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + (b * tl.num_programs(1) + h).to(tl.int64) * seqlen + offs_m, lse, mask=offs_m < seqlen)
    out = (acc / l_i[:, None]).to(desc_o.dtype)
    desc_o.store([b, start_m, h, 0], out.reshape(1, BLOCK_M, 1, HEAD_DIM))


def tma_fwd(q, k, v, causal, BM, BN, warps, stages, ws):
    b, n, h, d = q.shape
    hk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    desc = lambda t, blk: TensorDescriptor(t, list(t.shape), list(t.stride()), [1, blk, 1, d])  # noqa: E731
    dq, dk, dv, do = desc(q, BM), desc(k, BN), desc(v, BN), desc(out, BM)
    _fwd_tma[(triton.cdiv(n, BM), h, b)](dq, dk, dv, do, lse, n, d ** -0.5 * 1.4426950408889634, GROUP=h // hk,
                                         HEAD_DIM=d, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal, WS=ws,
                                         num_warps=warps, num_stages=stages)
    return out


VARIANTS = [  # (BM, BN, warps, stages, warp_specialize)
    (128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 64, 4, 3, False), (128, 64, 8, 3, False),
    (128, 128, 4, 2, True), (128, 64, 4, 3, True), (128, 128, 8, 2, True),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seed = int(time.time()) % 100000
    torch.manual_seed(seed)
    print("seed", seed, flush=True)
    shapes = [(4, 4096, 16, 128, False), (2, 8192, 16, 128, True), (1, 16384, 16, 128, True),
              (16, 1024, 16, 128, True), (2, 8192, 32, 64, True)]
    variants = VARIANTS
    if args.quick or dev.type != "cuda":
        shapes, variants = [(1, 256, 2, 64, True), (1, 256, 2, 64, False)], [(64, 32, 4, 1, False)]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for b, n, h, d, causal in shapes:
        q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dtype) for _ in range(3))
        flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
        refs = None
        if b * n * n * h <= 2 ** 31:                  # the materialised reference fits comfortably
            refs = reference_pair(q, k, v, None, upper=0 if causal else None)
        label = f"B={b} N={n} H={h} D={d} causal={causal}"
        fns = {"flashring": lambda: flash.fwd(q, k, v, d ** -0.5, None, 0 if causal else None)[0]}
        if dev.type == "cuda":
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
            fns["cudnn"] = cudnn
        for var in variants:
            fns["tma-%dx%d-w%d-s%d%s" % (var[:4] + ("-ws" if var[4] else "",))] = \
                (lambda var=var: tma_fwd(q, k, v, causal, *var))
        for name, fn in fns.items():
            row = dict(label=label, provider=name)
            try:
                out = fn()
                if refs is not None:
                    c = check_close(out, refs["ref"]["out"], refs["low"]["out"], 2.0, q.dtype)
                    row["check"] = "ok" if c["ok"] else f"FAIL err {c['err']:.3g} tol {c['tol']:.3g}"
                ms = H.time_ms(fn, dev)
                row.update(ms=ms, tflops=flops / ms / 1e9)
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result, not a crash
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    H.write_jsonl(args.out / "hopper-probe.jsonl", [dict(meta=run_metadata(dev), seed=seed)] + rows)
    for r in rows:
        print(f"{r['label']:<36} {r['provider']:<24} "
              + (f"{r['tflops']:7.1f} TFLOP/s {r.get('check', '-')}"
                 if "tflops" in r else r["error"][:90]))


if __name__ == "__main__":
    main()
