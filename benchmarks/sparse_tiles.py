"""Tile shapes for the sparse kernels: forward and backward configurations timed by their kernels' device time
(torch.profiler) on the sparse front ends, against the defaults, in one process.

    PYTHONPATH=src python3 benchmarks/sparse_tiles.py --out OUT [--seqlens 8192,16384]

Why: at low kept fractions a sparse call's cost is the tiles its kept pairs touch, not the pairs (issue 14: hash 8
forward at 8k ran at 3.9x the ideal, session 10), and smaller query tiles touch fewer empty pairs. The sparse calls
use the dense configurations (``ops.flash.default_config``); this swaps them in turn. Writes
``<device>-sparse-tiles-<date>-<sha>.jsonl`` (metadata line + rows) and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import flashring  # noqa: E402
from flashring.bench import harness as H  # noqa: E402
from flashring.metadata import run_metadata  # noqa: E402
from flashring.ops import flash, hopper, hopper_bwd  # noqa: E402

FWD = {"fwd 128x64/8w": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=128),
       "fwd 64x64/4w": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
       # the row-table forward spills 64-96 B inside its key loop under the dense cap of 128 registers (compiled
       # for sm_90, triton 3.6); 168 holds it spill-free at D=64 but lets one 8-warp program per SM run
       "fwd 128x64/8w r168": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=168),
       # D=128: the dense default (128x128, 104-120 B of stack in the row-table forward) and the causal one
       # (128x64, spill-free there)
       "fwd 128x128/8w": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
       "fwd 128x64/8w nocap": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
       # the row tables read in the iteration or one ahead (ops.flash.ROWS_AHEAD_MAX_D: ahead gives the data loads
       # 3 pipeline buffers instead of 2; at D=64 the forward's stack grows 64 -> 72 B (qk), 96 -> 152 B (hash))
       "fwd 128x64/8w inline": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=128,
                                    ROWS_AHEAD=False),
       "fwd 128x64/8w ahead": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, maxnreg=128,
                                   ROWS_AHEAD=True)}
BWD = {"bwd 64x64": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
       "bwd 32x64": dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
       "bwd 64x32": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
       # D=128 (the default): the row-table dK/dV spills 248 B in its loops; with 8 warps it compiles spill-free
       "bwd 64x64 s2": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
       "bwd 64x64/8w s2": dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2),
       "bwd 64x64 inline": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, ROWS_AHEAD=False),
       "bwd 64x64 ahead": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, ROWS_AHEAD=True),
       # one backward kernel ahead, the other in the iteration (session 14: ahead won at QK drop 0.5 and lost at
       # drop 0.8 / hash 16 with both ahead)
       "bwd 64x64 ahead dkdv": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, ROWS_AHEAD=False,
                                    ROWS_AHEAD_DKDV=True),
       "bwd 64x64 ahead dq": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, ROWS_AHEAD=False,
                                  ROWS_AHEAD_DQ=True)}
# the Gluon kernels' sparse backward (ops/hopper_bwd.py sparse_bwd, FLASHRING_HOPPER_SPARSE_BWD=1) instead of these,
# its gradients copied back or written straight to their rows by the kernels (hopper_bwd.SPARSE_ROWS_OUT), or with
# no copies at all ("gather": rows read through the row tables by cp.async, FLASHRING_HOPPER_SPARSE_GATHER=1; that
# switch covers the Gluon forward too, so a pair with "gather" on one side gathers on both Gluon sides); session
# 15 also timed torch's gather / scatter for the copies ("gluon torch-gather", since removed: 1.10-1.25x slower)
GLUON = {"gluon": False, "gluon rows-out": True, "gluon gather": True}
BWD.update({name: BWD["bwd 64x64"] for name in GLUON})     # what the sparse calls it does not take run
FWD["gluon"] = FWD["fwd 128x64/8w"]                         # ops/hopper.py sparse_fwd (FLASHRING_HOPPER_SPARSE_FWD)
FWD["gluon gather"] = FWD["fwd 128x64/8w"]
VARIANTS = [("fwd 128x64/8w", "bwd 64x64"), ("fwd 64x64/4w", "bwd 64x64"), ("fwd 128x64/8w", "bwd 32x64"),
            ("fwd 128x64/8w", "bwd 64x32")]


def pairs(text: str) -> list:
    """``--pairs``: 'FWD+BWD;...' -> [(FWD, BWD), ...], names from FWD / BWD."""
    out = []
    for item in text.split(";"):
        fv, _, bv = item.strip().partition("+")
        if fv not in FWD or bv not in BWD:
            raise argparse.ArgumentTypeError(f"unknown pair {item!r}: forward one of {sorted(FWD)}, "
                                             f"backward one of {sorted(BWD)}")
        out.append((fv, bv))
    return out


def kernel_ms(fn, calls: int = 5) -> tuple:
    """Device time per call (torch.profiler), after a warm-up call: ``(attention kernels and their tile-range
    launches, every kernel of the call)``: the tile shapes' effect without the host time that per-call timing
    includes at B=1, and with everything else on the device (partition, gathers, ...)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    names = ("_attn_fwd", "_bwd_dkdv", "_bwd_dq", "_bwd_preprocess", "tile_ranges")
    kernels = [ev for ev in prof.key_averages() if ev.device_type == torch.autograd.DeviceType.CUDA]
    return (sum(ev.device_time_total for ev in kernels if any(n in ev.key for n in names)) / calls / 1e3,
            sum(ev.device_time_total for ev in kernels) / calls / 1e3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", default="8192,16384")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--pairs", type=pairs, default=VARIANTS,
                    help="';'-separated FORWARD+BACKWARD config names (the first is the baseline), e.g. "
                    "'fwd 128x64/8w+bwd 64x64;fwd 128x64/8w r168+bwd 64x64'")
    args = ap.parse_args()
    dev = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(dev, sys.argv)
    g = torch.Generator(device=dev).manual_seed(0)
    default_config = flash.default_config
    rows_out_default = hopper_bwd.SPARSE_ROWS_OUT
    rows = []
    for s in (int(x) for x in args.seqlens.split(",")):
        b, d = 1, args.headdim
        h = 2048 // d                                   # hidden 2048, as the dense and sparse suites
        q, k, v, do = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        pats = {}
        for drop in (0.5, 0.8):
            qa, ka = (torch.rand(b, s, h, device=dev, generator=g) >= drop for _ in range(2))
            pats[f"qk {drop}"] = lambda qa=qa, ka=ka: flashring.qk_sparse_attn_func(q, k, v, qa, ka, causal=True)
        for nb in (8, 16):
            qb = flashring.lsh_buckets(q.detach(), nb)
            pats[f"hash {nb}"] = lambda qb=qb, nb=nb: flashring.hash_sparse_attn_func(q, k, v, qb, qb, causal=True,
                                                                                       num_buckets=nb)
        for pname, call in pats.items():
            base = None
            for fv, bv in args.pairs:
                flash.default_config = lambda *a, backward=False, fv=fv, bv=bv, **kw: dict(BWD[bv] if backward
                                                                                         else FWD[fv])
                os.environ[hopper_bwd.SPARSE_ENV] = "1" if bv in GLUON else "0"
                os.environ[hopper.SPARSE_ENV] = "1" if fv.startswith("gluon") else "0"
                os.environ[hopper.GATHER_ENV] = "1" if "gather" in fv + bv else "0"
                hopper_bwd.SPARSE_ROWS_OUT = GLUON.get(bv, False)
                try:
                    out = call()
                    got = (out.detach(), *torch.autograd.grad(out, (q, k, v), do))
                    diff = 0.0 if base is None else max((a - w).abs().max().item() for a, w in zip(got, base))
                    base = got if base is None else base
                    fwd_ms, fwd_all = kernel_ms(call)
                    both_ms, both_all = kernel_ms(lambda: torch.autograd.grad(call(), (q, k, v), do))
                finally:
                    flash.default_config = default_config
                    os.environ.pop(hopper_bwd.SPARSE_ENV)
                    os.environ.pop(hopper.SPARSE_ENV)
                    os.environ.pop(hopper.GATHER_ENV)
                    hopper_bwd.SPARSE_ROWS_OUT = rows_out_default
                rows.append(dict(seqlen=s, headdim=d, pattern=pname, fwd_config=fv, bwd_config=bv, fwd_ms=fwd_ms,
                                 fwd_bwd_ms=both_ms, fwd_all_kernels_ms=fwd_all, fwd_bwd_all_kernels_ms=both_all,
                                 max_abs_diff_vs_first=diff))
                print(json.dumps(rows[-1]), flush=True)
    H.write_jsonl(args.out / H.results_name(dev, "sparse-tiles"), [meta] + rows)     # max_abs_diff: out, dq, dk, dv
    print(f"\nsparse tiles on {meta['device']} (git {meta.get('git_sha')}), kernel ms per call, B=1, hidden 2048, "
          f"D={args.headdim}, causal")
    print(f"{'N':>6} {'pattern':<9} {'forward':<15} {'backward':<18} {'fwd ms':>8} {'fwd+bwd ms':>10} "
          f"{'all kernels':>11} {'diff':>8}")
    for r in rows:
        print(f"{r['seqlen']:>6} {r['pattern']:<9} {r['fwd_config']:<15} {r['bwd_config']:<18} {r['fwd_ms']:>8.3f} "
              f"{r['fwd_bwd_ms']:>10.3f} {r['fwd_bwd_all_kernels_ms']:>11.3f} {r['max_abs_diff_vs_first']:>8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
