"""``flashring bench varlen``: packed variable-length batches (``flash_attn_varlen_func``), forward and
forward+backward, causal.

Providers: ``flashring-varlen`` (the packed batch), ``flashring-1seq`` (``flash_attn_func`` on ONE sequence of the
same total tokens: the efficiency bar, ratio reported as ``vs 1seq`` in TFLOP/s), and torch SDPA with each backend
on the right-padded batch (``is_causal``: valid rows never see the padding, which still costs compute). TFLOP/s
count only the real (causal) work of each sequence. Every provider is checked against the float64 reference on the
first sequence before timing.

GPU default: 16k tokens per batch in ragged sequences (lengths drawn uniformly in [max/8, max] for max 1k, 4k,
8k), 16 heads x 128 and 32 x 64, bf16. CPU: a tiny run.
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import dense, harness as H
from .. import testing
from ..interface import flash_attn_func, flash_attn_varlen_func
from ..masks import flash_bounds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashring bench varlen", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=H.positive, help="total tokens per packed batch (default 16384; CPU 256)")
    p.add_argument("--max-seqlens", type=H.csv(H.seqlen), help="longest sequence, default 1k,4k,8k (CPU 64)")
    p.add_argument("--headdims", type=H.csv(H.headdim), help="default 128,64 (hidden 2048; CPU 32)")
    p.add_argument("--modes", type=H.csv(str, ("fwd", "fwd+bwd")), default=["fwd", "fwd+bwd"])
    p.add_argument("--dtype", choices=list(H.DTYPES), help="default bf16 (CPU fp32)")
    H.add_common_args(p)
    return p


def resolve(args):
    gpu = args.device.type == "cuda"
    tokens = args.tokens or (16384 if gpu else 256)
    maxes = args.max_seqlens or ([1024, 4096, 8192] if gpu else [64])
    if any(m > tokens for m in maxes):
        raise ValueError(f"--max-seqlens must not exceed --tokens ({tokens})")
    dims = args.headdims or ([128, 64] if gpu else [32])
    if args.repeats is None:
        args.repeats = 3
    return tokens, maxes, dims, H.DTYPES[args.dtype or ("bf16" if gpu else "fp32")]


def ragged_lengths(tokens: int, longest: int, gen: torch.Generator) -> List[int]:
    """Lengths in [longest/8, longest] summing to ``tokens`` (the last one takes the remainder)."""
    lens = []
    while sum(lens) < tokens:
        n = int(torch.randint(max(1, longest // 8), longest + 1, (1,), generator=gen))
        lens.append(min(n, tokens - sum(lens)))
    return lens


def render_table(results: List[dict]) -> str:
    headers = ["provider", "mode", "ms", "TFLOP/s", "vs 1seq", "check"]
    rows: List[object] = []
    groups = {}
    for r in results:
        groups.setdefault(r["label"], []).append(r)
    for label, group in groups.items():
        rows.append(f"== {label}")
        base = {r["mode"]: r["tflops"] for r in group if r["provider"] == "flashring-1seq"}
        for r in group:
            ratio = r["tflops"] / base[r["mode"]] if r["tflops"] and base.get(r["mode"]) else None
            rows.append([r["provider"], r["mode"], H.fmt_num(r["ms"], 4), H.fmt_num(r["tflops"]), H.fmt_x(ratio),
                         H.status(r)])
    return H.format_table(headers, rows, align="llrrrl")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    parsed = H.parse_cli(build_parser(), resolve, argv, "flashring bench varlen")
    if isinstance(parsed, int):
        return parsed
    args, (tokens, maxes, dims, dtype), seed = parsed
    dev = args.device
    run = H.Run(args, dev, "varlen", argv, seed, tokens=tokens)
    run.progress.total = len(maxes) * len(dims) * 6 * len(args.modes)
    g = torch.Generator().manual_seed(seed)
    with H.cpu_threads(args.threads):
        for longest in maxes:
            lens = ragged_lengths(tokens, longest, g)
            cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
            for d in dims:
                h = max(1, 2048 // d) if dev.type == "cuda" else 2
                label = f"{len(lens)} seqs, max {longest}, {tokens} tokens, H={h} D={d}"
                q, k, v, do = (torch.randn(tokens, h, d, generator=g).to(dev, dtype) for _ in range(4))
                flops = sum(H.attention_flops(1, n, n, h, d, True, "fwd") for n in lens)
                # the float64 reference on the first sequence
                n0 = lens[0]
                refs = testing.reference_pair(q[None, :n0], k[None, :n0], v[None, :n0], do[None, :n0],
                                              lower=None, upper=flash_bounds(n0, n0, True, (-1, -1))[1])
                pad = torch.zeros(len(lens), longest, h, d, device=dev, dtype=dtype)
                idx = torch.cat([torch.arange(n, device=dev) + i * longest for i, n in enumerate(lens)])
                padded = [pad.view(-1, h, d).index_copy(0, idx, t).view(len(lens), longest, h, d).transpose(1, 2)
                          .contiguous() for t in (q, k, v, do)]

                def first_seq(name, out):
                    if name == "flashring-varlen":
                        return out[None, :n0]
                    if name == "flashring-1seq":
                        return out[:, :n0]
                    return out.transpose(1, 2)[:1, :n0]

                candidates = {
                    "flashring-varlen": ((q, k, v, do), lambda a, b_, c: flash_attn_varlen_func(
                        a, b_, c, cu, cu, longest, longest, causal=True), flops),
                    "flashring-1seq": (tuple(t[None] for t in (q, k, v, do)),
                                       lambda a, b_, c: flash_attn_func(a, b_, c, causal=True),
                                       H.attention_flops(1, tokens, tokens, h, d, True, "fwd")),
                }
                for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"),
                                      ("sdpa-efficient", "EFFICIENT_ATTENTION"), ("sdpa-math", "MATH")):
                    be = dense.sdpa_backend(backend)

                    def sdpa(a, b_, c, be=be):
                        from torch.nn.attention import sdpa_kernel
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(a, b_, c, is_causal=True)
                    candidates[name] = (tuple(padded), sdpa, flops)
                for name, (inputs, fn, fwd_flops) in candidates.items():
                    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
                    detail, error = None, None
                    try:
                        out = fn(*leaves)
                        grads = torch.autograd.grad(out, leaves, inputs[3])
                        results = {"out": first_seq(name, out.detach())}
                        results.update(zip(("dq", "dk", "dv"), (first_seq(name, x) for x in grads)))
                        if name == "flashring-1seq":    # its later queries also see these keys: dK/dV differ
                            del results["dk"], results["dv"]
                        detail = testing.check_all(results, refs, dtype)
                    except Exception as exc:
                        error = H.reason(exc)
                    for mode in args.modes:
                        run.progress.step(f"{label} | {name} {mode}")
                        ms = None
                        if error is None:
                            try:
                                timed = H.timed_fn(mode, fn, [tuple(leaves) + (inputs[3],)])
                                ms = run.time(timed)
                            except Exception as exc:
                                error = H.reason(exc)
                        f = fwd_flops * H.MODE_FLOP_FACTOR[mode]
                        run.emit(dict(config=dict(tokens=tokens, max_seqlen=longest, n_seqs=len(lens), nheads=h,
                                                  headdim=d, causal=True, dtype=str(dtype)[6:]),
                                      label=label, provider=name, mode=mode, ms=ms, flops=f,
                                      tflops=f / (ms * 1e-3) / 1e12 if ms else None,
                                      check=H.check_status(detail) if error is None else None,
                                      check_detail=detail if error is None else None, error=error),
                                 f"{name} {mode} [{label}]")
                    H.free_memory(dev)
    return run.finish(render_table, None, ("provider", "mode", "label"))

