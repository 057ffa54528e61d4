"""``flashring bench dense`` (the default suite): speed, memory and correctness of flashring against PyTorch's
attention backends.

Providers: ``flashring`` (``flash_attn_func``), torch SDPA with one backend forced (``sdpa-flash`` = FlashAttention-2,
``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``), ``flex`` (FlexAttention under ``torch.compile``) and ``naive``
(matmul-softmax-matmul in the input dtype). Modes ``fwd``, ``bwd``, ``fwd+bwd``.

GPU default sweep: seqlen 512..16k at 16k tokens per batch, hidden 2048 (nheads = 2048 // headdim), headdim 64/128,
causal and not, bf16. Without CUDA a small fp32 run (seqlen 128/256, batch 1, 2 heads, headdim 64) finishes in
seconds. Every provider is checked once per shape against the float64 reference before it is timed.
Exit code 0, 1 if any check FAILed (timing still completes), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import harness as H

BASELINES = ("sdpa-flash", "sdpa-cudnn")          # the table's ratio columns


# ----------------------------------------------------------------------------------------------------- providers
def _build_flashring(shape: H.Shape, device: torch.device):
    from ..interface import flash_attn_func
    return lambda q, k, v: flash_attn_func(q, k, v, causal=shape.causal)


def sdpa_backend(name: str):
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return None
    return getattr(SDPBackend, name, None)


def sdpa_provider(name: str, backend_name: str) -> H.Provider:
    def build(shape: H.Shape, device: torch.device):
        if sdpa_backend(backend_name) is None:
            raise H.Unavailable(f"torch {torch.__version__} has no SDPBackend.{backend_name}")
        if backend_name == "CUDNN_ATTENTION" and device.type != "cuda":
            raise H.Unavailable("cuDNN attention needs CUDA")
        # SDPA's is_causal is top-left aligned; the sweep has seqlen_q == seqlen_k, where it equals flash-attn's.
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal)

    def context():
        from torch.nn.attention import sdpa_kernel
        return sdpa_kernel(sdpa_backend(backend_name))

    return H.Provider(name, "bhsd", build, context)


_FLEX: Dict[str, Callable] = {}


def compiled_flex() -> Callable:
    """torch.compile'd flex_attention (one compile per shape), or Unavailable."""
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError:
            raise H.Unavailable(f"torch {torch.__version__} has no flex_attention") from None
        # Each shape is a recompile (dynamic=False: static shapes give flex its best kernels); the default limit of
        # 8 would silently drop later shapes to an eager fallback, so raise it for a 24-shape sweep.
        cfg = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 256))
        # The bwd mode re-runs one backward graph (retain_graph=True); AOTAutograd refuses that when the compiled
        # backward donates (reuses) saved buffers, so donation is off for the whole run.
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _build_flex(shape: H.Shape, device: torch.device):
    flex = compiled_flex()
    from torch.nn.attention.flex_attention import create_block_mask
    block_mask = (create_block_mask(_causal_mod, None, None, shape.seqlen, shape.seqlen, device=str(device))
                  if shape.causal else None)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def _build_naive(shape: H.Shape, device: torch.device):
    scale = 1.0 / math.sqrt(shape.headdim)
    hidden = (torch.ones(shape.seqlen, shape.seqlen, dtype=torch.bool, device=device).triu(1)
              if shape.causal else None)

    def naive(q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * scale          # (B, H, S, S) in the input dtype
        if hidden is not None:
            s = s.masked_fill(hidden, float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1), v)          # (B, H, S, D)

    return naive


PROVIDERS: Dict[str, H.Provider] = {p.name: p for p in (
    H.Provider("flashring", "bshd", _build_flashring),
    sdpa_provider("sdpa-flash", "FLASH_ATTENTION"),
    sdpa_provider("sdpa-cudnn", "CUDNN_ATTENTION"),
    sdpa_provider("sdpa-efficient", "EFFICIENT_ATTENTION"),
    sdpa_provider("sdpa-math", "MATH"),
    H.Provider("flex", "bhsd", _build_flex),
    H.Provider("naive", "bhsd", _build_naive),
)}
ALIASES = {"flash": "sdpa-flash", "cudnn": "sdpa-cudnn", "efficient": "sdpa-efficient", "math": "sdpa-math"}


def random_inputs(shape: H.Shape, seed: int, device: torch.device, n: int = 4) -> List[torch.Tensor]:
    """q, k, v, do in (B, S, H, D): standard normal, never zeros."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape.batch, shape.seqlen, shape.nheads, shape.headdim, generator=gen, device=device,
                        dtype=shape.dtype) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    names = list(PROVIDERS) + list(ALIASES)
    p = argparse.ArgumentParser(prog="flashring bench dense", description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=H.csv(H.seqlen), help="e.g. 512,1k,4k (GPU default 512..16k; CPU 128,256)")
    p.add_argument("--seqlen-32k", action="store_true", help="add seqlen 32k to the default sweep")
    p.add_argument("--headdims", type=H.csv(H.headdim), help="GPU default 64,128; CPU 64")
    p.add_argument("--hdim256", action="store_true", help="add headdim 256 to the default sweep")
    p.add_argument("--batch", type=H.positive, help="default: 16384 tokens // seqlen on GPU, 1 on CPU")
    p.add_argument("--nheads", type=H.positive, help="default: hidden 2048 // headdim on GPU, 2 on CPU")
    p.add_argument("--providers", type=H.csv(str, names),
                   help=f"from {', '.join(names)} (GPU default: all; CPU: flashring,sdpa-math,naive)")
    p.add_argument("--modes", type=H.csv(str, H.MODES), help="fwd,bwd,fwd+bwd (default all)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--dtype", type=H.csv(str, list(H.DTYPES)), help="GPU default bf16; CPU fp32")
    p.add_argument("--fp16", action="store_true", help="add fp16 to the default dtype(s)")
    p.add_argument("--quick", action="store_true",
                   help="small sweep (GPU: seqlen 1k,4k, headdim 128, flashring/sdpa-flash/sdpa-cudnn; "
                        "CPU: seqlen 128)")
    H.add_cuda_graphs_arg(p)
    H.add_common_args(p)
    return p


def resolve(args):
    """Device-dependent defaults: (shapes, providers, modes)."""
    gpu = args.device.type == "cuda"
    if gpu:
        seqlens = [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
        headdims = [128] if args.quick else [64, 128]
        providers = ["flashring", "sdpa-flash", "sdpa-cudnn"] if args.quick else list(PROVIDERS)
        dtypes = ["bf16"]
    else:
        seqlens = [128] if args.quick else [128, 256]
        headdims, providers, dtypes = [64], ["flashring", "sdpa-math", "naive"], ["fp32"]
    seqlens += [32768] if args.seqlen_32k else []
    headdims += [256] if args.hdim256 else []
    dtypes += ["fp16"] if args.fp16 else []
    seqlens, headdims = args.seqlens or seqlens, args.headdims or headdims
    dtypes = list(dict.fromkeys(args.dtype or dtypes))
    providers = list(dict.fromkeys(ALIASES.get(p, p) for p in (args.providers or providers)))
    modes = H.cuda_graph_modes(args, [m for m in H.MODES if m in (args.modes or H.MODES)], gpu)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    shapes = []
    for dtype, hd, causal, n in itertools.product(dtypes, headdims, causals, sorted(set(seqlens))):
        batch = args.batch or (max(1, 16384 // n) if gpu else 1)
        nheads = args.nheads or (max(1, 2048 // hd) if gpu else 2)
        shapes.append(H.Shape(batch, n, nheads, hd, causal, H.DTYPES[dtype]))
    return shapes, [PROVIDERS[p] for p in providers], modes


def render_table(results: List[dict]) -> str:
    """Per shape, one row per (provider, mode); ratios are baseline ms / ms (>1 = faster than the baseline)."""
    headers = ["provider", "mode", "ms", "TFLOP/s", "vs flash", "vs cudnn", "mem", "check"]
    rows: List[object] = []
    by_shape: Dict[str, List[dict]] = {}
    for r in results:
        by_shape.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r)
    for group in by_shape.values():
        rows.append(f"== {H.config_label(group[0]['config'])}")
        base_ms = {(r["provider"], r["mode"]): r["ms"] for r in group if r["provider"] in BASELINES}
        for r in group:
            ratios = [H.fmt_x(base_ms[(b, r["mode"])] / r["ms"] if base_ms.get((b, r["mode"])) and r["ms"] else None)
                      for b in BASELINES]
            rows.append([r["provider"], r["mode"], H.fmt_num(r["ms"], 4), H.fmt_num(r["tflops"]), *ratios,
                         H.fmt_bytes(r["mem_bytes"]), H.status(r)])
    return H.format_table(headers, rows, align="llrrrrrl")


def plot_results(results: List[dict], stem: Path) -> List[Path]:
    """TFLOP/s vs seqlen (one panel per dtype/headdim/causal/mode, one line per provider) and fwd+bwd peak memory."""
    title = lambda r: (f"{r['config']['dtype']} D={r['config']['headdim']} "  # noqa: E731
                       f"{'causal' if r['config']['causal'] else 'full'} {r['mode']}")
    x = lambda r: r["config"]["seqlen_q"]  # noqa: E731
    perf = H.panels(results, title, lambda r: r["provider"], x, lambda r: r["tflops"])
    mem = H.panels([r for r in results if r["mode"] == "fwd+bwd"], title, lambda r: r["provider"], x,
                   lambda r: None if r["mem_bytes"] is None else r["mem_bytes"] / 2**20)
    written = [H.save_grid(perf, "TFLOP/s", Path(f"{stem}-tflops.png")),
               H.save_grid(mem, "peak extra memory (MiB)", Path(f"{stem}-memory.png"))]
    return [p for p in written if p is not None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    parsed = H.parse_cli(build_parser(), resolve, argv, "flashring bench dense")
    if isinstance(parsed, int):
        return parsed
    args, (shapes, providers, modes), seed = parsed
    run = H.Run(args, args.device, "dense", argv, seed, providers=[p.name for p in providers], modes=modes)
    run.progress.total = len(shapes) * (1 + len(providers) * (1 + len(modes)))
    with H.cpu_threads(args.threads):
        for i, shape in enumerate(shapes):
            base, error = run.inputs(shape, functools.partial(random_inputs, shape, seed + i, args.device),
                                     [p.name for p in providers], modes, steps=1 + len(providers) * (1 + len(modes)))
            if error:
                continue
            run.progress.step(f"{shape.label()} | reference")
            ref = run.reference(base, shape, any(m != "fwd" for m in modes))
            for provider in providers:
                run.run_provider(shape, provider, base, ref, modes)
                H.free_memory(args.device)
    return run.finish(render_table, plot_results)
