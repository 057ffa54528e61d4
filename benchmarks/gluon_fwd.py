"""The Hopper Gluon forward (src/flashring/ops/hopper.py) checked and timed against the portable kernel and cuDNN.

    PYTHONPATH=src python3 benchmarks/gluon_fwd.py [--out DIR] [--variants 'NAME:KW;...'] [--shapes 'B,H,HKV,N,D;...']

On a GPU: every shape of issue 13's grid (16k tokens per batch, hidden 2048; plus GQA at 1k), or --shapes, causal
and not, is checked against the float64 reference with flashring.testing's rule (on the first KV head's query
group), then timed from CUDA-graph replays next to flashring's portable forward and cuDNN, one JSON line per point
written as measured (a hang, killed by `timeout`, keeps what came before). --variants adds launches with other
`hopper.launch_args` keywords (e.g. `tile:programs=1000000000` for one program per tile, `static:dynamic=False`
for causal tiles at a fixed stride, `s3:stages=3` at D=64), each checked and timed beside the default, alternating.
Without a GPU, compile the kernel for sm_90 instead:
`benchmarks/compile_probe.py --hopper [--variant KW]`.

Kernel variants measured and dropped (FA3's intra-warpgroup order, a ping-pong turnstile, P through shared
memory, a polynomial exp2, lazy rescaling): BENCHMARKS.md sessions 7, 11, 12 and 14; as patches in
`results/h100-gluon-fwd-variants-20261207.patch`, `results/h100-gluon-fwd-overlap-20261207.patch` and
`results/h100-gluon-fwd-lazy-rescale-20261207.patch`.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from flashring.bench.harness import variants

SHAPES = [(2, 8, 2, 1024, 128), (4, 16, 16, 4096, 128), (2, 16, 16, 8192, 128), (1, 16, 16, 16384, 128),
          (2, 32, 32, 8192, 64), (1, 32, 32, 16384, 64)]     # (B, H, H_KV, N, D)


def finite(c: dict) -> dict:
    """A check result JSON can hold (a NaN error becomes None)."""
    return {k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else None) for k, v in c.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="append one JSON line per result to DIR/gluon-fwd.jsonl as it is measured")
    p.add_argument("--variants", default={}, type=variants,
                   help="';'-separated NAME:KEYWORDS for hopper.fwd, e.g. 'tile:programs=1000000000' (default: the "
                        "kernel's defaults alone), each checked and timed beside the others")
    p.add_argument("--headdims", default="64,128")
    p.add_argument("--shapes", default="", help="';'-separated B,H,H_KV,N,D instead of the built-in grid")
    args = p.parse_args(argv)
    launches = {"default": {}, **args.variants}
    if not torch.cuda.is_available():
        print("no GPU: compile the kernel with benchmarks/compile_probe.py --hopper", file=sys.stderr)
        return 2
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from flashring.bench.harness import attention_flops, cuda_graph, time_ms
    from flashring.metadata import run_metadata
    from flashring.ops import flash, hopper
    from flashring.testing import OUT_FACTOR, check_close, reference_pair
    dev = torch.device("cuda")
    if not hopper.AVAILABLE or torch.cuda.get_device_capability(dev) != (9, 0):
        print("the Gluon forward needs an sm_90 GPU and triton's Gluon", file=sys.stderr)
        return 2
    sink = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        sink = open(Path(args.out) / "gluon-fwd.jsonl", "a")

    def emit(row):
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
    names = list(launches)
    print(f"{'shape':<28} {'causal':<6} {'check':<6} " + " ".join(f"{n:>8}" for n in names)
          + f" {'portable':>9} {'cudnn':>7}  TFLOP/s (CUDA-graph replays)")
    heads = {int(x) for x in args.headdims.split(",")}
    shapes = [tuple(int(x) for x in item.split(",")) for item in args.shapes.split(";") if item] or SHAPES
    for b, h, hkv, n, d in (s for s in shapes if s[4] in heads):
        q = torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16)           # flash-attn's (B, S, H, D)
        k, v = (torch.randn(b, n, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        qt, kr, vr = q.transpose(1, 2), *(t.transpose(1, 2).repeat_interleave(h // hkv, dim=1) for t in (k, v))
        for causal in (False, True):
            fl = attention_flops(b, n, n, h, d, causal, "fwd")
            g = h // hkv
            refs = reference_pair(q[:1, :, :g], k[:1, :, :1], v[:1, :, :1], None, upper=0 if causal else None)
            rows, fns = {}, {}
            for name, kw in launches.items():
                row = dict(type="result", B=b, H=h, H_KV=hkv, N=n, D=d, causal=causal, variant=name, **kw)
                try:
                    out, lse = hopper.fwd(q, k, v, d ** -0.5, causal, **kw)
                    c_out = check_close(out[:1, :, :g], refs["ref"]["out"], refs["low"]["out"], OUT_FACTOR, q.dtype)
                    c_lse = check_close(lse[:1, :g], refs["ref"]["lse"], refs["low"]["lse"], OUT_FACTOR,
                                        torch.float32)
                    ok = c_out["ok"] and c_lse["ok"]
                    row.update(check="PASS" if ok else "FAIL", check_detail=dict(out=finite(c_out), lse=finite(c_lse)))
                    if ok:
                        fns[name] = cuda_graph(lambda kw=kw: hopper.fwd(q, k, v, d ** -0.5, causal, **kw), dev)
                except Exception as exc:             # a compile or launch failure is a result here, not a crash
                    row.update(check="ERROR", check_detail=f"{type(exc).__name__}: {str(exc)[:200]}")
                    if "cuda" in str(exc).lower():
                        print(f"stopping: the CUDA context is unusable after {exc}", flush=True)
                        return 1
                rows[name] = row
            # the variants alternate, three rounds, median: clock drift and neighbours hit them alike
            samples = {name: [] for name in fns}
            for _ in range(3):
                for name, fn in fns.items():
                    samples[name].append(time_ms(fn, dev))
            for name, t in samples.items():
                rows[name]["ms"] = sorted(t)[1]
            portable = graph_ms(lambda: flash.fwd(q, k, v, d ** -0.5, upper=0 if causal else None))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cudnn = graph_ms(lambda: F.scaled_dot_product_attention(qt, kr, vr, is_causal=causal))
            for row in rows.values():
                row.update(portable_ms=portable, cudnn_ms=cudnn)
                emit(row)
            tf = lambda t: "-" if t is None else f"{fl / t / 1e9:.0f}"  # noqa: E731
            checks = "".join(r["check"][0] for r in rows.values())
            print(f"B={b} H={h}/{hkv} N={n} D={d:<4} {causal!s:<6} {checks:<6} "
                  + " ".join(f"{tf(rows[nm].get('ms')):>8}" for nm in names) + f" {tf(portable):>9} {tf(cudnn):>7}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
