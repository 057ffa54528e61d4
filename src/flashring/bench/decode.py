"""``flashring bench decode``: one new query token per sequence over a KV cache, the memory-bound inference step.

Providers: ``flashring`` (``flash_attn_with_kvcache``, contiguous cache), ``flashring-paged`` (the same cache in
256-token pages behind a shuffled block table), torch SDPA with each backend forced (query ``(B, H, 1, D)``,
``enable_gqa``) and FlexAttention (compiled) where they accept the shape. On a GPU, ``flashring-graph`` and
``sdpa-graph`` replay the flashring and default-SDPA calls from CUDA graphs: their time is the device work alone,
without the host time of launching it (a small decode call is host-bound in eager mode). Every provider is checked
against the float64 reference on one batch row before it is timed. Reported: µs, GB/s of K+V read (the bytes that
must move) and the share of the device copy bandwidth measured in the same run (``copy_GBps``, read + write bytes).

GPU default grid: batch {1, 4, 16, 64} x cache {1k, 4k, 16k, 32k, 128k} (at most 512k cached tokens per row of
the grid), heads 32/8 and head dim 128, plus heads 32/32 and 64/8 and head dim 64 at batch 16 x 8k. CPU: a tiny
run.
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import dense, harness as H
from .. import testing
from ..interface import flash_attn_with_kvcache

PAGE = 256


@dataclass(frozen=True)
class Case:
    batch: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    headdim: int
    dtype: torch.dtype

    def config(self) -> dict:
        return dict(batch=self.batch, seqlen_q=1, seqlen_k=self.seqlen_k, nheads=self.nheads, nheads_k=self.nheads_k,
                    headdim=self.headdim, dtype=next(k for k, v in H.DTYPES.items() if v == self.dtype))

    def label(self) -> str:
        return f"B={self.batch} Sk={self.seqlen_k} H={self.nheads}/{self.nheads_k} D={self.headdim}"

    @property
    def kv_bytes(self) -> int:
        return 2 * self.batch * self.seqlen_k * self.nheads_k * self.headdim * self.dtype.itemsize


def _providers(case: Case, q, k, v) -> Dict[str, Callable[[], Callable]]:
    """name -> builder of the timed callable (one-off setup, e.g. paging or compiling, happens in the builder)."""
    qt = q.transpose(1, 2).contiguous()                                       # (B, H, 1, D)
    kt, vt = (t.transpose(1, 2).contiguous() for t in (k, v))                 # (B, Hk, Sk, D)
    b = case.batch

    def flashring_contiguous():
        return lambda: flash_attn_with_kvcache(q, k, v)

    def flashring_paged():
        pages = case.seqlen_k // PAGE
        perm = torch.randperm(b * pages, device=q.device)
        table = perm.view(b, pages).to(torch.int32)
        kp = torch.empty(b * pages, PAGE, case.nheads_k, case.headdim, device=q.device, dtype=q.dtype)
        vp = torch.empty_like(kp)
        kp[perm] = k.reshape(b * pages, PAGE, case.nheads_k, case.headdim)
        vp[perm] = v.reshape(b * pages, PAGE, case.nheads_k, case.headdim)
        return lambda: flash_attn_with_kvcache(q, kp, vp, block_table=table)

    def sdpa(backend):
        def build():
            from torch.nn.attention import sdpa_kernel
            be = dense.sdpa_backend(backend)
            if be is None:
                raise H.Unavailable(f"torch has no SDPBackend.{backend}")

            def fn():
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=case.nheads != case.nheads_k)
            return fn
        return build

    def flex():
        compiled = dense.compiled_flex()
        return lambda: compiled(qt, kt, vt, enable_gqa=case.nheads != case.nheads_k)

    out = {"flashring": flashring_contiguous}
    if case.seqlen_k % PAGE == 0:
        out["flashring-paged"] = flashring_paged
    for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"),
                          ("sdpa-efficient", "EFFICIENT_ATTENTION"), ("sdpa-math", "MATH")):
        out[name] = sdpa(backend)
    out["flex"] = flex
    if q.is_cuda:     # the device work alone, launched from a CUDA graph (host launch time excluded, for both)
        out["flashring-graph"] = lambda: H.cuda_graph(flashring_contiguous(), q.device)
        out["sdpa-graph"] = lambda: H.cuda_graph(
            lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=case.nheads != case.nheads_k), q.device)
    return out


def _layouts(name: str, result: torch.Tensor) -> torch.Tensor:
    """Provider output -> (B, 1, H, D)."""
    return result if name.startswith("flashring") else result.transpose(1, 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashring bench decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=H.csv(H.positive), help="default 1,4,16,64 (CPU: 2)")
    p.add_argument("--seqlens", type=H.csv(H.seqlen), help="cache lengths, default 1k,4k,16k,32k,128k (CPU: 256)")
    p.add_argument("--heads", type=H.csv(str), help="nheads/nheads_k pairs, default 32/8 (CPU 4/2)")
    p.add_argument("--headdims", type=H.csv(H.headdim), help="default 128 (CPU 32)")
    p.add_argument("--max-tokens", type=H.positive, default=512 * 1024,
                   help="skip grid points with batch x seqlen above this (default 512k)")
    p.add_argument("--providers", type=H.csv(str), help="default: all that apply")
    p.add_argument("--dtype", choices=list(H.DTYPES), help="default bf16 (CPU fp32)")
    p.add_argument("--no-extra", action="store_true", help="GPU: skip the 32/32, 64/8 and D=64 points")
    H.add_common_args(p)
    return p


def _heads(text: str):
    h, hk = (int(x) for x in text.split("/"))
    if h < 1 or hk < 1 or h % hk:
        raise ValueError(f"--heads {text}: nheads must be a positive multiple of nheads_k")
    return h, hk


def resolve(args):
    gpu = args.device.type == "cuda"
    dtype = H.DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    batches = args.batches or ([1, 4, 16, 64] if gpu else [2])
    seqlens = args.seqlens or ([1024, 4096, 16384, 32768, 131072] if gpu else [256])
    heads = [_heads(x) for x in args.heads] if args.heads else ([(32, 8)] if gpu else [(4, 2)])
    dims = args.headdims or ([128] if gpu else [32])
    cases = [Case(b, s, h, hk, d, dtype) for (h, hk), d, b, s in itertools.product(heads, dims, batches, seqlens)
             if b * s <= args.max_tokens]
    if gpu and not (args.no_extra or args.heads or args.headdims or args.batches or args.seqlens):
        cases += [Case(16, 8192, 32, 32, 128, dtype), Case(16, 8192, 64, 8, 128, dtype),
                  Case(16, 8192, 32, 8, 64, dtype)]
    if not cases:
        raise ValueError("no grid point fits --max-tokens")
    if args.repeats is None:
        args.repeats = 3
    return cases


def render_table(results: List[dict]) -> str:
    headers = ["provider", "us", "GB/s", "% copy BW", "vs best sdpa", "check"]
    # eager rows are compared with the fastest eager SDPA backend, "-graph" rows with SDPA replayed from a graph
    rows: List[object] = []
    groups: Dict[str, List[dict]] = {}
    for r in results:
        groups.setdefault(r["label"], []).append(r)
    for label, group in groups.items():
        rows.append(f"== {label}  (K+V {group[0]['kv_bytes'] / 2**20:.0f} MiB)")
        for r in group:
            graph = r["provider"].endswith("-graph")
            sdpa = [x["ms"] for x in group if x["provider"].startswith("sdpa") and x["ms"]
                    and x["provider"].endswith("-graph") == graph]
            best = min(sdpa) if sdpa else None
            rows.append([r["provider"], H.fmt_num(r["ms"] * 1e3 if r["ms"] else None, 4),
                         H.fmt_num(r.get("gbps"), 4), H.fmt_num(100 * r["bw_share"] if r.get("bw_share") else None),
                         H.fmt_x(best / r["ms"] if best and r["ms"] else None), H.status(r)])
    return H.format_table(headers, rows, align="lrrrrl")


def plot_results(results: List[dict], stem: Path) -> List[Path]:
    rows = [r for r in results if r["config"]["nheads"] == 32 and r["config"]["nheads_k"] == 8]
    grid = H.panels(rows, lambda r: f"B={r['config']['batch']} D={r['config']['headdim']}", lambda r: r["provider"],
                    lambda r: r["config"]["seqlen_k"], lambda r: r.get("bw_share"))
    path = H.save_grid(grid, "share of copy bandwidth", Path(f"{stem}-bandwidth.png"), xlabel="cache length")
    return [path] if path else []


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    parsed = H.parse_cli(build_parser(), resolve, argv, "flashring bench decode")
    if isinstance(parsed, int):
        return parsed
    args, cases, seed = parsed
    dev = args.device
    copy = H.copy_bandwidth_gbps(dev)
    run = H.Run(args, dev, "decode", argv, seed, copy_GBps=copy)
    run.progress.total = len(cases) * (9 if dev.type == "cuda" else 7)
    g = torch.Generator(device=dev).manual_seed(seed)
    with H.cpu_threads(args.threads):
        for case in cases:
            try:
                q = torch.randn(case.batch, 1, case.nheads, case.headdim, device=dev, dtype=case.dtype, generator=g)
                k, v = (torch.randn(case.batch, case.seqlen_k, case.nheads_k, case.headdim, device=dev,
                                    dtype=case.dtype, generator=g) for _ in range(2))
            except Exception as exc:          # e.g. the cache does not fit: an error row, the grid goes on
                H.free_memory(dev)
                run.emit(dict(config=case.config(), label=case.label(), provider="all", ms=None, kv_bytes=case.kv_bytes,
                              check=None, check_detail=None, error=H.reason(exc)), case.label())
                continue
            hk_ref = min(2, case.nheads_k)
            group = case.nheads // case.nheads_k
            refs = testing.reference_pair(q[:1, :, :hk_ref * group], k[:1, :, :hk_ref], v[:1, :, :hk_ref], None)
            providers = _providers(case, q, k, v)
            for name, build in providers.items():
                if args.providers and name not in args.providers:
                    continue
                run.progress.step(f"{case.label()} | {name}")
                ms = detail = error = None
                try:
                    fn = build()
                    out = _layouts(name, fn())
                    detail = testing.check_all({"out": out[:1, :, :hk_ref * group]}, refs, case.dtype, ("out",))
                    ms = run.time(fn)
                except Exception as exc:
                    error = H.reason(exc)
                    H.free_memory(dev)
                gbps = case.kv_bytes / (ms * 1e-3) / 1e9 if ms else None
                run.emit(dict(config=case.config(), label=case.label(), provider=name, mode="fwd", ms=ms,
                              kv_bytes=case.kv_bytes, gbps=gbps, bw_share=gbps / copy if gbps and copy else None,
                              check=H.check_status(detail), check_detail=detail, error=error),
                         f"{name} [{case.label()}]")
            del q, k, v, providers
            H.free_memory(dev)
    header = [f"device copy bandwidth (read + write) measured now: {H.fmt_num(copy, 4)} GB/s" if copy else
              "CPU: bandwidth shares are not measured"]
    return run.finish(render_table, plot_results, ("provider", "label"), header)

