"""``flashring bench``: speed, memory and correctness of flashring against PyTorch's attention backends.

Providers: ``flashring`` (``flash_attn_func``), torch SDPA with one backend forced (``sdpa-flash`` = FlashAttention-2,
``sdpa-cudnn``, ``sdpa-efficient``, ``sdpa-math``), ``flex`` (FlexAttention under ``torch.compile``) and ``naive``
(matmul-softmax-matmul in the input dtype). Modes ``fwd``, ``bwd``, ``fwd+bwd``.

GPU default sweep: seqlen 512..16k at 16k tokens per batch, hidden 2048 (nheads = 2048 // headdim), headdim 64/128,
causal and not, bf16. Without CUDA a small fp32 run (seqlen 128/256, batch 1, 2 heads, headdim 64) finishes in
seconds. Every provider is checked once per shape against a high-precision reference before it is timed.

Timing: the forward is a training forward (inputs require grad), so fwd + bwd ~ fwd+bwd; the bwd mode re-runs the
backward of forward graphs built outside the timed region. Inputs rotate among copies when they are small next to
the L2 cache; layout conversions and one-off setup (masks, compilation) happen outside the timed region.

Results: a text table (printed last), one JSON-lines file per run under ``--out`` (metadata line first), and PNG
plots when matplotlib is installed. Exit code 0, or 1 if any correctness check FAILed (timing still completes),
2 for bad arguments or a missing ``--sparse`` / ``--ring`` benchmark module.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _benchutil as bu
from ._masks import flash_bounds
from .reference import attention_ref

MODES = ("fwd", "bwd", "fwd+bwd")
# flash-attn's benchmark convention: the backward does 2.5x the forward's matmul work (dQ, dK, dV, dP plus the
# recomputed S), so fwd+bwd is 3.5x.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DISPATCH = {"--sparse": "flashring.sparse.bench", "--ring": "flashring.ring.bench"}
BASELINES = ("sdpa-flash", "sdpa-cudnn")          # the table's ratio columns
# The reference materialises (slices, S, S) score matrices in fp32/fp64 and autograd keeps ~4 of them; 512 MiB per
# matrix keeps it a few GiB even at seqlen 32k, where a single (batch, head) slice is 4 GiB on its own.
REF_BUDGET_BYTES = 512 * 2**20


def attention_flops(batch: int, seqlen_q: int, seqlen_k: int, nheads: int, headdim: int, causal: bool,
                    mode: str) -> float:
    """FLOPs by flash-attn's convention: forward = two matmuls (QK^T and PV) of 2*Sq*Sk*D each per head, halved
    when causal (exactly 0.5, not (S+1)/2S); backward 2.5x and fwd+bwd 3.5x the forward."""
    if mode not in MODE_FLOP_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    fwd = 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
    return fwd * (0.5 if causal else 1.0) * MODE_FLOP_FACTOR[mode]


@dataclass(frozen=True)
class Shape:
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    causal: bool
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    def config(self) -> dict:
        return {"batch": self.batch, "seqlen_q": self.seqlen, "seqlen_k": self.seqlen, "nheads": self.nheads,
                "nheads_k": self.nheads, "headdim": self.headdim, "causal": self.causal, "dtype": self.dtype_name}

    def label(self) -> str:
        return (f"B={self.batch} S={self.seqlen} H={self.nheads} D={self.headdim} "
                f"{'causal' if self.causal else 'full'} {self.dtype_name}")

    def flops(self, mode: str) -> float:
        return attention_flops(self.batch, self.seqlen, self.seqlen, self.nheads, self.headdim, self.causal, mode)


# ----------------------------------------------------------------------------------------------------- providers
class Unavailable(Exception):
    """The provider cannot run here (missing backend, wrong device); recorded on its rows, never raised further."""


@dataclass(frozen=True)
class Provider:
    name: str
    layout: str      # "bshd" (flash-attn) or "bhsd" (torch SDPA / flex); inputs are converted before timing
    build: Callable[[Shape, torch.device], Callable]  # -> attn(q, k, v) -> out; one-off setup happens here
    context: Callable[[], ContextManager] = contextlib.nullcontext  # wraps the check and the timing


def _build_flashring(shape: Shape, device: torch.device):
    from .interface import flash_attn_func
    return lambda q, k, v: flash_attn_func(q, k, v, causal=shape.causal)


def _sdpa_provider(name: str, backend_name: str) -> Provider:
    def backend():
        try:
            from torch.nn.attention import SDPBackend
        except ImportError:
            return None
        return getattr(SDPBackend, backend_name, None)

    def build(shape: Shape, device: torch.device):
        if backend() is None:
            raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{backend_name}")
        if backend_name == "CUDNN_ATTENTION" and device.type != "cuda":
            raise Unavailable("cuDNN attention needs CUDA")
        # SDPA's is_causal is top-left aligned; the sweep has seqlen_q == seqlen_k, where it equals flash-attn's.
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=shape.causal)

    def context():
        from torch.nn.attention import sdpa_kernel
        return sdpa_kernel(backend())

    return Provider(name, "bhsd", build, context)


_FLEX: Dict[str, Callable] = {}


def _compiled_flex() -> Callable:
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError:
            raise Unavailable(f"torch {torch.__version__} has no flex_attention") from None
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


def _build_flex(shape: Shape, device: torch.device):
    flex = _compiled_flex()
    from torch.nn.attention.flex_attention import create_block_mask
    # Built once per shape, here, outside the timed region.
    block_mask = (create_block_mask(_causal_mod, None, None, shape.seqlen, shape.seqlen, device=str(device))
                  if shape.causal else None)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def _build_naive(shape: Shape, device: torch.device):
    scale = 1.0 / math.sqrt(shape.headdim)
    # (S, S) True above the diagonal = hidden; built once per shape, outside the timed region.
    hidden = (torch.ones(shape.seqlen, shape.seqlen, dtype=torch.bool, device=device).triu(1)
              if shape.causal else None)

    def naive(q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) * scale          # (B, H, S, S) in the input dtype
        if hidden is not None:
            s = s.masked_fill(hidden, float("-inf"))
        return torch.matmul(torch.softmax(s, dim=-1), v)          # (B, H, S, D)

    return naive


PROVIDERS: Dict[str, Provider] = {p.name: p for p in (
    Provider("flashring", "bshd", _build_flashring),
    _sdpa_provider("sdpa-flash", "FLASH_ATTENTION"),
    _sdpa_provider("sdpa-cudnn", "CUDNN_ATTENTION"),
    _sdpa_provider("sdpa-efficient", "EFFICIENT_ATTENTION"),
    _sdpa_provider("sdpa-math", "MATH"),
    Provider("flex", "bhsd", _build_flex),
    Provider("naive", "bhsd", _build_naive),
)}
ALIASES = {"flash": "sdpa-flash", "cudnn": "sdpa-cudnn", "efficient": "sdpa-efficient", "math": "sdpa-math"}


def _to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    # (B, S, H, D) -> (B, H, S, D) materialised, so no provider pays for a strided read inside the timing.
    return t if layout == "bshd" else t.transpose(1, 2).contiguous()


def _from_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bshd" else t.transpose(1, 2)          # (B, H, S, D) -> (B, S, H, D) view


# ----------------------------------------------------------------------------------------------------- correctness
@dataclass
class Reference:
    """High-precision reference on a (batch, head) subset, and the tolerances derived from the low-precision
    reference: err <= 2x (out) / 3x (grads) the same math's error in the input dtype, plus a rounding floor."""
    nb: int
    nh: int
    out: torch.Tensor
    grads: Optional[Tuple[torch.Tensor, ...]]
    tol: Dict[str, float]


def _floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    # The input dtype's rounding error at the values' magnitude (shifted by 0.3, as flash-attn's tests do, so
    # near-zero entries still get a representable step), and never below 1e-5 (fp32).
    r = ref.to(dtype)
    return max(1e-5, 2.0 * ((r + 0.3) - 0.3 - r).abs().max().item())


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.to(ref.dtype) - ref).abs().max().item()       # NaN propagates, and NaN <= tol is False: FAIL


def _subset_sizes(shape: Shape, ref_dtype: torch.dtype) -> Tuple[int, int]:
    per_slice = shape.seqlen * shape.seqlen * torch.finfo(ref_dtype).bits // 8
    n = max(1, REF_BUDGET_BYTES // per_slice)
    nh = min(shape.nheads, n)
    return min(shape.batch, max(1, n // nh)), nh


def make_reference(base: Sequence[torch.Tensor], shape: Shape, need_grads: bool) -> Reference:
    """``base`` = (q, k, v, do) in (B, S, H, D). fp32 reference for fp16/bf16 inputs, fp64 for fp32 inputs (an fp32
    reference of fp32 inputs would measure nothing)."""
    ref_dtype = torch.float64 if shape.dtype == torch.float32 else torch.float32
    nb, nh = _subset_sizes(shape, ref_dtype)
    q, k, v, do = (t[:nb, :, :nh] for t in base)               # heads/batches are independent: exact subset
    lower, upper = flash_bounds(shape.seqlen, shape.seqlen, shape.causal, (-1, -1))

    def run(compute_dtype, leaf_dtype):
        leaves = [t.detach().to(leaf_dtype).requires_grad_(need_grads) for t in (q, k, v)]
        with torch.enable_grad():
            out, _ = attention_ref(*leaves, None, lower, upper, 0.0, dtype=compute_dtype)
            grads = torch.autograd.grad(out, leaves, do.to(leaf_dtype)) if need_grads else None
        return out.detach(), grads

    out_ref, g_ref = run(ref_dtype, ref_dtype)
    out_low, g_low = run(None, shape.dtype)                     # same math in the input dtype
    tol = {"out": 2.0 * _max_err(out_low, out_ref) + _floor(out_ref, shape.dtype)}
    if need_grads:
        for name, gl, gr in zip(("dq", "dk", "dv"), g_low, g_ref):
            tol[name] = 3.0 * _max_err(gl, gr) + _floor(gr, shape.dtype)
    return Reference(nb, nh, out_ref, g_ref, tol)


def compare(ref: Reference, out: torch.Tensor, grads: Optional[Sequence[torch.Tensor]]) -> Dict[str, dict]:
    """{"out"/"dq"/"dk"/"dv": {"err", "tol", "ok"}} for the tensors given, all in (B, S, H, D)."""
    pairs = [("out", out, ref.out)]
    if grads is not None:
        pairs += list(zip(("dq", "dk", "dv"), grads, ref.grads))
    detail = {}
    for name, x, r in pairs:
        err = _max_err(x[:ref.nb, :, :ref.nh], r)
        detail[name] = {"err": err, "tol": ref.tol[name], "ok": bool(err <= ref.tol[name])}
    return detail


# ----------------------------------------------------------------------------------------------------- measuring
def _reason(exc: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    if bu.is_oom(exc):
        return "OOM"
    if isinstance(exc, Unavailable):
        return f"unavailable: {exc}"
    text = (str(exc).strip().splitlines() or [""])[0]
    why = ""
    if "no available kernel" in text.lower():
        # SDPA explains why a forced backend refused only in warnings; keep the first reason it gave.
        why = next((str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()), "")
    return f"{type(exc).__name__}: {text}" + (f" ({why})" if why else "")


def _timed_fn(mode: str, attn: Callable, sets: List[Tuple[torch.Tensor, ...]]) -> Callable[[], object]:
    """The callable that gets timed. Inputs rotate through ``sets`` so repeated calls do not hit warm caches;
    gradients come back from ``torch.autograd.grad``, so nothing accumulates into ``.grad``."""
    turn = itertools.cycle(range(len(sets)))
    if mode == "fwd":                       # training forward: inputs require grad, as in fwd+bwd
        def fn():
            q, k, v, _ = sets[next(turn)]
            return attn(q, k, v)
    elif mode == "fwd+bwd":
        def fn():
            q, k, v, do = sets[next(turn)]
            return torch.autograd.grad(attn(q, k, v), (q, k, v), do)
    else:                                   # bwd: forward graphs built here, outside the timed region
        outs = [attn(q, k, v) for q, k, v, _ in sets]

        def fn():
            i = next(turn)
            q, k, v, do = sets[i]
            return torch.autograd.grad(outs[i], (q, k, v), do, retain_graph=True)
    return fn


def _n_copies(shape: Shape, device: torch.device) -> int:
    # q, k, v, do and out; rotate 3 copies unless one set alone is 4x the L2 cache (then caches cannot help).
    working_set = 5 * shape.batch * shape.seqlen * shape.nheads * shape.headdim * shape.dtype.itemsize
    return 3 if working_set < 4 * bu.l2_bytes(device) else 1


class Bench:
    """Runs the sweep; collects one result dict per (shape, provider, mode) and streams them to the JSONL file."""

    def __init__(self, args, device: torch.device, sink, progress: bu.Progress):
        self.args, self.device, self.sink, self.progress = args, device, sink, progress
        self.results: List[dict] = []

    @staticmethod
    def check_status(detail: Optional[dict]) -> Optional[str]:
        return None if detail is None else ("PASS" if all(d["ok"] for d in detail.values()) else "FAIL")

    def emit(self, row: dict, what: str) -> None:
        """Keep ``row``, append it to the JSONL results file, and say at once which checks failed."""
        self.results.append(row)
        self.sink.write(json.dumps(row) + "\n")
        self.sink.flush()
        if row["check"] == "FAIL":
            worst = ", ".join(f"{k} err {d['err']:.3g} > tol {d['tol']:.3g}"
                              for k, d in row["check_detail"].items() if not d["ok"])
            self.progress.message(f"!!! FAIL {what}: {worst}")

    def record(self, shape: Shape, provider: str, mode: str, ms=None, mem=None, detail=None, error=None) -> None:
        row = {"type": "result", "config": shape.config(), "provider": provider, "mode": mode,
               "ms": ms, "tflops": shape.flops(mode) / (ms * 1e-3) / 1e12 if ms else None,
               "flops": shape.flops(mode), "mem_bytes": mem, "check": self.check_status(detail),
               "check_detail": detail, "error": error}
        self.emit(row, f"{provider} {mode} [{shape.label()}]")

    def run_shape(self, shape: Shape, seed: int, providers: Sequence[Provider], modes: Sequence[str]) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        # (B, S, H, D) each: q, k, v, do; standard normal, never zeros.
        base = [torch.randn(shape.batch, shape.seqlen, shape.nheads, shape.headdim, generator=gen,
                            device=self.device, dtype=shape.dtype) for _ in range(4)]
        need_grads = any(m != "fwd" for m in modes)
        self.progress.step(f"{shape.label()} | reference")
        try:
            ref, ref_error = make_reference(base, shape, need_grads), None
        except Exception as exc:               # the checks become n/a; timing still runs
            ref, ref_error = None, f"reference: {_reason(exc)}"
        if ref_error:
            bu.free_memory(self.device)
            self.progress.message(f"reference failed for [{shape.label()}]: {ref_error}; checks skipped")
        for provider in providers:
            self.run_provider(shape, provider, base, ref, modes)
            bu.free_memory(self.device)

    def run_provider(self, shape, provider: Provider, base, ref: Optional[Reference], modes) -> None:
        label = f"{shape.label()} | {provider.name}"
        need_grads = any(m != "fwd" for m in modes)
        sets, error, checks = [], None, {}
        self.progress.step(f"{label} check")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with provider.context():
                    attn = provider.build(shape, self.device)
                    sets = [tuple(_to_layout(t, provider.layout).clone().requires_grad_(i < 3 and need_grads)
                                  for i, t in enumerate(base)) for _ in range(_n_copies(shape, self.device))]
                    checks = self.check(provider, attn, sets[0], ref, need_grads)
            except Exception as exc:
                error = _reason(exc, caught)
        if error:
            sets = []
            bu.free_memory(self.device)
            for mode in modes:
                self.progress.step(f"{label} {mode} skipped")
                self.record(shape, provider.name, mode, error=error)
            return
        for mode in modes:
            self.progress.step(f"{label} {mode}")
            detail = checks.get("fwd" if mode == "fwd" else "bwd")
            if isinstance(detail, str):          # the backward failed in the check: it would fail here too
                self.record(shape, provider.name, mode, error=detail)
                continue
            ms = mem = err = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    with provider.context():
                        fn = _timed_fn(mode, attn, sets)
                        ms = bu.time_ms(fn, self.device, self.args.repeats, self.args.rep_ms, self.args.warmup_ms)
                        mem = bu.peak_extra_bytes(fn, self.device)
                except Exception as exc:
                    err = _reason(exc)
                fn = None
            if err:
                bu.free_memory(self.device)
            self.record(shape, provider.name, mode, ms=ms if not err else None, mem=mem if not err else None,
                        detail=detail, error=err)

    def check(self, provider: Provider, attn, inputs, ref: Optional[Reference], need_grads: bool) -> dict:
        """Once per shape, before timing: {"fwd": detail, "bwd": detail} (detail None when there is no
        reference; a string when the backward could not run although the forward did)."""
        if ref is None:
            return {}
        q, k, v, do = inputs
        out = attn(q, k, v)
        result = {"fwd": compare(ref, _from_layout(out.detach(), provider.layout), None)}
        if need_grads:
            try:
                grads = torch.autograd.grad(out, (q, k, v), do)
                result["bwd"] = compare(ref, _from_layout(out.detach(), provider.layout),
                                        [_from_layout(g, provider.layout) for g in grads])
            except Exception as exc:           # e.g. OOM in the backward only: the fwd rows are still timed
                result["bwd"] = f"backward: {_reason(exc)}"
        return result


# ----------------------------------------------------------------------------------------------------- CLI
def _csv(kind: Callable, choices: Optional[Sequence[str]] = None):
    def parse(text: str):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if choices is not None:
            bad = [s for s in items if s not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        try:
            return [kind(s) for s in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise ValueError(f"{text} is not a positive integer")
    return n


def _seqlen(text: str) -> int:
    # Accepts 512, 1k, 16k.
    return _positive(text[:-1]) * 1024 if text.lower().endswith("k") else _positive(text)


def _headdim(text: str) -> int:
    d = _positive(text)
    if d > 256:
        raise ValueError(f"headdim {d} > 256 is not supported by flashring")
    return d


def build_parser() -> argparse.ArgumentParser:
    names = list(PROVIDERS) + list(ALIASES)
    p = argparse.ArgumentParser(
        prog="flashring bench", description=__doc__.split("\n\n")[0],
        epilog="flashring bench --sparse [...] / --ring [...] run the sparse / ring benchmarks instead.")
    p.add_argument("--seqlens", type=_csv(_seqlen), help="e.g. 512,1k,4k (GPU default 512..16k; CPU 128,256)")
    p.add_argument("--seqlen-32k", action="store_true", help="add seqlen 32k to the default sweep")
    p.add_argument("--headdims", type=_csv(_headdim), help="GPU default 64,128; CPU 64")
    p.add_argument("--hdim256", action="store_true", help="add headdim 256 to the default sweep")
    p.add_argument("--batch", type=_positive, help="default: 16384 tokens // seqlen on GPU, 1 on CPU")
    p.add_argument("--nheads", type=_positive, help="default: hidden 2048 // headdim on GPU, 2 on CPU")
    p.add_argument("--providers", type=_csv(str, names),
                   help=f"from {', '.join(names)} (GPU default: all; CPU: flashring,sdpa-math,naive)")
    p.add_argument("--modes", type=_csv(str, MODES), help="fwd,bwd,fwd+bwd (default all)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--dtype", type=_csv(str, list(DTYPES)), help="GPU default bf16; CPU fp32")
    p.add_argument("--fp16", action="store_true", help="add fp16 to the default dtype(s)")
    p.add_argument("--repeats", type=_positive,
                   help="CPU: at least this many timed calls per row, median taken (default 3; 2 with --quick)")
    p.add_argument("--rep-ms", type=_positive, default=100, help="CUDA: do_bench measurement time per row (ms)")
    p.add_argument("--warmup-ms", type=_positive, default=25, help="CUDA: do_bench warm-up time per row (ms)")
    p.add_argument("--quick", action="store_true",
                   help="small sweep (GPU: seqlen 1k,4k, headdim 128, flashring/sdpa-flash/sdpa-cudnn; "
                        "CPU: seqlen 128)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--threads", type=_positive, help="CPU: torch intra-op threads for the run (default 1)")
    p.add_argument("--seed", type=int, help="input seed (default: $FLASHRING_SEED, else random; always recorded)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results directory")
    p.add_argument("--no-plot", action="store_true", help="do not write PNG plots")
    p.add_argument("--json-only", action="store_true", help="write only the JSONL results (no plots, no table)")
    return p


def resolve(args) -> Tuple[torch.device, List[Shape], List[Provider], List[str]]:
    """Fill the defaults that depend on the device and --quick; returns device, shapes, providers, modes."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but CUDA is not available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
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
    modes = [m for m in MODES if m in (args.modes or MODES)]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.threads is None and not gpu:
        # The CPU shapes are tiny (128 x 64 per head): intra-op threads add barrier waits, and one barrier preempted
        # on a busy 2-core CI box read 30-60 ms for a 0.3 ms call in our runs. One thread gives stable numbers.
        args.threads = 1
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    shapes = []
    for dtype, headdim, causal, seqlen in itertools.product(dtypes, headdims, causals, sorted(set(seqlens))):
        batch = args.batch or (max(1, 16384 // seqlen) if gpu else 1)
        nheads = args.nheads or (max(1, 2048 // headdim) if gpu else 2)
        shapes.append(Shape(batch, seqlen, nheads, headdim, causal, DTYPES[dtype]))
    return device, shapes, [PROVIDERS[p] for p in providers], modes


def render_table(results: List[dict]) -> str:
    """Per shape, one row per (provider, mode); ratios are baseline ms / ms (>1 = faster than the baseline)."""
    headers = ["provider", "mode", "ms", "TFLOP/s", "vs flash", "vs cudnn", "mem", "check"]
    rows: List[object] = []
    by_shape: Dict[str, List[dict]] = {}
    for r in results:
        by_shape.setdefault(json.dumps(r["config"], sort_keys=True), []).append(r)
    for group in by_shape.values():
        c = group[0]["config"]
        rows.append(f"== B={c['batch']} S={c['seqlen_q']} H={c['nheads']} D={c['headdim']} "
                    f"{'causal' if c['causal'] else 'full'} {c['dtype']}")
        base_ms = {(r["provider"], r["mode"]): r["ms"] for r in group if r["provider"] in BASELINES}
        for r in group:
            ratios = []
            for b in BASELINES:
                bms = base_ms.get((b, r["mode"]))
                ratios.append(f"{bms / r['ms']:.2f}x" if bms and r["ms"] else "-")
            status = r["check"] or "n/a"
            if r["error"]:
                status = r["error"] if len(r["error"]) <= 48 else r["error"][:45] + "..."
            elif status == "FAIL":
                status = "FAIL <<<"
            rows.append([r["provider"], r["mode"], bu.fmt_num(r["ms"], 4), bu.fmt_num(r["tflops"]), *ratios,
                         bu.fmt_bytes(r["mem_bytes"]), status])
    return bu.format_table(headers, rows, align="llrrrrrl")


def _dispatch(flag: str, module_name: str, rest: List[str]) -> int:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"flashring bench {flag}: the benchmark module {module_name} is not available in this installation "
              f"({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


def parse_cli(parser, resolve, argv, prog):
    """argparse + ``resolve(args)``: ``(args, resolved, seed)``, or an exit code (--help: 0, usage error: 2).
    The seed is --seed, else FLASHRING_SEED, else fresh; it is recorded so any run can be replayed."""
    try:
        args = parser.parse_args(argv)
        resolved = resolve(args)
    except SystemExit as exc:              # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))
    return args, resolved, seed


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, module_name in DISPATCH.items():
        if flag in argv:
            return _dispatch(flag, module_name, [a for a in argv if a != flag])
    parsed = parse_cli(build_parser(), resolve, argv, "flashring bench")
    if isinstance(parsed, int):
        return parsed
    args, (device, shapes, providers, modes), seed = parsed

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"bench-{stamp}-{device.type}-{os.getpid()}.jsonl"
    threads = torch.get_num_threads()
    progress = bu.Progress(len(shapes) * (1 + len(providers) * (1 + len(modes))))
    t0 = time.perf_counter()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        meta = dict(bu.run_metadata(device, ["flashring", "bench", *argv]), seed=seed,
                    providers=[p.name for p in providers], modes=modes)
        with open(path, "w") as sink:
            sink.write(json.dumps(meta) + "\n")
            bench = Bench(args, device, sink, progress)
            for i, shape in enumerate(shapes):
                bench.run_shape(shape, seed + i, providers, modes)
    finally:
        torch.set_num_threads(threads)
        progress.close()

    header = (f"flashring bench on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, seed {seed}, "
              f"{time.perf_counter() - t0:.1f} s)")
    return report(bench.results, args, path, seed, [header], render_table, bu.plot_results,
                  ("provider", "mode", "config"))


def report(results, args, path, seed, header_lines, render, plot, row_keys) -> int:
    """Shared end of a bench run: header + table (unless --json-only), plots (unless --no-plot), the results
    path, and a loud list of rows that FAILED their correctness check. Returns the exit code (1 on any FAIL)."""
    if not args.json_only:
        for line in header_lines:
            print(line)
        print(render(results))
    plots = [] if (args.no_plot or args.json_only) else plot(results, path.with_suffix(""))
    print(f"results: {path}" + "".join(f"\nplot: {p}" for p in plots))
    fails = [r for r in results if r["check"] == "FAIL"]
    if fails:
        print(f"\n!!! {len(fails)} row(s) FAILED the correctness check (seed {seed}):", file=sys.stderr)
        for r in fails:
            bad = {k: d for k, d in r["check_detail"].items() if not d["ok"]}
            print("!!!   " + " ".join(str(r[k]) for k in row_keys) + f": {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
