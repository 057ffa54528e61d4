"""``flashring bench --sparse``: dynamic sparse flash attention against dense causal attention.

The benchmark of Pagliardini, Paliotta, Jaggi, Fleuret (2023), "Faster Causal Attention Over Large Sequences
Through Sparse Flash Attention": speedup of the sparse kernels over dense causal flash attention vs seqlen, one
curve per sparsity level, for
- QK-sparse: queries and keys dropped at random per (batch, head, token), q and k at the same rate (default drop
  rates 0.2, 0.5, 0.8);
- hash-sparse: query i attends key j <= i only if they share a bucket (default 2, 8, 32, 64 buckets), buckets from
  ``lsh_buckets`` on q and k with one shared rotation per head (``--random-buckets``: uniform random ids).

Providers: flashring sparse (``qk_sparse_attn_func`` / ``hash_sparse_attn_func``: their compaction / sorting runs
inside the timed region; LSH hashing is timed on its own, ``lsh ms``), flashring dense causal (``flash_attn_func``),
torch SDPA with the flash backend (causal), and FlexAttention under ``torch.compile`` with the equivalent BlockMask
(``create_block_mask``, itself compiled, timed on its own as ``mask ms``; ``flex+mask`` adds both).

"ideal" = dense causal flashring time x the fraction of causal (i, j) pairs that survive, counted exactly from the
masks; ``vs ideal`` = ms / ideal (target <= 1.25 at seqlen >= 8k); ``vs dense`` = dense flashring ms / ms.

GPU default: bf16, causal, seqlen 1k..16k (``--seqlen-32k`` adds 32k) at 16k tokens per batch (batch 1 from 16k
on), nheads = 2048 // headdim, headdim 64 (``--headdims 128``). Without CUDA a small fp32 run (seqlen 128/256,
batch 1, 2 heads, flashring sparse vs dense) finishes in seconds. Every provider is checked once per configuration,
before timing, against a high-precision dense reference with the equivalent boolean mask on a (batch, head) subset.

Results: the table (printed last), a JSON-lines file under ``--out`` (metadata line first) and PNG plots (speedup
and ratio to ideal vs seqlen) when matplotlib is installed. Exit 0, 1 if a check FAILed, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _benchutil as bu
from .. import bench as dense_bench
from .._masks import flash_bounds
from ..reference import attention_ref
from . import hash_sparse_attn_func, lsh_buckets, lsh_rotations, qk_sparse_attn_func

PATTERNS = ("qk", "hash")
MODES = ("fwd", "fwd+bwd", "bwd")
DEFAULT_QK_DROPS = (0.2, 0.5, 0.8)
DEFAULT_HASH_BUCKETS = (2, 8, 32, 64)
DEFAULT_TOKENS = 16384                 # batch * seqlen, as in the paper's and flash-attn's benchmarks
DEFAULT_HIDDEN = 2048                  # nheads = hidden // headdim
IDEAL_TARGET, IDEAL_TARGET_SEQLEN = 1.25, 8192


@dataclass(frozen=True)
class Pattern:
    kind: str                          # "dense", "qk" or "hash"
    param: Optional[float] = None      # qk: drop rate; hash: number of buckets

    def label(self) -> str:
        if self.kind == "qk":
            return f"qk drop={self.param:g}"
        return f"hash nb={self.param}" if self.kind == "hash" else "dense"


DENSE = Pattern("dense")


# ----------------------------------------------------------------------------------------------------- masks
def qk_keep_masks(batch: int, seqlen: int, nheads: int, drop: float, gen: torch.Generator,
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Bool (B, S, H) keep masks for q and k: each token dropped independently per (batch, head) with prob. drop."""
    q_keep = torch.rand(batch, seqlen, nheads, generator=gen, device=device) >= drop
    k_keep = torch.rand(batch, seqlen, nheads, generator=gen, device=device) >= drop
    return q_keep, k_keep


def hash_bucket_fn(q: torch.Tensor, k: torch.Tensor, n_buckets: int, random_ids: bool, seed: int,
                   gen: torch.Generator) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """A callable giving int64 (B, S, H) bucket ids for q and k: LSH with one rotation per head shared by q and k
    (so that similar q and k collide), or uniform random ids. A callable, so the hashing can be timed on its own."""
    if random_ids:
        ids = tuple(torch.randint(0, n_buckets, q.shape[:3], generator=gen, device=q.device) for _ in range(2))
        return lambda: ids
    rotations = lsh_rotations(q.shape[2], q.shape[3], n_buckets, torch.Generator().manual_seed(seed),
                              device=q.device)
    return lambda: (lsh_buckets(q, n_buckets, rotations), lsh_buckets(k, n_buckets, rotations))


def surviving_fraction(kind: str, q_side: torch.Tensor, k_side: torch.Tensor) -> float:
    """Exact fraction of the causal pairs (j <= i), over all (batch, head), that the pattern keeps.

    ``q_side``/``k_side`` (B, S, H): keep masks (qk) or bucket ids (hash). Counted in int64 without materialising
    (S, S): qk keeps sum_i keep_q[i] * #{kept keys j <= i}; hash keeps sum_i #{j <= i : bk[j] == bq[i]}, i.e. per
    bucket c, sum_i [bq[i] == c] * (running count of keys in c up to i).
    """
    b, s, h = q_side.shape
    total = b * h * s * (s + 1) // 2
    if kind == "qk":
        pairs = (k_side.cumsum(1, dtype=torch.int64) * q_side).sum()
    elif kind == "hash":
        pairs = sum(((k_side == c).cumsum(1, dtype=torch.int64) * (q_side == c)).sum()
                    for c in torch.unique(q_side).tolist())
    else:
        raise ValueError(f"kind must be 'qk' or 'hash', got {kind!r}")
    return int(pairs) / total


def pair_mask(kind: str, q_side: torch.Tensor, k_side: torch.Tensor) -> torch.Tensor:
    """(B, S, H) sides -> (B, H, S, S) bool: True where the pattern (without causality) lets query i see key j."""
    qs, ks = q_side.transpose(1, 2), k_side.transpose(1, 2)               # (B, H, S)
    if kind == "qk":
        return qs[..., :, None] & ks[..., None, :]
    return qs[..., :, None] == ks[..., None, :]


def flex_tables(kind: str, q_side: torch.Tensor, k_side: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H) sides -> int32 (B, H, S) per-token ids read by one mask_mod for both patterns: i sees j iff
    ``bq[i] == bk[j] and j <= i``. Hash: the bucket ids. QK: kept tokens get id 0, dropped queries -1, dropped keys
    -2, so ``bq[i] == bk[j]`` <=> ``keep_q[i] and keep_k[j]``. One mask_mod = one compile per shape, not two."""
    if kind == "qk":
        q_side, k_side = torch.where(q_side, 0, -1), torch.where(k_side, 0, -2)
    return tuple(t.transpose(1, 2).to(torch.int32).contiguous() for t in (q_side, k_side))


# ----------------------------------------------------------------------------------------------------- reference
def masked_reference(base: Sequence[torch.Tensor], shape: dense_bench.Shape,
                     visible: Optional[Callable[[int, int], torch.Tensor]], need_grads: bool) -> dense_bench.Reference:
    """``dense_bench.make_reference`` with an extra (nb, nh, S, S) visibility mask on the (batch, head) subset:
    ``visible(nb, nh)`` (None = dense). Same subset sizes, reference dtype and tolerance rule (2x / 3x the error of
    the same masked math in the input dtype, plus the rounding floor)."""
    ref_dtype = torch.float64 if shape.dtype == torch.float32 else torch.float32
    nb, nh = dense_bench._subset_sizes(shape, ref_dtype)
    q, k, v, do = (t[:nb, :, :nh] for t in base)           # (batch, head) slices are independent: exact subset
    mask = None if visible is None else visible(nb, nh)
    lower, upper = flash_bounds(shape.seqlen, shape.seqlen, shape.causal, (-1, -1))

    def run(compute_dtype, leaf_dtype):
        leaves = [t.detach().to(leaf_dtype).requires_grad_(need_grads) for t in (q, k, v)]
        with torch.enable_grad():
            out, _ = attention_ref(*leaves, None, lower, upper, 0.0, mask=mask, dtype=compute_dtype)
            grads = torch.autograd.grad(out, leaves, do.to(leaf_dtype)) if need_grads else None
        return out.detach(), grads

    out_ref, g_ref = run(ref_dtype, ref_dtype)
    out_low, g_low = run(None, shape.dtype)
    tol = {"out": 2.0 * dense_bench._max_err(out_low, out_ref) + dense_bench._floor(out_ref, shape.dtype)}
    if need_grads:
        for name, gl, gr in zip(("dq", "dk", "dv"), g_low, g_ref):
            tol[name] = 3.0 * dense_bench._max_err(gl, gr) + dense_bench._floor(gr, shape.dtype)
    return dense_bench.Reference(nb, nh, out_ref, g_ref, tol)


# ----------------------------------------------------------------------------------------------------- flex
_CBM: Dict[str, Callable] = {}


def _compiled_block_mask() -> Callable:
    # Eager create_block_mask materialises the full (B, H, S, S) mask: 8 GiB at 32 heads x 16k^2; compiled it fuses
    # the mask_mod into the block reduction. dynamic=False as for flex itself (one compile per shape).
    if "fn" not in _CBM:
        from torch.nn.attention.flex_attention import create_block_mask
        _CBM["fn"] = torch.compile(create_block_mask, dynamic=False)
    return _CBM["fn"]


class _FlexMask:
    """Per-shape int32 (B, H, S) tables and the mask_mod reading them. New patterns of the same shape are copied
    into the same tensors, so the compiled mask_mod (and flex's kernels) are reused rather than recompiled."""

    def __init__(self, shape: dense_bench.Shape, device: torch.device):
        self.shape = shape
        self.bq = torch.empty(shape.batch, shape.nheads, shape.seqlen, dtype=torch.int32, device=device)
        self.bk = torch.empty_like(self.bq)
        bq, bk = self.bq, self.bk

        def mask_mod(b, h, q_idx, kv_idx):
            return (bq[b, h, q_idx] == bk[b, h, kv_idx]) & (kv_idx <= q_idx)

        self.mask_mod = mask_mod

    def block_mask(self):
        s = self.shape
        return _compiled_block_mask()(self.mask_mod, s.batch, s.nheads, s.seqlen, s.seqlen, device=self.bq.device)


# ----------------------------------------------------------------------------------------------------- bench
class SparseBench(dense_bench.Bench):
    """The dense bench's check-then-time machinery (``run_provider``), with rows tagged by pattern and compared with
    dense flashring and the ideal time."""

    def __init__(self, args, device: torch.device, sink, progress: bu.Progress, use_sdpa: bool, use_flex: bool):
        super().__init__(args, device, sink, progress)
        self.dense_providers = [dense_bench.PROVIDERS["flashring"]]
        if use_sdpa:
            self.dense_providers.append(dense_bench.PROVIDERS["sdpa-flash"])
        self.use_flex = use_flex
        self.pattern, self.extra, self.dense_ms = DENSE, {}, {}
        self._flex: Optional[_FlexMask] = None

    def steps_per_shape(self, n_patterns: int, n_modes: int) -> int:
        sparse_providers = 1 + int(self.use_flex)
        return 1 + len(self.dense_providers) * (1 + n_modes) + n_patterns * (1 + sparse_providers * (1 + n_modes))

    def record(self, shape, provider, mode, ms=None, mem=None, detail=None, error=None) -> None:
        check = self.check_status(detail)
        if self.pattern is DENSE and provider == "flashring":
            self.dense_ms[mode] = ms
        survive = self.extra.get("survive", 1.0 if self.pattern is DENSE else None)   # None: masks failed
        dense = self.dense_ms.get(mode)
        ideal = dense * survive if dense and survive is not None else None
        row = {"type": "result", "config": shape.config(), "pattern": self.pattern.kind, "param": self.pattern.param,
               "provider": provider, "mode": mode, "ms": ms, "survive": survive, "dense_ms": dense,
               "ideal_ms": ideal, "ratio_ideal": ms / ideal if ms and ideal else None,
               "speedup": dense / ms if ms and dense else None,
               # useful work only: the causal FLOPs of the surviving pairs
               "tflops": shape.flops(mode) * survive / (ms * 1e-3) / 1e12 if ms and survive is not None else None,
               "mem_bytes": mem, "check": check, "check_detail": detail, "error": error,
               **{k: v for k, v in self.extra.items() if k != "survive"}}
        if provider != "flex":
            row.pop("mask_ms", None)
        elif ms and row.get("mask_ms"):
            row["ms_with_mask"] = ms + row["mask_ms"]          # a mask built per call (new data) pays both
        self.emit(row, f"{provider} {self.pattern.label()} {mode} [{shape.label()}]")

    def _reference(self, base, shape, visible, need_grads) -> Optional[dense_bench.Reference]:
        try:
            return masked_reference(base, shape, visible, need_grads)
        except Exception as exc:            # the checks become n/a; timing still runs
            bu.free_memory(self.device)
            self.progress.message(f"reference failed for [{shape.label()} {self.pattern.label()}]: "
                                  f"{dense_bench._reason(exc)}; checks skipped")
            return None

    def run_shape(self, shape: dense_bench.Shape, seed: int, patterns: Sequence[Pattern], modes: Sequence[str],
                  random_buckets: bool) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        # (B, S, H, D) each: q, k, v, do; standard normal, never zeros.
        base = [torch.randn(shape.batch, shape.seqlen, shape.nheads, shape.headdim, generator=gen,
                            device=self.device, dtype=shape.dtype) for _ in range(4)]
        need_grads = any(m != "fwd" for m in modes)
        self.pattern, self.extra, self.dense_ms = DENSE, {}, {}
        self.progress.step(f"{shape.label()} | dense reference")
        ref = self._reference(base, shape, None, need_grads)
        for provider in self.dense_providers:
            self.run_provider(shape, provider, base, ref, modes)
            bu.free_memory(self.device)
        for pattern in patterns:
            self.pattern, self.extra = pattern, {}
            self.progress.step(f"{shape.label()} | {pattern.label()} masks + reference")
            try:
                q_side, k_side = self._pattern_sides(pattern, base, seed, gen, random_buckets)
            except Exception as exc:       # e.g. OOM while hashing: error rows for this pattern, sweep goes on
                bu.free_memory(self.device)
                self._skip_pattern(shape, modes, dense_bench._reason(exc))
                continue
            ref = self._reference(base, shape, lambda nb, nh: pair_mask(pattern.kind, q_side[:nb, :, :nh],
                                                                         k_side[:nb, :, :nh]), need_grads)
            self.run_provider(shape, self._sparse_provider(pattern.kind, q_side, k_side), base, ref, modes)
            bu.free_memory(self.device)
            if self.use_flex:
                self.extra["mask_ms"] = None
                self.run_provider(shape, self._flex_provider(pattern.kind, q_side, k_side), base, ref, modes)
                bu.free_memory(self.device)
        self._flex = None

    def _pattern_sides(self, pattern: Pattern, base, seed: int, gen: torch.Generator, random_buckets: bool):
        """(q_side, k_side) of the pattern, (B, S, H) each; fills self.extra (survive, lsh_ms, buckets)."""
        b, s, h = base[0].shape[:3]
        if pattern.kind == "qk":
            q_side, k_side = qk_keep_masks(b, s, h, pattern.param, gen, self.device)
        else:
            hash_fn = hash_bucket_fn(base[0], base[1], pattern.param, random_buckets, seed, gen)
            q_side, k_side = hash_fn()
            self.extra["buckets"] = "random" if random_buckets else "lsh"
            if not random_buckets:
                self.extra["lsh_ms"] = bu.time_ms(hash_fn, self.device, self.args.repeats, self.args.rep_ms,
                                                  self.args.warmup_ms)
        self.extra["survive"] = surviving_fraction(pattern.kind, q_side, k_side)
        return q_side, k_side

    def _skip_pattern(self, shape, modes, error: str) -> None:
        for provider in ["flashring"] + (["flex"] if self.use_flex else []):
            for i in range(1 + len(modes)):                 # keep the progress count: check + modes
                self.progress.step(f"{shape.label()} | {self.pattern.label()} {provider} skipped")
            for mode in modes:
                self.record(shape, provider, mode, error=error)

    @staticmethod
    def _sparse_provider(kind: str, q_side: torch.Tensor, k_side: torch.Tensor) -> dense_bench.Provider:
        fn = qk_sparse_attn_func if kind == "qk" else hash_sparse_attn_func
        return dense_bench.Provider("flashring", "bshd",
                                    lambda shape, device: (lambda q, k, v: fn(q, k, v, q_side, k_side, causal=True)))

    def _flex_provider(self, kind: str, q_side: torch.Tensor, k_side: torch.Tensor) -> dense_bench.Provider:
        def build(shape, device):
            flex = dense_bench._compiled_flex()       # raises Unavailable without flex_attention
            if self._flex is None or self._flex.shape != shape:
                self._flex = _FlexMask(shape, device)
            for buf, table in zip((self._flex.bq, self._flex.bk), flex_tables(kind, q_side, k_side)):
                buf.copy_(table)
            self.extra["mask_ms"] = bu.time_ms(self._flex.block_mask, device, self.args.repeats, self.args.rep_ms,
                                               self.args.warmup_ms)
            block_mask = self._flex.block_mask()
            return lambda q, k, v: flex(q, k, v, block_mask=block_mask)

        return dense_bench.Provider("flex", "bhsd", build)


# ----------------------------------------------------------------------------------------------------- CLI
def _drop_rate(text: str) -> float:
    x = float(text)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"drop rate {text} is not in [0, 1)")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashring bench --sparse", description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=dense_bench._csv(dense_bench._seqlen),
                   help="e.g. 1k,4k (GPU default 1k,2k,4k,8k,16k; CPU 128,256)")
    p.add_argument("--seqlen-32k", action="store_true", help="add seqlen 32k (batch 1) to the sweep")
    p.add_argument("--headdims", type=dense_bench._csv(dense_bench._headdim), help="default 64 (e.g. 64,128)")
    p.add_argument("--tokens", type=dense_bench._positive, default=DEFAULT_TOKENS,
                   help=f"GPU: batch = max(1, tokens // seqlen) (default {DEFAULT_TOKENS})")
    p.add_argument("--batch", type=dense_bench._positive, help="fixed batch (overrides --tokens; CPU default 1)")
    p.add_argument("--nheads", type=dense_bench._positive,
                   help=f"default: {DEFAULT_HIDDEN} // headdim on GPU, 2 on CPU")
    p.add_argument("--patterns", type=dense_bench._csv(str, PATTERNS), help="qk,hash (default both)")
    p.add_argument("--qk-drop", type=dense_bench._csv(_drop_rate),
                   help="QK-sparse drop rates for q and k (default 0.2,0.5,0.8)")
    p.add_argument("--hash-buckets", type=dense_bench._csv(dense_bench._positive),
                   help="hash-sparse bucket counts (default 2,8,32,64; even for LSH)")
    p.add_argument("--random-buckets", action="store_true",
                   help="uniform random bucket ids instead of LSH buckets of q and k")
    p.add_argument("--modes", type=dense_bench._csv(str, MODES), help="fwd,fwd+bwd (default); bwd also possible")
    p.add_argument("--dtype", choices=list(dense_bench.DTYPES), help="GPU default bf16; CPU fp32")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves one compile per shape)")
    p.add_argument("--no-sdpa", action="store_true", help="skip the dense SDPA flash baseline")
    p.add_argument("--repeats", type=dense_bench._positive,
                   help="CPU: at least this many timed calls per row (default 3; 2 with --quick)")
    p.add_argument("--rep-ms", type=dense_bench._positive, default=100, help="CUDA: do_bench time per row (ms)")
    p.add_argument("--warmup-ms", type=dense_bench._positive, default=25, help="CUDA: do_bench warm-up per row (ms)")
    p.add_argument("--quick", action="store_true",
                   help="sanity run (GPU: seqlen 4k,8k; CPU: 128), qk drop 0.5, hash 8 buckets")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--threads", type=dense_bench._positive, help="CPU: torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, help="input seed (default: $FLASHRING_SEED, else random; always recorded)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results directory")
    p.add_argument("--no-plot", action="store_true", help="do not write PNG plots")
    p.add_argument("--json-only", action="store_true", help="write only the JSONL results (no plots, no table)")
    return p


def resolve(args) -> Tuple[torch.device, List[dense_bench.Shape], List[Pattern], List[str]]:
    """Device-dependent defaults; returns device, shapes, patterns, modes (ValueError on a bad combination)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but CUDA is not available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if gpu:
        seqlens = [4096, 8192] if args.quick else [1024, 2048, 4096, 8192, 16384]
    else:
        seqlens = [128] if args.quick else [128, 256]
    seqlens = sorted(set((args.seqlens or seqlens) + ([32768] if args.seqlen_32k else [])))
    headdims = args.headdims or [64]
    dtype = dense_bench.DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    drops = args.qk_drop or ([0.5] if args.quick else list(DEFAULT_QK_DROPS))
    buckets = args.hash_buckets or ([8] if args.quick else list(DEFAULT_HASH_BUCKETS))
    if not args.random_buckets:
        odd = [n for n in buckets if n < 2 or n % 2]
        if odd:
            raise ValueError(f"--hash-buckets {odd}: LSH needs an even count >= 2 (or use --random-buckets)")
    kinds = args.patterns or list(PATTERNS)
    patterns = ([Pattern("qk", d) for d in dict.fromkeys(drops)] if "qk" in kinds else []) + \
               ([Pattern("hash", n) for n in dict.fromkeys(buckets)] if "hash" in kinds else [])
    modes = [m for m in MODES if m in (args.modes or ("fwd", "fwd+bwd"))]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.threads is None and not gpu:
        args.threads = 1                   # tiny CPU shapes: one thread gives stable numbers (see flashring bench)
    shapes = []
    for headdim, seqlen in itertools.product(headdims, seqlens):
        batch = args.batch or (max(1, args.tokens // seqlen) if gpu else 1)
        nheads = args.nheads or (max(1, DEFAULT_HIDDEN // headdim) if gpu else 2)
        shapes.append(dense_bench.Shape(batch, seqlen, nheads, headdim, True, dtype))
    return device, shapes, patterns, modes


# ----------------------------------------------------------------------------------------------------- output
def _status(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    if r["error"]:
        return r["error"] if len(r["error"]) <= 40 else r["error"][:37] + "..."
    return "FAIL <<<" if r["check"] == "FAIL" else (r["check"] or "n/a")


def _x(v: Optional[float]) -> str:
    return f"{v:.2f}x" if v else "-"


def render_table(results: List[dict]) -> str:
    """One section per (mode, headdim, nheads, dtype); one row per (seqlen, pattern, param). Sparse rows carry the
    flex columns of the same pattern; the dense SDPA row's ``vs dense`` is its speedup over dense flashring."""
    headers = ["seqlen", "B", "pattern", "param", "keep", "ms", "vs dense", "vs ideal", "lsh ms", "flex ms",
               "mask ms", "flex+mask", "flex vs dense", "check", "flex check"]
    rows: List[object] = []
    sections: Dict[tuple, List[dict]] = {}
    for r in results:
        c = r["config"]
        sections.setdefault((r["mode"], c["headdim"], c["nheads"], c["dtype"]), []).append(r)
    for (mode, headdim, nheads, dtype), group in sorted(sections.items(), key=lambda kv: (MODES.index(kv[0][0]),
                                                                                       kv[0][1])):
        rows.append(f"== {mode}  H={nheads} D={headdim} causal {dtype}")
        flex = {(r["config"]["seqlen_q"], r["pattern"], r["param"]): r for r in group if r["provider"] == "flex"}
        for r in group:
            if r["provider"] == "flex":
                continue
            c, f = r["config"], flex.get((r["config"]["seqlen_q"], r["pattern"], r["param"]))
            dense = r["pattern"] == "dense"
            param = r["provider"] if dense else (f"drop {r['param']:g}" if r["pattern"] == "qk" else
                                                 f"{r['param']} {r.get('buckets', '')}".strip())
            flex_ms = f["ms"] if f else None
            keep = "-" if r["survive"] is None else f"{100 * r['survive']:.1f}%"
            both = flex_ms + f["mask_ms"] if flex_ms and f.get("mask_ms") else None
            rows.append([c["seqlen_q"], c["batch"], r["pattern"], param, keep,
                         bu.fmt_num(r["ms"], 4), _x(r["speedup"]), "-" if dense else bu.fmt_num(r["ratio_ideal"]),
                         bu.fmt_num(r.get("lsh_ms"), 3), bu.fmt_num(flex_ms, 4),
                         bu.fmt_num(f.get("mask_ms") if f else None, 3), bu.fmt_num(both, 4),
                         _x(r["dense_ms"] / flex_ms if flex_ms and r["dense_ms"] else None),
                         _status(r), _status(f) if not dense else ""])
    align = "rrll" + "r" * 9 + "ll"
    # Columns nothing filled (no flex on CPU, no LSH with --random-buckets) are left out.
    optional = {"lsh ms", "flex ms", "mask ms", "flex+mask", "flex vs dense", "flex check"}
    cells = [r for r in rows if not isinstance(r, str)]
    keep = [i for i, h in enumerate(headers) if h not in optional or any(r[i] not in ("-", "") for r in cells)]
    rows = [r if isinstance(r, str) else [r[i] for i in keep] for r in rows]
    return bu.format_table([headers[i] for i in keep], rows, align="".join(align[i] for i in keep))


def ideal_summary(results: List[dict]) -> Optional[str]:
    """The worst flashring sparse runtime / ideal at seqlen >= 8k, against the 1.25 target."""
    rows = [r for r in results if r["provider"] == "flashring" and r["pattern"] != "dense" and r["ratio_ideal"]
            and r["config"]["seqlen_q"] >= IDEAL_TARGET_SEQLEN]
    if not rows:
        return None
    w = max(rows, key=lambda r: r["ratio_ideal"])
    over = sum(r["ratio_ideal"] > IDEAL_TARGET for r in rows)
    return (f"flashring sparse runtime / ideal at seqlen >= {IDEAL_TARGET_SEQLEN}: worst {w['ratio_ideal']:.2f} "
            f"({w['pattern']} {w['param']} {w['mode']} S={w['config']['seqlen_q']} D={w['config']['headdim']}); "
            f"{over}/{len(rows)} rows above the {IDEAL_TARGET} target")


def plot_results(results: List[dict], stem: Path) -> List[Path]:
    """Speedup of flashring sparse over dense flashring vs seqlen, one curve per sparsity (the paper's figure), and
    runtime / ideal vs seqlen; one panel per (pattern, mode, headdim). [] without matplotlib."""
    try:
        from matplotlib.figure import Figure   # no pyplot: no GUI backend, no global state
    except ImportError:
        return []
    rows = [r for r in results if r["provider"] == "flashring" and r["pattern"] != "dense" and r["speedup"]]
    written = []
    for field, ylabel, suffix in (("speedup", "speedup over dense flashring (causal)", "speedup"),
                                  ("ratio_ideal", "runtime / ideal", "ideal")):
        panels: Dict[str, Dict[str, list]] = {}
        for r in rows:
            c = r["config"]
            title = f"{r['pattern']}-sparse {r['mode']} D={c['headdim']} {c['dtype']}"
            # _save_grid sorts curves by label: pad bucket counts so 8 comes before 32
            curve = f"drop {r['param']:g}" if r["pattern"] == "qk" else f"{r['param']:>3} buckets"
            panels.setdefault(title, {}).setdefault(curve, []).append((c["seqlen_q"], r[field]))
        for curves in panels.values():
            for pts in curves.values():
                pts.sort()
        if panels:
            written.append(bu._save_grid(Figure, panels, ylabel, Path(f"{stem}-{suffix}.png")))
    return written


# ----------------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = dense_bench.parse_cli(build_parser(), resolve, argv, "flashring bench --sparse")
    if isinstance(parsed, int):
        return parsed
    args, (device, shapes, patterns, modes), seed = parsed
    gpu = device.type == "cuda"

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sparse-{time.strftime('%Y%m%d-%H%M%S')}-{device.type}-{os.getpid()}.jsonl"
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    progress = bu.Progress(1)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        meta = dict(bu.run_metadata(device, ["flashring", "bench", "--sparse", *argv]), seed=seed, modes=modes,
                    patterns=[[p.kind, p.param] for p in patterns], buckets="random" if args.random_buckets else "lsh")
        with open(path, "w") as sink:
            bench = SparseBench(args, device, sink, progress, use_sdpa=gpu and not args.no_sdpa,
                                use_flex=gpu and not args.no_flex)
            meta["providers"] = [p.name for p in bench.dense_providers] + (["flex"] if bench.use_flex else [])
            sink.write(json.dumps(meta) + "\n")
            progress.total = len(shapes) * bench.steps_per_shape(len(patterns), len(modes))
            for i, shape in enumerate(shapes):
                bench.run_shape(shape, seed + i, patterns, modes, args.random_buckets)
    finally:
        torch.set_num_threads(threads)
        progress.close()

    results = bench.results
    header = [f"flashring bench --sparse on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
              f"seed {seed}, {time.perf_counter() - t0:.1f} s); keep = surviving causal pairs, ideal = dense "
              f"flashring ms x keep"]
    summary = ideal_summary(results)
    if summary:
        header.append(summary)
    return dense_bench.report(results, args, path, seed, header, render_table, plot_results,
                              ("provider", "pattern", "param", "mode", "config"))


if __name__ == "__main__":
    sys.exit(main())
