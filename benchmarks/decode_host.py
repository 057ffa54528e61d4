"""Host time per eager decode step (``flash_attn_with_kvcache``, one new token; ``harness.host_us``), this checkout
against an earlier one loaded beside it, alternating rounds: at small caches a decode call is bound by its host
time (argument checks, launch), which CUDA-graph timings hide. (Session 14's two runs timed the same loop to the
final sync, i.e. plus the last call's GPU time over 1,000-2,000 calls.)

    git archive OLD_SHA src/flashring | tar -x -C /tmp/old && PYTHONPATH=src python3 benchmarks/decode_host.py \
        --old /tmp/old/src --old-sha OLD_SHA --out OUT

Writes ``decode-host.jsonl`` (metadata line + rows) to --out and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import flashring  # noqa: E402
from before_after import load_old  # noqa: E402
from flashring.bench import harness as H  # noqa: E402
from flashring.metadata import run_metadata  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the earlier checkout's src/ directory")
    ap.add_argument("--old-sha", default="unknown")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    old = load_old(args.old)
    dev = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(dev, sys.argv, old_sha=args.old_sha)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    page = 64
    for b, sk, lens_kind in ((1, 512, "int"), (1, 2048, "int"), (1, 2048, "tensor"), (8, 2048, "tensor"),
                             (8, 2048, "paged"), (8, 32768, "paged"), (8, 2048, "append"), (8, 2048, "rotary")):
        h, hk, d = 32, 8, 128
        q = torch.randn(b, 1, h, d, device=dev, dtype=torch.bfloat16, generator=g)
        extra = {}
        if lens_kind == "paged":        # a shuffled block table over b * sk / page pages
            n_pages = b * sk // page
            kc, vc = (torch.randn(n_pages, page, hk, d, device=dev, dtype=torch.bfloat16, generator=g)
                      for _ in range(2))
            extra["block_table"] = torch.randperm(n_pages, device=dev, generator=g).to(torch.int32).view(b, -1)
        else:
            kc, vc = (torch.randn(b, sk, hk, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
        lens = sk - 1 if lens_kind == "int" else torch.full((b,), sk - 1, dtype=torch.int32, device=dev)
        if lens_kind in ("append", "rotary"):     # one new token's k/v written in place (rotated), as flash-attn
            extra.update(k=torch.randn(b, 1, hk, d, device=dev, dtype=torch.bfloat16, generator=g))
            extra["v"] = torch.randn_like(extra["k"])
        if lens_kind == "rotary":
            angles = torch.rand(sk, d // 2, device=dev, generator=g) * 6.3
            extra.update(rotary_cos=angles.cos().to(torch.bfloat16), rotary_sin=angles.sin().to(torch.bfloat16))
        outs = [m.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, **extra)
                for m in (flashring, old)]
        diff = (outs[0] - outs[1]).abs().max().item()
        fns = [lambda m=m: m.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, **extra)
               for m in (flashring, old)]
        times = [[], []]
        for _ in range(args.rounds):
            for i, fn in enumerate(fns):
                times[i].append(H.host_us(fn, dev, args.calls))
        new_us, old_us = (statistics.median(t) for t in times)
        rows.append(dict(batch=b, cache=sk, heads=f"{h}/{hk}", headdim=d, cache_seqlens=lens_kind, new_us=new_us,
                         old_us=old_us, max_abs_diff=diff))
        print(json.dumps(rows[-1]), flush=True)
    H.write_jsonl(args.out / "decode-host.jsonl", [meta] + rows)
    print(f"\neager decode steps on {meta['device']}: new = {meta['git_sha']}, old = {args.old_sha} (us per call, "
          f"median of {args.rounds} alternating rounds of {args.calls} calls)")
    print(f"{'B':>3} {'cache':>6} {'seqlens':>8} {'new us':>8} {'old us':>8} {'new/old':>8} {'maxdiff':>8}")
    for r in rows:
        print(f"{r['batch']:>3} {r['cache']:>6} {r['cache_seqlens']:>8} {r['new_us']:>8.1f} {r['old_us']:>8.1f} "
              f"{r['new_us'] / r['old_us']:>8.3f} {r['max_abs_diff']:>8.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
