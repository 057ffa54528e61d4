"""The Hopper Gluon forward (src/flashring/ops/hopper.py) checked and timed against the portable kernel and cuDNN.

    PYTHONPATH=src python3 benchmarks/gluon_fwd.py [--out DIR]

On a GPU: every shape of issue 13's grid (16k tokens per batch, hidden 2048; plus GQA at 1k), causal and not,
is checked against the float64 reference with flashring.testing's rule (on the first KV head's query group), then
timed from CUDA-graph replays next to flashring's portable forward and cuDNN, one JSON line per point written
as measured (a hang, killed by `timeout`, keeps what came before). Without a GPU, compile the kernel for sm_90
instead: `benchmarks/compile_probe.py --hopper`.

The session-7 prototype this was drawn from also had FA3's intra-warpgroup statement order and a ping-pong
turnstile; neither gained beyond noise on the H100 (BENCHMARKS.md, session 7), so the library keeps the serial
loop; the variants are in git history (commit 540a4dc, this file).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

SHAPES = [(2, 8, 2, 1024, 128), (4, 16, 16, 4096, 128), (2, 16, 16, 8192, 128), (1, 16, 16, 16384, 128),
          (2, 32, 32, 8192, 64), (1, 32, 32, 16384, 64)]     # (B, H, H_KV, N, D)


def finite(c: dict) -> dict:
    """A check result JSON can hold (a NaN error becomes None)."""
    return {k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else None) for k, v in c.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="append one JSON line per result to DIR/gluon-fwd.jsonl as it is measured")
    args = p.parse_args(argv)
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
    print(f"{'shape':<28} {'causal':<6} {'check':<6} {'gluon':>7} {'portable':>9} {'cudnn':>7}  TFLOP/s (ms: graphs)")
    for b, h, hkv, n, d in SHAPES:
        q = torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16)           # flash-attn's (B, S, H, D)
        k, v = (torch.randn(b, n, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
        qt, kr, vr = q.transpose(1, 2), *(t.transpose(1, 2).repeat_interleave(h // hkv, dim=1) for t in (k, v))
        for causal in (False, True):
            fl = attention_flops(b, n, n, h, d, causal, "fwd")
            row = dict(type="result", B=b, H=h, H_KV=hkv, N=n, D=d, causal=causal)
            try:
                out, lse = hopper.fwd(q, k, v, d ** -0.5, causal)
                g = h // hkv
                refs = reference_pair(q[:1, :, :g], k[:1, :, :1], v[:1, :, :1], None, upper=0 if causal else None)
                c_out = check_close(out[:1, :, :g], refs["ref"]["out"], refs["low"]["out"], OUT_FACTOR, q.dtype)
                c_lse = check_close(lse[:1, :g], refs["ref"]["lse"], refs["low"]["lse"], OUT_FACTOR, torch.float32)
                ok = c_out["ok"] and c_lse["ok"]
                row.update(check="PASS" if ok else "FAIL", check_detail=dict(out=finite(c_out), lse=finite(c_lse)))
                if ok:
                    row["ms"] = graph_ms(lambda: hopper.fwd(q, k, v, d ** -0.5, causal))
            except Exception as exc:             # a compile or launch failure is a result here, not a crash
                row.update(check="ERROR", check_detail=f"{type(exc).__name__}: {str(exc)[:200]}")
            row["portable_ms"] = graph_ms(lambda: flash.fwd(q, k, v, d ** -0.5, upper=0 if causal else None))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                row["cudnn_ms"] = graph_ms(lambda: F.scaled_dot_product_attention(qt, kr, vr, is_causal=causal))
            emit(row)
            times = (row.get("ms"), row["portable_ms"], row["cudnn_ms"])
            tf = " / ".join("-" if t is None else f"{fl / t / 1e9:.0f}" for t in times)
            ms = " ".join("-" if t is None else f"{t:.3f}" for t in times)
            print(f"B={b} H={h}/{hkv} N={n} D={d:<4} {causal!s:<6} {row['check']:<6} {ms}  {tf}", flush=True)
            if row["check"] == "ERROR" and "cuda" in str(row["check_detail"]).lower():
                print("stopping: the CUDA context is unusable after that error", flush=True)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
