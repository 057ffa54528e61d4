"""Where a sparse fwd+bwd call's GPU time goes (issue 14's "fixed cost"): CUDA time per kernel name from
torch.profiler, grouped into the attention kernels (Triton fwd/bwd), the tile-range builder, and everything else
(compaction, sorting, gathers, scatter-back), next to dense flashring's fwd+bwd on the same shape, and the CUDA-graph
replay time of each call (device work alone) against its eager time (harness).

    PYTHONPATH=src python benchmarks/sparse_gpu_profile.py [--seqlen 8192]
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import inspect
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

import flashring
from flashring.bench import harness as H


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--nheads", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="e.g. 4 at --seqlen 4096: the sparse suite's 16k tokens")
    ap.add_argument("--host-profile", action="store_true", help="cProfile the sparse calls' host side")
    args = ap.parse_args()
    dev = torch.device("cuda")
    b, s, h, d = args.batch, args.seqlen, args.nheads, 64
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16)
    calls = {
        "dense": lambda: flashring.flash_attn_func(q, k, v, causal=True),
        "qk drop 0.5": lambda: flashring.qk_sparse_attn_func(q, k, v, qa, ka, causal=True),
        "qk drop 0.8": lambda: flashring.qk_sparse_attn_func(q, k, v, qa8, ka8, causal=True),
        "hash 16": lambda: flashring.hash_sparse_attn_func(q, k, v, qb, qb, causal=True, **hash_kw),
    }
    qa, ka = (torch.rand(b, s, h, device=dev) > 0.5 for _ in range(2))
    qa8, ka8 = (torch.rand(b, s, h, device=dev) > 0.8 for _ in range(2))
    qb = torch.randint(0, 16, (b, s, h), device=dev)
    # the bucket bound lets hash-sparse use its counting sort (flashring >= session 10; an older tree sorts)
    hash_kw = {"num_buckets": 16} if "num_buckets" in inspect.signature(flashring.hash_sparse_attn_func).parameters \
        else {}
    for name, fwd in calls.items():
        def step():
            for t in (q, k, v):
                t.grad = None
            fwd().backward(do)
        eager = H.time_ms(step, dev)
        fwd_ms = H.time_ms(fwd, dev)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        groups = collections.Counter()
        names = collections.Counter()
        per_kernel = collections.Counter()
        for ev in prof.key_averages():
            t = ev.device_time_total / 5 / 1e3          # ms per call
            if t <= 0:
                continue
            kernel = next((x for x in ("_attn_fwd", "_bwd_dkdv", "_bwd_dq", "_bwd_preprocess") if x in ev.key), None)
            if kernel:
                groups["attention kernels"] += t
                per_kernel[kernel.strip("_")] += t
            elif "tile_ranges" in ev.key:
                groups["tile ranges"] += t
            else:
                groups["other"] += t
                names[ev.key[:60]] += t
        top = ", ".join(f"{n} {t:.3f}" for n, t in names.most_common(6))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        host = (time.perf_counter() - t0) / 10 * 1e3          # ms of host time per call (no sync inside)
        torch.cuda.synchronize()
        if name != "dense" and args.host_profile:
            prof_host = cProfile.Profile()
            prof_host.enable()
            for _ in range(5):
                step()
            prof_host.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(prof_host, stream=text).sort_stats("tottime").print_stats(12)
            print(text.getvalue()[-2500:])
        print(f"{name:<12} eager fwd {fwd_ms:.3f} ms, fwd+bwd {eager:.3f} ms, host {host:.3f} ms | GPU: "
              + ", ".join(f"{g} {t:.3f}" for g, t in groups.items()) + f" | top other: {top}", flush=True)
        print(f"{name:<12} attention kernels: " + ", ".join(f"{k} {t:.3f}" for k, t in sorted(per_kernel.items())),
              flush=True)


if __name__ == "__main__":
    main()
