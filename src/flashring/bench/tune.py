"""``flashring bench tune``: sweep the Triton kernels' tile configurations (block sizes, warps, pipeline stages).

For each shape (default: seqlen 8k at 16k tokens, headdim 64 and 128, causal and not, bf16) every forward and
backward configuration of the sweep is checked against the float64 reference, then timed; the table lists each
configuration's TFLOP/s and marks the best, next to the configuration ``ops.flash`` uses today. Configurations
that do not compile (shared memory) become error rows. This is the data behind ``ops.flash.FWD_CONFIGS`` /
``BWD_CONFIGS``.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
from typing import List, Optional, Sequence


from . import dense, harness as H
from ..masks import flash_bounds
from ..ops import flash

# REVERSE_M: query blocks in reverse order (causal: the longest first); the dK/dV pass is unaffected.
FWD_SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, REVERSE_M=r)
             for m, n, w, s, r in ((128, 64, 8, 3, False), (128, 128, 8, 3, False), (128, 128, 8, 3, True),
                                   (128, 64, 8, 3, True), (128, 64, 4, 3, False), (128, 64, 8, 4, False),
                                   (64, 64, 4, 3, False), (64, 64, 4, 3, True), (128, 128, 8, 2, False),
                                   (64, 128, 4, 2, False))]
BWD_SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, REVERSE_M=r)
             for m, n, w, s, r in ((64, 64, 4, 2, False), (64, 64, 4, 2, True), (64, 64, 4, 3, False),
                                   (64, 64, 4, 3, True), (32, 64, 4, 2, False), (64, 128, 8, 2, False),
                                   (128, 64, 8, 2, False), (32, 128, 4, 2, False), (64, 32, 4, 3, False),
                                   # spill-free at D=128 when compiled for sm_90 (benchmarks/compile_probe.py;
                                   # the 64x64/4/2 default's dK/dV loop spills 42-75 instructions per tile)
                                   (64, 64, 8, 2, False), (32, 128, 8, 2, False), (32, 64, 4, 3, False))]
CPU_SWEEP = list(flash.INTERP_CONFIGS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashring bench tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=H.csv(H.seqlen), help="default 8k on GPU (128 on CPU, where the Triton "
                                                           "interpreter runs the kernels)")
    p.add_argument("--headdims", type=H.csv(H.headdim), help="default 64,128 (CPU 32)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--dtype", choices=list(H.DTYPES), help="default bf16 (CPU fp32)")
    p.add_argument("--passes", type=H.csv(str, ("fwd", "bwd")), default=["fwd", "bwd"], help="fwd,bwd (default)")
    H.add_common_args(p)
    return p


def resolve(args):
    gpu = args.device.type == "cuda"
    if not gpu and not flash.INTERPRET:
        raise ValueError("the tile sweep times the Triton kernels: run it on a GPU, or on CPU with "
                         "TRITON_INTERPRET=1 set")
    seqlens = args.seqlens or ([8192] if gpu else [128])
    headdims = args.headdims or ([64, 128] if gpu else [32])
    dtype = H.DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    if args.repeats is None:
        args.repeats = 2
    shapes = [H.Shape(max(1, 16384 // n) if gpu else 1, n, max(1, 2048 // d) if gpu else 2, d, c, dtype)
              for d, c, n in itertools.product(headdims, causals, seqlens)]
    sweep = (FWD_SWEEP, BWD_SWEEP) if gpu else (CPU_SWEEP, CPU_SWEEP)
    return shapes, sweep


def _tile(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}/w{cfg['num_warps']}/s{cfg['num_stages']}"
            + ("/rev" if cfg.get("REVERSE_M") else ""))


def render_table(results: List[dict]) -> str:
    headers = ["pass", "tile", "ms", "TFLOP/s", "vs default", "check"]
    rows: List[object] = []
    groups = {}
    for r in results:
        groups.setdefault((json.dumps(r["config"], sort_keys=True), r["mode"]), []).append(r)
    for (_, mode), group in groups.items():
        c = group[0]["config"]
        rows.append(f"== {mode} S={c['seqlen_q']} D={c['headdim']} {'causal' if c['causal'] else 'full'} "
                    f"{c['dtype']}")
        timed = [r for r in group if r["ms"]]
        best = min(timed, key=lambda r: r["ms"]) if timed else None
        default = next((r for r in group if r["default"]), None)
        for r in group:
            mark = (" *best*" if r is best else "") + (" (default)" if r["default"] else "")
            vs = default["ms"] / r["ms"] if default and default["ms"] and r["ms"] else None
            rows.append([mode, r["tile"] + mark, H.fmt_num(r["ms"], 4), H.fmt_num(r["tflops"]), H.fmt_x(vs),
                         H.status(r)])
    return H.format_table(headers, rows, align="llrrrl")


def prepare(shape: H.Shape, seed: int, device, scale: float, lower, upper):
    """The shape's inputs (q, k, v, do) and the forward (out, lse) that the backward sweep differentiates."""
    q, k, v, do = dense.random_inputs(shape, seed, device)
    return (q, k, v, do), flash.fwd(q, k, v, scale, lower, upper)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    parsed = H.parse_cli(build_parser(), resolve, argv, "flashring bench tune")
    if isinstance(parsed, int):
        return parsed
    args, (shapes, (fwd_sweep, bwd_sweep)), seed = parsed
    run = H.Run(args, args.device, "tune", argv, seed, passes=args.passes)
    run.progress.total = len(shapes) * (len(fwd_sweep) * ("fwd" in args.passes)
                                        + len(bwd_sweep) * ("bwd" in args.passes))
    with H.cpu_threads(args.threads):
        for i, shape in enumerate(shapes):
            scale = shape.headdim ** -0.5
            lower, upper = flash_bounds(shape.seqlen, shape.seqlen, shape.causal, (-1, -1))

            # a shape whose inputs (or the backward's saved forward) do not fit: error rows, the sweep goes on
            prepared, skipped = run.inputs(shape, functools.partial(prepare, shape, seed + i, args.device, scale,
                                                                    lower, upper), (), ())
            if not skipped:
                (q, k, v, do), (out, lse) = prepared
                ref = run.reference([q, k, v, do], shape, need_grads="bwd" in args.passes)
            for mode, sweep in (("fwd", fwd_sweep), ("bwd", bwd_sweep)):
                if mode not in args.passes:
                    continue
                default = flash.default_config(shape.headdim, shape.dtype, args.device, backward=mode == "bwd",
                                               seqlen_q=shape.seqlen, causal=shape.causal)
                for cfg in sweep:
                    run.progress.step(f"{shape.label()} | {mode} {_tile(cfg)}")
                    if mode == "fwd":
                        fn = lambda: flash.fwd(q, k, v, scale, lower, upper, config=cfg)  # noqa: E731
                    else:
                        fn = lambda: flash.bwd(do, q, k, v, out, lse, scale, lower, upper, config=cfg)  # noqa
                    ms = detail = None
                    error = skipped
                    if not skipped:
                        try:
                            result = fn()
                            detail = (H.compare(ref, result[0], None) if mode == "fwd" else
                                      H.compare(ref, out, result)) if ref else None
                            ms = run.time(fn)
                        except Exception as exc:    # a config that does not compile (shared memory) is data too
                            error = H.reason(exc)
                            H.free_memory(args.device)
                    run.record(shape, "flashring", mode, ms=ms, detail=detail, error=error, tile=_tile(cfg),
                               tile_config=cfg, default={**cfg, "REVERSE_M": False} == {**default, "REVERSE_M":
                                                                                         default.get("REVERSE_M",
                                                                                                     False)})
    return run.finish(render_table, row_keys=("mode", "tile", "config"))
