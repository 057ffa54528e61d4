"""The Hopper Gluon backward (src/flashring/ops/hopper_bwd.py) checked, then timed against the portable backward
and cuDNN.

    PYTHONPATH=src python3 benchmarks/gluon_bwd.py [--out DIR] [--quick] [--seqlens N,...] [--headdims 128,64]
        [--modes separate,atomic] [--variants 'NAME:KW;...']

On an sm_90 GPU, first every variant (head dim 64 / 128, causal or not, dQ "separate" / "atomic", with and without
GQA) is checked on a small shape against the float64 reference with flashring.testing's rule (PASS / FAIL with
the error and the tolerance; the separate variant also twice for bitwise-equal gradients). Then the backward
alone is timed (CUDA-graph replays, flashring.bench.harness.time_ms: median, L2 flushed) at bf16 on issue 13's
grid, 16k tokens per batch and hidden 2048 (H=16 at D=128, H=32 at D=64), N in 1k / 4k / 8k / 16k, causal and
not: each dQ variant of the Gluon backward (only where its checks passed), the portable backward (ops/flash.py)
and cuDNN (torch's SDPA under ``SDPBackend.CUDNN_ATTENTION``: fwd+bwd minus fwd). TFLOP/s by flash-attn's
convention: backward = 2.5x the forward's 4*B*H*N*N*D, halved when causal. One JSON line per result goes to
DIR/gluon-bwd.jsonl as measured, so a hang (run it under `timeout`: a barrier-protocol bug would not return)
keeps what came before; the table comes last. Without a GPU, compile the kernels instead:
`benchmarks/compile_probe.py --hopper-bwd`. ``--variants`` adds separate-dQ launches with other
``hopper_bwd.launch_args`` keywords (e.g. ``bq64:block_q=64``: 64 query rows per dK/dV step at D=64), checked and
timed beside the modes.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from flashring.bench.harness import csv, positive, variants

CHECKS = [(2, 4, 4, 384), (1, 8, 2, 512)]      # (B, H, H_KV, N): plain, GQA 4 (a compile each: GROUP == 1 is
#                                                 specialised)
TOKENS = 16384
HIDDEN = 2048


def finite(c: dict) -> dict:
    """A check result JSON can hold (a NaN error becomes None)."""
    return {k: (v if not isinstance(v, float) or v == v and abs(v) != float("inf") else None) for k, v in c.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="append one JSON line per result to DIR/gluon-bwd.jsonl as it is measured")
    p.add_argument("--quick", action="store_true", help="time N = 8k only")
    p.add_argument("--seqlens", help="comma-separated N to time instead of 1k,4k,8k,16k (e.g. 512,1024,2048)")
    p.add_argument("--modes", default=["separate", "atomic"], type=csv(str), help="the dQ modes to check and time")
    p.add_argument("--headdims", default=[128, 64], type=csv(positive))
    p.add_argument("--variants", default={}, type=variants,
                   help="';'-separated NAME:KEYWORDS for hopper_bwd.bwd (the separate dQ kernel unless dq_mode "
                        "is given), e.g. 'bq64:block_q=64;a:dq_mode=\"atomic\"', each checked "
                        "and timed beside the modes")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: compile the kernels with benchmarks/compile_probe.py --hopper-bwd", file=sys.stderr)
        return 2
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from flashring.bench.harness import attention_flops, cuda_graph, time_ms
    from flashring.metadata import run_metadata
    from flashring.ops import flash, hopper_bwd
    from flashring.testing import GRAD_FACTOR, check_close, reference_pair
    dev = torch.device("cuda")
    # name -> (dq mode, launch keywords)
    # (a variant's dq_mode keyword picks its dQ mode: separate unless given)
    launches = {**{m: (m, {}) for m in args.modes},
                **{n: (kw.get("dq_mode", "separate"), {k: v for k, v in kw.items() if k != "dq_mode"})
                   for n, kw in args.variants.items()}}
    heads = args.headdims
    if not hopper_bwd.AVAILABLE or torch.cuda.get_device_capability(dev) != (9, 0):
        print("the Gluon backward needs an sm_90 GPU and triton's Gluon", file=sys.stderr)
        return 2
    sink = None
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        sink = open(Path(args.out) / "gluon-bwd.jsonl", "a")

    def emit(row):
        if sink is not None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    def fatal(exc) -> bool:
        """After an illegal address or a trap the CUDA context is unusable: stop rather than report noise."""
        text = str(exc).lower()
        return any(w in text for w in ("illegal", "unspecified launch failure", "misaligned", "device-side assert"))

    emit(run_metadata(dev, ["benchmarks/gluon_bwd.py", *(argv or sys.argv[1:])]))

    # ---- correctness: every variant on small shapes against the float64 reference
    failed = set()                  # (D, causal, dQ variant) with a check that did not pass: not timed
    print("check (float64 reference, flashring.testing's rule: err <= tol)")
    for d in heads:
        for causal in (False, True):
            for b, h, hkv, n in CHECKS:
                torch.manual_seed(0)
                q = torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16)
                k, v = (torch.randn(b, n, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
                do = torch.randn_like(q)
                out, lse = flash.fwd(q, k, v, d ** -0.5, upper=0 if causal else None)
                refs = reference_pair(q, k, v, do, upper=0 if causal else None)
                for name, (mode, kw) in launches.items():
                    row = dict(type="check", B=b, H=h, H_KV=hkv, N=n, D=d, causal=causal, dq=mode, variant=name,
                               **kw)
                    try:
                        grads = hopper_bwd.bwd(do, q, k, v, out, lse, d ** -0.5, causal, dq_mode=mode, **kw)
                        torch.cuda.synchronize()
                        detail = {name: check_close(g, refs["ref"][name], refs["low"][name], GRAD_FACTOR, q.dtype)
                                  for name, g in zip(("dq", "dk", "dv"), grads)}
                        ok = all(c["ok"] for c in detail.values())
                        if mode == "separate":
                            again = hopper_bwd.bwd(do, q, k, v, out, lse, d ** -0.5, causal, dq_mode=mode, **kw)
                            row["bitwise_repeat"] = all(torch.equal(x, y) for x, y in zip(grads, again))
                            ok = ok and row["bitwise_repeat"]
                        row.update(check="PASS" if ok else "FAIL", check_detail={n_: finite(c)
                                                                                 for n_, c in detail.items()})
                        text = " ".join(f"{n_} {c['err']:.2e}/{c['tol']:.2e}" for n_, c in detail.items())
                        if row.get("bitwise_repeat") is False:
                            text += "  (a second run differs)"
                    except Exception as exc:              # a compile or launch failure is a result here
                        row.update(check="ERROR", check_detail=f"{type(exc).__name__}: {str(exc)[:300]}")
                        text = row["check_detail"]
                    emit(row)
                    if row["check"] != "PASS":
                        failed.add((d, causal, name))
                    print(f"  D={d:<3} causal={causal!s:<5} B={b} H={h}/{hkv} N={n} {name:<8} {row['check']:<5} "
                          f"{text}", flush=True)
                    if row["check"] == "ERROR" and fatal(row["check_detail"]):
                        print("stopping: the CUDA context is unusable after that error", flush=True)
                        return 1

    # ---- timing: backward only, bf16, 16k tokens per batch, hidden 2048
    def graph_ms(fn):
        try:
            return time_ms(cuda_graph(fn, dev), dev)
        except Exception as exc:                      # e.g. no cuDNN kernel for the shape
            if fatal(exc):
                raise
            print(f"   timing failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            return None

    def cudnn_bwd_ms(qt, kt, vt, dot, causal):
        """cuDNN's backward alone: fwd+bwd minus fwd, each replayed from a CUDA graph (the forward with inputs
        that require grad, so that it writes the statistics the backward reads, as in training)."""
        leaves = [t.detach().requires_grad_() for t in (qt, kt, vt)]
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            both = graph_ms(lambda: torch.autograd.grad(F.scaled_dot_product_attention(*leaves, is_causal=causal),
                                                        leaves, dot))
            fwd = graph_ms(lambda: F.scaled_dot_product_attention(*leaves, is_causal=causal))
        return None if both is None or fwd is None else both - fwd

    table = []
    lengths = (8192,) if args.quick else (1024, 4096, 8192, 16384)
    if args.seqlens:
        lengths = tuple(int(x) for x in args.seqlens.split(","))
    grid = [(d, n) for d in heads for n in lengths]
    for d, n in grid:
        h, b = HIDDEN // d, TOKENS // n
        if table and "error" in table[-1] and fatal(table[-1]["error"]):
            print("stopping: the CUDA context is unusable after that error", flush=True)
            break
        q = torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16)
        k, v, do = (torch.randn_like(q) for _ in range(3))
        for causal in (False, True):
            fl = attention_flops(b, n, n, h, d, causal, "bwd")
            row = dict(type="result", B=b, H=h, H_KV=h, N=n, D=d, causal=causal, dtype="bf16", flops=fl)
            try:
                out, lse = flash.fwd(q, k, v, d ** -0.5, upper=0 if causal else None)
                for name, (mode, kw) in launches.items():
                    if (d, causal, name) not in failed:
                        row[f"gluon_{name}_ms"] = graph_ms(
                            lambda m=mode, kw=kw: hopper_bwd.bwd(do, q, k, v, out, lse, d ** -0.5, causal, dq_mode=m,
                                                                 **kw))
                row["portable_ms"] = graph_ms(lambda: flash.bwd(do, q, k, v, out, lse, d ** -0.5,
                                                                upper=0 if causal else None))
                row["cudnn_ms"] = cudnn_bwd_ms(*(t.transpose(1, 2) for t in (q, k, v, do)), causal)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"   error: {row['error']}", flush=True)
            emit(row)
            table.append(row)
            times = [row.get(f"gluon_{m}_ms") for m in launches] + [row.get("portable_ms"), row.get("cudnn_ms")]
            print(f"  timed B={b} H={h} N={n} D={d} causal={causal}: "
                  + " ".join("-" if t is None else f"{t:.3f}" for t in times) + " ms", flush=True)
            if "error" in row and fatal(row["error"]):
                break

    cols = [f"gluon {m}" for m in launches] + ["portable", "cudnn"]
    print("\nbackward TFLOP/s (bf16, 16k tokens, hidden 2048; x cuDNN in brackets)")
    print(f"{'D':>4} {'N':>6} {'causal':<6} " + " ".join(f"{c:>17}" for c in cols))
    for r in table:
        ms = [r.get(f"gluon_{m}_ms") for m in launches] + [r.get("portable_ms"), r.get("cudnn_ms")]
        cudnn = r.get("cudnn_ms")
        cells = []
        for t in ms:
            if t is None or t <= 0:
                cells.append(f"{'-':>17}")
                continue
            ratio = f" ({cudnn / t:.2f}x)" if cudnn else ""
            cells.append(f"{r['flops'] / t / 1e9:>9.0f}{ratio:>8}")
        print(f"{r['D']:>4} {r['N']:>6} {r['causal']!s:<6} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
