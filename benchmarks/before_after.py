"""Time two versions of flashring side by side in one process: this checkout and an earlier one.

    git archive OLD_SHA src/flashring | tar -x -C /tmp/old && python benchmarks/before_after.py --old /tmp/old/src \
        --old-sha OLD_SHA --out OUT

The earlier package is loaded under the name ``flashring_before`` (its custom ops renamed so both register), then
every configuration is checked and timed with ``flashring.bench.harness.time_ms`` for both, alternating A/B/A/B so
clock drift hits both alike. Prints a table last; writes ``before-after.jsonl`` to --out.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import flashring  # noqa: E402
from flashring.bench import harness as H  # noqa: E402
from flashring.metadata import run_metadata  # noqa: E402


def load_old(src: Path):
    """Copy ``src/flashring`` to a temp dir as ``flashring_before``, renaming its custom-op namespace."""
    tmp = Path(tempfile.mkdtemp())
    dst = tmp / "flashring_before"
    shutil.copytree(src / "flashring", dst)
    for f in dst.rglob("*.py"):
        text = f.read_text()
        if "flashring::" in text:
            f.write_text(text.replace("flashring::", "flashring_before::"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("flashring_before")


def cases(quick: bool):
    dense = [(d, n, c) for d in (64, 128) for n in ((1024, 8192) if quick else (1024, 4096, 8192, 16384))
             for c in (False, True)]
    sparse = [(n, kind, p) for n in ((8192,) if quick else (8192, 16384)) for kind, p in (("qk", 0.5), ("hash", 8))]
    return dense, sparse


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the earlier checkout's src/ directory")
    ap.add_argument("--old-sha", default="unknown")
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--rounds", type=int, default=2, help="A/B alternations per row (median taken)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    old = load_old(args.old)
    dev = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = run_metadata(dev, sys.argv, old_sha=args.old_sha)
    rows = []
    dense_cases, sparse_cases = cases(args.quick)
    g = torch.Generator(device=dev).manual_seed(0)

    def timed(make_fn):
        """median over rounds of (new ms, old ms), interleaved."""
        fns = [make_fn(flashring), make_fn(old)]
        times = [[], []]
        for _ in range(args.rounds):
            for i, fn in enumerate(fns):
                times[i].append(H.time_ms(fn, dev))
        return [statistics.median(t) for t in times]

    for d, n, causal in dense_cases:
        b, h = 16384 // n, 2048 // d
        q, k, v, do = (torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        outs = [m.flash_attn_func(q, k, v, causal=causal) for m in (flashring, old)]
        same = (outs[0] - outs[1]).abs().max().item()
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                mk = lambda m: (lambda: m.flash_attn_func(q, k, v, causal=causal))  # noqa: E731
            else:
                mk = lambda m: (lambda: torch.autograd.grad(m.flash_attn_func(q, k, v, causal=causal),  # noqa: E731
                                                            (q, k, v), do))
            new_ms, old_ms = timed(mk)
            flops = H.attention_flops(b, n, n, h, d, causal, mode)
            rows.append(dict(kind="dense", D=d, N=n, causal=causal, mode=mode, new_ms=new_ms, old_ms=old_ms,
                             new_tflops=flops / new_ms * 1e-9, old_tflops=flops / old_ms * 1e-9, max_abs_diff=same))
            print(json.dumps(rows[-1]), flush=True)
    for n, kind, p in sparse_cases:
        b, h, d = max(1, 16384 // n), 32, 64
        q, k, v, do = (torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        if kind == "qk":
            qa, ka = (torch.rand(b, n, h, device=dev, generator=g) >= p for _ in range(2))
            name = "qk_sparse_attn_func"
        else:
            qa, ka = (torch.randint(0, p, (b, n, h), device=dev, generator=g) for _ in range(2))
            name = "hash_sparse_attn_func"
        # the new tree's hash front end takes the bucket bound (its counting sort); the old one did not
        kw = {m: ({"num_buckets": p} if kind == "hash" and "num_buckets" in
                  inspect.signature(m.hash_sparse_attn_func).parameters else {}) for m in (flashring, old)}
        outs = [getattr(m, name)(q, k, v, qa, ka, causal=True, **kw[m]) for m in (flashring, old)]
        same = (outs[0] - outs[1]).abs().max().item()
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                mk = lambda m: (lambda: getattr(m, name)(q, k, v, qa, ka, causal=True, **kw[m]))  # noqa: E731
            else:
                mk = lambda m: (lambda: torch.autograd.grad(  # noqa: E731
                    getattr(m, name)(q, k, v, qa, ka, causal=True, **kw[m]), (q, k, v), do))
            new_ms, old_ms = timed(mk)
            rows.append(dict(kind=f"sparse-{kind}", param=p, N=n, D=d, mode=mode, new_ms=new_ms, old_ms=old_ms,
                             max_abs_diff=same))
            print(json.dumps(rows[-1]), flush=True)
    H.write_jsonl(args.out / "before-after.jsonl", [meta] + rows)
    print(f"\nbefore/after on {meta['device']}: new = {meta['git_sha']}, old = {args.old_sha} (ms, median of "
          f"{args.rounds} interleaved rounds)")
    print(f"{'kind':<12} {'D':>4} {'N':>6} {'causal':>6} {'mode':>8} {'new ms':>9} {'old ms':>9} {'new/old':>8} "
          f"{'maxdiff':>8}")
    for r in rows:
        print(f"{r['kind']:<12} {r['D']:>4} {r['N']:>6} {str(r.get('causal', True)):>6} {r['mode']:>8} "
              f"{r['new_ms']:>9.4f} {r['old_ms']:>9.4f} {r['new_ms'] / r['old_ms']:>8.3f} {r['max_abs_diff']:>8.1e}")
    ratios = [r["new_ms"] / r["old_ms"] for r in rows]
    print(f"new/old time: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
