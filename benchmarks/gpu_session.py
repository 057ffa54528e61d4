"""One GPU session in one command: correctness first, then timing of flashring against PyTorch's backends and a
sweep of kernel tile configurations (the tuning data behind ``ops/flash.py``'s defaults).

    python benchmarks/gpu_session.py --out $OUT [--tests] [--tune] [--compare]

Prints a short table last and writes ``gpu_session.json`` (device, versions, git sha, date, every row) to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from flashring.ops import flash  # noqa: E402
from flashring.reference import attention_ref  # noqa: E402
from flashring._masks import flash_bounds  # noqa: E402


def meta():
    sha = os.environ.get("FLASHRING_GIT_SHA") or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                 capture_output=True, text=True).stdout.strip()
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), git=sha or None,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def dump(out, info, rows):
    with open(os.path.join(out, "gpu_session.json"), "w") as f:
        json.dump(dict(info=info, rows=rows), f, indent=1)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def flops(b, h, n, d, causal, mode):
    f = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[mode]


def shapes(seqlens, dims):
    for d in dims:
        for n in seqlens:
            yield 16384 // n, 2048 // d, n, d


def sdpa_time(backend, q, k, v, do, causal, mode):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dot = do.transpose(1, 2).contiguous()
    F = torch.nn.functional.scaled_dot_product_attention
    with sdpa_kernel([be]):
        if mode == "fwd":
            return bench(lambda: F(qt, kt, vt, is_causal=causal))
        o = F(qt, kt, vt, is_causal=causal)
        if mode == "bwd":
            return bench(lambda: torch.autograd.grad(o, (qt, kt, vt), dot, retain_graph=True))
        return bench(lambda: torch.autograd.grad(F(qt, kt, vt, is_causal=causal), (qt, kt, vt), dot))


def ours_time(q, k, v, do, causal, mode, fcfg=None, bcfg=None):
    scale = q.shape[-1] ** -0.5
    lo, up = flash_bounds(q.shape[1], k.shape[1], causal, (-1, -1))
    fwd = lambda: flash._fwd_triton(q, k, v, scale, lo, up, 0.0, config=fcfg)  # noqa: E731
    if mode == "fwd":
        return bench(fwd)
    o, lse = fwd()
    bwd = lambda: flash._bwd_triton(do, q, k, v, o, lse, scale, lo, up, 0.0, config=bcfg)  # noqa: E731
    if mode == "bwd":
        return bench(bwd)
    return bench(lambda: (fwd(), bwd()))


def check(q, k, v, do, causal, fcfg=None, bcfg=None):
    """Relative error vs fp32 reference on the first batch row (memory), for a config under test."""
    q1, k1, v1, do1 = (t[:1, :, :2] for t in (q, k, v, do))   # 1 batch row, 2 heads: the fp32 scores fit
    scale = q.shape[-1] ** -0.5
    lo, up = flash_bounds(q.shape[1], k.shape[1], causal, (-1, -1))
    o, lse = flash._fwd_triton(q1, k1, v1, scale, lo, up, 0.0, config=fcfg)
    dq, dk, dv = flash._bwd_triton(do1, q1, k1, v1, o, lse, scale, lo, up, 0.0, config=bcfg)
    qr, kr, vr = (t.float().requires_grad_() for t in (q1, k1, v1))
    ro, _ = attention_ref(qr, kr, vr, scale, lo, up, dtype=torch.float32)
    ro.backward(do1.float())
    rel = lambda a, r: ((a.float() - r).norm() / r.norm()).item()  # noqa: E731
    return max(rel(o, ro), rel(dq, qr.grad), rel(dk, kr.grad), rel(dv, vr.grad))


FWD_CFGS = [
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
]
BWD_CFGS = [
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=1),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=2),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tests", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--seqlens", default="1024,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows, info = [], meta()
    print(json.dumps(info), flush=True)
    if args.tests:
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "8", "tests/test_flash.py",
                            "tests/test_sparse.py"],
                           capture_output=True, text=True)
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        print("\n".join(tail), flush=True)
        rows.append(dict(what="pytest", rc=r.returncode, seconds=round(time.time() - t0, 1), tail=tail[-1]))
    torch.manual_seed(0)
    dt = torch.bfloat16
    seqlens = [int(x) for x in args.seqlens.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    if args.tune:
        for b, h, n, d in shapes([8192], dims):
            q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=dt) for _ in range(4))
            for causal in (False, True):
                for c in FWD_CFGS:
                    try:
                        ms = ours_time(q, k, v, do, causal, "fwd", fcfg=c)
                        rows.append(dict(what="tune_fwd", D=d, N=n, causal=causal, cfg=c, ms=ms,
                                         tflops=flops(b, h, n, d, causal, "fwd") / ms * 1e-9))
                    except Exception as e:  # a config that does not compile (shared memory) is data too
                        rows.append(dict(what="tune_fwd", D=d, N=n, causal=causal, cfg=c, error=str(e)[:200]))
                    print(rows[-1], flush=True)
                dump(args.out, info, rows)
                for c in BWD_CFGS:
                    try:
                        ms = ours_time(q, k, v, do, causal, "bwd", bcfg=c)
                        rows.append(dict(what="tune_bwd", D=d, N=n, causal=causal, cfg=c, ms=ms,
                                         tflops=flops(b, h, n, d, causal, "bwd") / ms * 1e-9))
                    except Exception as e:
                        rows.append(dict(what="tune_bwd", D=d, N=n, causal=causal, cfg=c, error=str(e)[:200]))
                    print(rows[-1], flush=True)
    if args.compare:
        for b, h, n, d in shapes(seqlens, dims):
            q, k, v, do = (torch.randn(b, n, h, d, device="cuda", dtype=dt) for _ in range(4))
            for causal in (False, True):
                err = check(q, k, v, do, causal)
                for mode in ("fwd", "fwdbwd"):
                    row = dict(what="compare", D=d, N=n, B=b, H=h, causal=causal, mode=mode, rel_err=err)
                    for name in ("flashring", "flash", "cudnn"):
                        try:
                            ms = ours_time(q, k, v, do, causal, mode) if name == "flashring" else \
                                sdpa_time(name, q, k, v, do, causal, mode)
                            row[name] = flops(b, h, n, d, causal, mode) / ms * 1e-9
                        except Exception as e:
                            row[name] = None
                            row[name + "_error"] = str(e)[:120]
                    rows.append(row)
                    print(row, flush=True)
                    dump(args.out, info, rows)
    dump(args.out, info, rows)
    # Short table last.
    print("\n== tuning (best per shape) ==")
    for kind in ("tune_fwd", "tune_bwd"):
        groups = {}
        for r in rows:
            if r["what"] == kind and "ms" in r:
                groups.setdefault((r["D"], r["causal"]), []).append(r)
        for (d, c), rs in sorted(groups.items()):
            best = max(rs, key=lambda r: r["tflops"])
            print(f"{kind} D={d} causal={c}: best {best['tflops']:.0f} TFLOP/s {best['cfg']}; all: "
                  + " ".join(f"{r['tflops']:.0f}" for r in rs))
    print("\n== TFLOP/s (bf16, 16k tokens, hidden 2048) ==")
    print(f"{'D':>4} {'N':>6} {'causal':>6} {'mode':>7} {'flashring':>9} {'sdpa-fa2':>9} {'cudnn':>7} "
          f"{'vs fa2':>6} {'vs cudnn':>8} {'relerr':>8}")
    for r in rows:
        if r["what"] != "compare":
            continue
        fr, fa, cu = r.get("flashring"), r.get("flash"), r.get("cudnn")
        fmt = lambda x: f"{x:.0f}" if x else "-"  # noqa: E731
        print(f"{r['D']:>4} {r['N']:>6} {str(r['causal']):>6} {r['mode']:>7} {fmt(fr):>9} {fmt(fa):>9} "
              f"{fmt(cu):>7} {(fr / fa if fr and fa else 0):>6.2f} {(fr / cu if fr and cu else 0):>8.2f} "
              f"{r['rel_err']:>8.1e}")


if __name__ == "__main__":
    main()
