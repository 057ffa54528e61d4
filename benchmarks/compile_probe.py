"""Registers, spills and shared memory of flashring's flash kernels, compiled for a GPU that is not here.

    PYTHONPATH=src python3 benchmarks/compile_probe.py [--arch 90] [--headdims 64,128] [--seqlen 8192] [--loops]

Triton compiles for any NVIDIA target with the ptxas it bundles, so a CPU-only machine can check what a kernel
change does to its resources before device time is spent on it: the launch arguments come from the real host
functions (`ops.flash.fwd` / `bwd`, their launchers swapped for recorders), the kernels are compiled with
`JITFunction.warmup` against a stand-in driver that reports the target, and `cuobjdump` reads the cubin.
`--loops` also counts the local-memory spill instructions (STL/LDL) and MMAs between branches of the SASS, to see
whether spills sit in a hot loop or a rarely run one. Registers decide how many programs share an SM (65,536 per
SM; e.g. 8 warps at <= 128 registers: two). Compile with the Triton version the GPU machine runs: ptxas and the
compiler differ between versions (3.6 and 3.8 gave the forward at D=64 causal 127 and 116 registers).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class TargetOnly:
    """Enough of a Triton driver to compile for ``arch`` (nothing can be loaded or launched)."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty


def record(module, names):
    """Swap ``module``'s launchers for recorders; returns (recorded calls, restore)."""
    calls, old = {}, {n: getattr(module, n) for n in names}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.__setitem__(self.name, (args, kw, grid))
    for n in names:
        setattr(module, n, Recorder(n))
    return calls, lambda: [setattr(module, n, f) for n, f in old.items()]


def wait_gaps(sass: str) -> list:
    """For each ``wgmma.wait_group 1`` in the SASS, how many MUFU.EX2 come before the next ``wait_group 0``: the
    softmax work that overlaps an in-flight wgmma (FA3's intra-warpgroup order; 0-ish = ptxas hoisted the wait)."""
    gaps, count = [], None
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in line:
            count = 0
        elif count is not None and "MUFU.EX2" in line:
            count += 1
        elif count is not None and "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            gaps.append(count)
            count = None
    return gaps


COUNTS = False          # --counts


def usage(kernel, loops: bool) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    text = f"regs {m.group(1):>3} stack {m.group(2):>4} B  smem {kernel.metadata.shared:>6} B"
    if loops:
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        spans, spills, mmas = [], 0, 0
        counts = dict.fromkeys(("FMUL", "FFMA", "FADD", "MUFU", "BRA"), 0)
        total = 0
        for line in sass.splitlines():
            ins = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
            if not ins:
                continue
            ins = ins.group(1)
            total += 1
            op = re.sub(r"^@!?U?P\w+\s+", "", ins).split(" ")[0].split(".")[0]
            if op in counts:
                counts[op] += 1
            if re.search(r"\b(STL|LDL)", ins):
                spills += 1
            elif "MMA" in ins:
                mmas += 1
            elif "BRA" in ins and "@" in ins:
                if spills or mmas:
                    spans.append(f"{spills}s/{mmas}m")
                spills = mmas = 0
        text += "  spills/MMAs between branches: " + " ".join(spans)
        text += f"  exp2s between wgmma waits: {wait_gaps(sass)}"
        if COUNTS:
            text += "\n    static instructions: " + " ".join(f"{k} {v}" for k, v in counts.items()) + f" (all {total})"
    os.unlink(f.name)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100 / H200)")
    p.add_argument("--headdims", default="64,128")
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--seqlen-k", type=int, help="key length (default: --seqlen)")
    p.add_argument("--window", help="L,R: a window_size band instead of the full / causal pair")
    p.add_argument("--kernels", default="fwd,dkdv,dq", help="which of fwd,pre,dkdv,dq to compile (pre: the "
                   "backward's delta preprocess)")
    p.add_argument("--loops", action="store_true", help="spills and MMAs between the branches of the SASS")
    p.add_argument("--counts", action="store_true", help="with --loops: static counts of FMUL, FFMA, FADD, MUFU, "
                   "BRA and all SASS instructions (on a line of its own)")
    p.add_argument("--hopper", action="store_true", help="the Gluon sm_90 forward (ops/hopper.py) instead")
    p.add_argument("--variant", default="", help="--hopper / --hopper-bwd: launch_args keywords, e.g. 'programs=3'")
    p.add_argument("--hopper-bwd", action="store_true", help="the Gluon sm_90 backward (ops/hopper_bwd.py) instead")
    p.add_argument("--sparse", choices=("qk", "hash"),
                   help="the kernels' dynamic-sparse mode as the front ends launch it (row tables; causal), and "
                        "ops.partition's counting-sort kernels")
    args = p.parse_args(argv)
    global COUNTS
    COUNTS = args.counts
    seqlen_k = args.seqlen_k or args.seqlen
    kernels = {"fwd": "LAUNCH_FWD", "pre": "LAUNCH_BWD_PRE", "dkdv": "LAUNCH_BWD_DKDV", "dq": "LAUNCH_BWD_DQ"}
    try:
        wanted = [kernels[k] for k in args.kernels.split(",")]
        window = tuple(int(x) for x in args.window.split(",")) if args.window else None
    except (KeyError, ValueError):
        p.error("--kernels takes fwd,pre,dkdv,dq; --window takes two integers L,R")
    driver.set_active(TargetOnly(args.arch))
    from flashring.bench.harness import keywords
    from flashring.masks import flash_bounds
    from flashring.ops import flash
    try:
        args.variant = keywords(args.variant)                  # launch_args keywords, parsed once
    except argparse.ArgumentTypeError as exc:
        p.error(f"--variant: {exc}")
    cuda = torch.device("cuda")                    # only its type is read: the GPU configuration tables
    if args.hopper:
        return hopper_usage(args)
    if args.hopper_bwd:
        return hopper_bwd_usage(args)
    if args.sparse:
        return sparse_usage(args, wanted)
    print(f"triton {triton.__version__}, sm_{args.arch}, seqlen {args.seqlen} x {seqlen_k}, bf16")
    for d in (int(x) for x in args.headdims.split(",")):
        q = torch.randn(1, args.seqlen, 2, d, dtype=torch.bfloat16)
        k = torch.randn(1, seqlen_k, 2, d, dtype=torch.bfloat16)
        lse = torch.zeros(1, 2, args.seqlen)
        for causal in ((False, True) if window is None else (False,)):
            lower, upper = flash_bounds(args.seqlen, seqlen_k, causal, window or (-1, -1))
            calls, restore = record(flash, ("LAUNCH_FWD", "LAUNCH_BWD_PRE", "LAUNCH_BWD_DKDV", "LAUNCH_BWD_DQ"))
            try:
                cfg = flash.default_config(d, q.dtype, cuda, backward=False, seqlen_q=args.seqlen, causal=causal)
                flash.fwd(q, k, k, d ** -0.5, lower=lower, upper=upper, config=cfg)
                flash.bwd(q, q, k, k, q, lse, d ** -0.5, lower=lower, upper=upper,
                          config=flash.default_config(d, q.dtype, cuda, backward=True))
            finally:
                restore()
            for name, fn in (("LAUNCH_FWD", flash._attn_fwd), ("LAUNCH_BWD_PRE", flash._bwd_preprocess),
                             ("LAUNCH_BWD_DKDV", flash._bwd_dkdv), ("LAUNCH_BWD_DQ", flash._bwd_dq)):
                if name not in wanted:
                    continue
                a, kw, grid = calls[name]
                tiles = {k: v for k, v in kw.items() if k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages",
                                                              "maxnreg")}
                print(f"D={d:<3} causal={causal!s:<5} window={window} {name[7:]:<9} {tiles}\n    "
                      f"{usage(fn.warmup(*a, grid=grid, **kw), args.loops)}", flush=True)
    return 0


def sparse_usage(args, wanted) -> int:
    """Compile the sparse launches of ``ops.flash`` (positions, buckets, tile ranges and row tables as the front
    ends pass them) and ``ops.partition``'s two kernels, and print their resources."""
    from flashring.ops import flash, partition, sparse_ranges
    cuda = torch.device("cuda")
    s, h = args.seqlen, 2
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.sparse}-sparse, seqlen {s}, bf16")
    calls, restore = record(partition, ("LAUNCH_HISTOGRAM", "LAUNCH_SCATTER"))
    try:
        ids = torch.zeros(1, s, h, dtype=torch.bool if args.sparse == "qk" else torch.int64)
        partition.partition(ids, 2 if args.sparse == "qk" else 16, 0, keep=args.sparse == "qk")
    finally:
        restore()
    for name, fn in (("LAUNCH_HISTOGRAM", partition._histogram), ("LAUNCH_SCATTER", partition._scatter)):
        a, kw, grid = calls[name]
        print(f"{name[7:]:<9}\n    {usage(fn.warmup(*a, grid=grid, **kw), args.loops)}", flush=True)
    rows = torch.arange(s).expand(1, h, s).contiguous()
    pos = rows.to(torch.int32)
    lens = torch.full((1, h), s, dtype=torch.int32)
    bkt = pos if args.sparse == "hash" else None
    meta = sparse_ranges.SparseMeta(pos, pos, lens, lens, bkt, bkt, True, rows, rows)
    ranges_calls, restore_ranges = record(sparse_ranges, ("LAUNCH_TILE_RANGES",))
    for d in (int(x) for x in args.headdims.split(",")):
        q = torch.randn(1, s, h, d, dtype=torch.bfloat16)
        lse = torch.zeros(1, h, s)
        calls, restore = record(flash, ("LAUNCH_FWD", "LAUNCH_BWD_PRE", "LAUNCH_BWD_DKDV", "LAUNCH_BWD_DQ"))
        try:
            flash.fwd(q, q, q, d ** -0.5, sparse=meta,
                      config=flash.default_config(d, q.dtype, cuda, backward=False, seqlen_q=s))
            flash.bwd(q, q, q, q, q, lse, d ** -0.5, sparse=meta,
                      config=flash.default_config(d, q.dtype, cuda, backward=True))
        finally:
            restore()
        for name, fn in (("LAUNCH_FWD", flash._attn_fwd), ("LAUNCH_BWD_PRE", flash._bwd_preprocess),
                         ("LAUNCH_BWD_DKDV", flash._bwd_dkdv), ("LAUNCH_BWD_DQ", flash._bwd_dq)):
            if name in wanted:
                a, kw, grid = calls[name]
                print(f"D={d:<3} {name[7:]:<9}\n    {usage(fn.warmup(*a, grid=grid, **kw), args.loops)}", flush=True)
    restore_ranges()
    a, kw, grid = ranges_calls["LAUNCH_TILE_RANGES"]
    print(f"TILE_RANGES\n    {usage(sparse_ranges._tile_ranges_kernel.warmup(*a, grid=grid, **kw), False)}")
    return 0


def hopper_usage(args) -> int:
    """Compile ops/hopper.py's kernel (both masks, each head dim) and print its resources."""
    from flashring.ops import hopper, sparse_ranges
    if not hopper.AVAILABLE:
        print("hopper: Gluon is not available in this triton")
        return 0
    print(f"triton {triton.__version__}, sm_{args.arch}, Gluon forward, seqlen {args.seqlen}, bf16 {args.variant}")
    for d in (int(x) for x in args.headdims.split(",")):
        q = torch.empty(1, args.seqlen, 4, d, dtype=torch.bfloat16)
        k = torch.empty(1, args.seqlen, 2, d, dtype=torch.bfloat16)
        for causal in (False, True) if "gather" not in args.variant else ():        # gather: sparse only
            grid, kargs = hopper.launch_args(q, k, k, d ** -0.5, causal, torch.empty_like(q),
                                             torch.empty(1, 4, args.seqlen), **args.variant)
            kern = hopper._attn_fwd_hopper.warmup(*kargs, grid=grid, num_warps=4)
            print(f"D={d:<3} causal={causal!s:<5} window=None HOPPER_FWD {{}}\n    {usage(kern, args.loops)}",
                  flush=True)
        if args.sparse:         # hopper.sparse_fwd's launch (slot order; one query head per K/V head)
            k = torch.empty(1, args.seqlen, 2, d, dtype=torch.bfloat16)
            calls, restore = record(sparse_ranges, ("LAUNCH_TILE_RANGES",))       # no launch on the CPU
            try:
                grid, kargs = hopper.launch_args(k, k, k, d ** -0.5, False, torch.empty_like(k),
                                                 torch.empty(1, 2, args.seqlen), sparse=probe_meta(args),
                                                 **args.variant)
            finally:
                restore()
            kern = hopper._attn_fwd_hopper.warmup(*kargs, grid=grid, num_warps=4)
            print(f"D={d:<3} {args.sparse}-sparse HOPPER_FWD\n    {usage(kern, args.loops)}", flush=True)
    return 0


def probe_meta(args):
    """Side tensors of ``--sparse`` for the Gluon kernels' sparse launches (B=1, 2 heads, causal)."""
    from flashring.ops import sparse_ranges
    pos = torch.arange(args.seqlen, dtype=torch.int32).expand(1, 2, args.seqlen).contiguous()
    lens = torch.full((1, 2), args.seqlen, dtype=torch.int32)
    bkt = pos if args.sparse == "hash" else None
    rows = pos.long()                                   # row tables (the front ends' form)
    return sparse_ranges.SparseMeta(pos, pos, lens, lens, bkt, bkt, True, rows, rows)


def hopper_bwd_usage(args) -> int:
    """Compile ops/hopper_bwd.py's kernels (both masks, each head dim, both dQ variants) and print their resources;
    ``wgmma`` counts the SASS's HGMMA instructions (0 would mean the MMAs fell back to something slower)."""
    from flashring.ops import hopper_bwd, sparse_ranges
    if not hopper_bwd.AVAILABLE:
        print("hopper_bwd: Gluon is not available in this triton")
        return 0
    print(f"triton {triton.__version__}, sm_{args.arch}, Gluon backward, seqlen {args.seqlen}, bf16")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for d in (int(x) for x in args.headdims.split(",")):
        q = torch.empty(1, args.seqlen, 4, d, dtype=torch.bfloat16)
        k = torch.empty(1, args.seqlen, 2, d, dtype=torch.bfloat16)
        lse = torch.empty(1, 4, args.seqlen)
        for causal in (False, True) if "rows_out" not in args.variant else ():      # rows_out: sparse only
            for mode in hopper_bwd.DQ_MODES:
                atomic = mode == "atomic"
                dq = torch.empty(q.shape, dtype=torch.float32) if atomic else torch.empty_like(q)
                for kernel, grid, kargs in hopper_bwd.launch_args(q, q, k, k, lse, lse, d ** -0.5, causal, dq,
                                                                  torch.empty_like(k), torch.empty_like(k), atomic,
                                                                  **args.variant):
                    kern = kernel.warmup(*kargs, grid=grid, num_warps=4)
                    name = {"_bwd_dkdv_hopper": "HOPPER_DKDV", "_bwd_dq_hopper": "HOPPER_DQ"}[kernel.__name__]
                    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                        f.write(kern.asm["cubin"])
                    sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
                    os.unlink(f.name)
                    print(f"D={d:<3} causal={causal!s:<5} window=None {name} {{'dq': '{mode}'}}\n    "
                          f"{usage(kern, args.loops)}  wgmma {len(re.findall(r'HGMMA', sass))}", flush=True)
        if args.sparse:         # hopper_bwd.sparse_bwd's launches (slot order; one query head per K/V head)
            meta = probe_meta(args)
            calls, restore = record(sparse_ranges, ("LAUNCH_TILE_RANGES",))       # no launch on the CPU
            try:
                launches = hopper_bwd.launch_args(k, k, k, k, lse[:, :2], lse[:, :2], d ** -0.5, False,
                                                  torch.empty_like(k), torch.empty_like(k), torch.empty_like(k),
                                                  False, sparse=meta, **args.variant)
            finally:
                restore()
            for kernel, grid, kargs in launches:
                kern = kernel.warmup(*kargs, grid=grid, num_warps=4)
                name = {"_bwd_dkdv_hopper": "HOPPER_DKDV", "_bwd_dq_hopper": "HOPPER_DQ"}[kernel.__name__]
                print(f"D={d:<3} {args.sparse}-sparse {name}\n    {usage(kern, args.loops)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
