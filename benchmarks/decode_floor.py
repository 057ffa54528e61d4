"""Where a small decode call's time goes (GPU): host (Python + launches) vs device (kernels alone).

For each shape: the harness time (``time_ms``, L2 flush, per-call events), the host time per call (calls issued
back to back, one sync at the end), the device time per call (the call captured in a CUDA graph, replayed), and the
host time of the pieces (validation + bookkeeping, the split-KV kernel launch, the combine launch). torch SDPA is
measured the same way. Writes ``decode-floor.jsonl`` under --out and prints a table.

    PYTHONPATH=src python benchmarks/decode_floor.py --out OUT
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flashring import flash_attn_with_kvcache
from flashring.bench import harness as H
from flashring.metadata import run_metadata
from flashring.ops import decode


def graph_us(fn, n=200):
    """Device microseconds per call: ``fn`` replayed from a CUDA graph, back to back (no launch cost)."""
    replay = H.cuda_graph(fn, torch.device("cuda"))
    replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e3


def tune(dev):
    """Device time (CUDA graph replay) of decode-kernel configs and split counts against the default and SDPA."""
    rows = []
    for b, sk, h, hk, d in ((1, 1024, 32, 8, 128), (1, 16384, 32, 8, 128), (16, 2048, 32, 8, 128),
                            (16, 8192, 32, 8, 128), (64, 1024, 32, 8, 128), (16, 8192, 32, 8, 64),
                            (16, 8192, 64, 8, 128)):
        q = torch.randn(b, 1, h, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, sk, hk, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        qt, kt, vt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        base = dict(batch=b, seqlen_k=sk, heads=f"{h}/{hk}", headdim=d)
        rows.append(dict(base, variant="sdpa", graph_us=graph_us(
            lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True))))
        auto = decode.choose_splits(b, hk, 1, sk, 64, dev)
        rows.append(dict(base, variant=f"default splits={auto}", graph_us=graph_us(
            lambda: decode.attention(q, k, v, None, sk, d ** -0.5, None, None, 0.0))))
        for bn, w, st in ((64, 4, 2), (64, 4, 4), (128, 4, 2), (128, 4, 3), (128, 8, 3), (32, 4, 3), (64, 8, 3)):
            for splits in sorted({max(1, auto // 2), auto, min(128, 2 * auto)}):
                cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st)
                try:
                    us = graph_us(lambda: decode.attention(q, k, v, None, sk, d ** -0.5, None, None, 0.0,
                                                           num_splits=splits, config=cfg))
                except Exception as e:  # noqa: BLE001 - a config that does not fit is a result
                    us = None
                    print("config failed", cfg, type(e).__name__, str(e)[:100])
                rows.append(dict(base, variant=f"bn{bn} w{w} s{st} splits={splits}", graph_us=us))
        best = min((r for r in rows if r["batch"] == b and r["seqlen_k"] == sk and r["headdim"] == d
                    and r["heads"] == base["heads"] and r["graph_us"]), key=lambda r: r["graph_us"])
        sd = next(r for r in rows if r["variant"] == "sdpa" and r["batch"] == b and r["seqlen_k"] == sk
                  and r["headdim"] == d and r["heads"] == base["heads"])
        df = next(r for r in rows if r["variant"].startswith("default") and r["batch"] == b and r["seqlen_k"] == sk
                  and r["headdim"] == d and r["heads"] == base["heads"])
        print(f"tune {b}x{sk} {base['heads']} D={d}: sdpa {sd['graph_us']:.1f} default {df['graph_us']:.1f} "
              f"({df['variant']}) best {best['graph_us']:.1f} ({best['variant']})", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tune", action="store_true")
    args = p.parse_args()
    dev = torch.device("cuda")
    seed = int(time.time()) % 100000
    torch.manual_seed(seed)
    print("seed", seed)
    rows = []
    for b, sk in ((1, 1024), (1, 16384), (4, 4096), (16, 2048), (16, 8192), (64, 1024)):
        h, hk, d = 32, 8, 128
        q = torch.randn(b, 1, h, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, sk, hk, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        qt, kt, vt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        fr = lambda: flash_attn_with_kvcache(q, k, v)  # noqa: E731
        sd = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)  # noqa: E731
        # pieces: the launcher alone (no validation), and its two kernel launches
        kern = lambda: decode.attention(q, k, v, None, sk, d ** -0.5, None, None, 0.0)  # noqa: E731
        row = dict(batch=b, seqlen_k=sk, splits=decode.choose_splits(b, hk, 1, sk, 64, dev))
        launches = decode.LAUNCH_DECODE.fast_calls
        for name, fn in (("flashring", fr), ("sdpa", sd), ("launcher", kern)):
            row[f"{name}_harness_us"] = H.time_ms(fn, dev) * 1e3
            row[f"{name}_host_us"] = H.host_us(fn, dev)
            row[f"{name}_graph_us"] = graph_us(fn)
        row["fast_launches"] = decode.LAUNCH_DECODE.fast_calls - launches
        rows.append(row)
        print(json.dumps(row), flush=True)
    tuned = tune(dev) if args.tune else []
    args.out.mkdir(parents=True, exist_ok=True)
    H.write_jsonl(args.out / "decode-floor.jsonl", [dict(meta=run_metadata(dev), seed=seed)] + rows + tuned)
    print(f"{'B x Sk':>10} {'splits':>6} | {'fr harness':>10} {'fr host':>8} {'fr graph':>8} {'launcher host':>13} "
          f"| {'sdpa harness':>12} {'sdpa host':>9} {'sdpa graph':>10}")
    for r in rows:
        print(f"{r['batch']:>3} x {r['seqlen_k']:>5} {r['splits']:>6} | {r['flashring_harness_us']:>10.1f} "
              f"{r['flashring_host_us']:>8.1f} {r['flashring_graph_us']:>8.1f} {r['launcher_host_us']:>13.1f} | "
              f"{r['sdpa_harness_us']:>12.1f} {r['sdpa_host_us']:>9.1f} {r['sdpa_graph_us']:>10.1f}")


if __name__ == "__main__":
    main()
