"""``flashring bench sparse``: dynamic sparse flash attention against dense causal attention.

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
masks; ``vs ideal`` = ms / ideal; ``vs dense`` = dense flashring ms / ms.

GPU default: bf16, causal, seqlen 1k..16k (``--seqlen-32k`` adds 32k) at 16k tokens per batch, nheads = 2048 //
headdim, headdim 64. Without CUDA a small fp32 run (seqlen 128/256, batch 1, 2 heads) finishes in seconds. Every
provider is checked once per configuration, before timing, against the float64 reference with the pattern's
visibility (``flashring.masks.sparse_pair_mask``) on a (batch, head) subset.
"""
from __future__ import annotations

import argparse
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import dense, harness as H
from ..masks import keep_ids, sparse_pair_mask, sparse_visible
from ..sparse import hash_sparse_attn_func, lsh_buckets, lsh_rotations, qk_sparse_attn_func

PATTERNS = ("qk", "hash")
MODES = ("fwd", "fwd+bwd", "bwd")
DEFAULT_QK_DROPS = (0.2, 0.5, 0.8)
DEFAULT_HASH_BUCKETS = (2, 8, 32, 64)
DEFAULT_TOKENS = 16384                 # batch * seqlen, as in the paper's and flash-attn's benchmarks
DEFAULT_HIDDEN = 2048                  # nheads = hidden // headdim


@dataclass(frozen=True)
class Pattern:
    kind: str                          # "dense", "qk" or "hash"
    param: Optional[float] = None      # qk: drop rate; hash: number of buckets

    def label(self) -> str:
        if self.kind == "qk":
            return f"qk drop={self.param:g}"
        return f"hash nb={self.param}" if self.kind == "hash" else "dense"


DENSE = Pattern("dense")


# ----------------------------------------------------------------------------------------------------- patterns
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
    (S, S): per bucket c, sum_i [bq[i] == c] * (running count of keys in c up to i); QK-sparse is the bucket rule
    of ``masks.keep_ids`` (only bucket 0 has both queries and keys).
    """
    b, s, h = q_side.shape
    if kind == "qk":
        q_side, k_side = keep_ids(q_side, k_side)
    elif kind != "hash":
        raise ValueError(f"kind must be 'qk' or 'hash', got {kind!r}")
    pairs = sum(((k_side == c).cumsum(1, dtype=torch.int64) * (q_side == c)).sum()
                for c in torch.unique(q_side).tolist())
    return int(pairs) / (b * h * s * (s + 1) // 2)


def flex_tables(kind: str, q_side: torch.Tensor, k_side: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, S, H) sides -> int32 (B, H, S) bucket ids read by one mask_mod for both patterns (``masks.keep_ids`` for
    QK-sparse). One mask_mod = one compile per shape, not two."""
    if kind == "qk":
        q_side, k_side = keep_ids(q_side, k_side)
    return tuple(t.transpose(1, 2).to(torch.int32).contiguous() for t in (q_side, k_side))


_CBM: Dict[str, Callable] = {}


def _compiled_block_mask() -> Callable:
    # Eager create_block_mask materialises the full (B, H, S, S) mask: 8 GiB at 32 heads x 16k^2; compiled it fuses
    # the mask_mod into the block reduction. dynamic=False as for flex itself (one compile per shape).
    if "fn" not in _CBM:
        from torch.nn.attention.flex_attention import create_block_mask
        _CBM["fn"] = torch.compile(create_block_mask, dynamic=False)
    return _CBM["fn"]


class FlexMask:
    """Per-shape int32 (B, H, S) tables and the mask_mod reading them (``masks.sparse_visible`` on gathered ids).
    New patterns of the same shape are copied into the same tensors, so the compiled mask_mod (and flex's
    kernels) are reused rather than recompiled."""

    def __init__(self, shape: H.Shape, device: torch.device):
        self.shape = shape
        self.bq = torch.empty(shape.batch, shape.nheads, shape.seqlen, dtype=torch.int32, device=device)
        self.bk = torch.empty_like(self.bq)
        bq, bk = self.bq, self.bk

        def mask_mod(b, h, q_idx, kv_idx):
            return sparse_visible(q_idx, kv_idx, bq[b, h, q_idx], bk[b, h, kv_idx], causal=True)

        self.mask_mod = mask_mod

    def block_mask(self):
        s = self.shape
        return _compiled_block_mask()(self.mask_mod, s.batch, s.nheads, s.seqlen, s.seqlen, device=self.bq.device)


# ----------------------------------------------------------------------------------------------------- the run
class SparseRun(H.Run):
    """Rows tagged by pattern and compared with dense flashring and the ideal time."""

    def __init__(self, *args, use_sdpa: bool, use_flex: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.dense_providers = [dense.PROVIDERS["flashring"]] + ([dense.PROVIDERS["sdpa-flash"]] if use_sdpa else [])
        self.use_flex = use_flex
        self.pattern, self.extra, self.dense_ms = DENSE, {}, {}
        self.flex: Optional[FlexMask] = None

    def steps_per_shape(self, n_patterns: int, n_modes: int) -> int:
        sparse_providers = 1 + int(self.use_flex)
        return 1 + len(self.dense_providers) * (1 + n_modes) + n_patterns * (1 + sparse_providers * (1 + n_modes))

    def record(self, shape, provider, mode, ms=None, mem=None, detail=None, error=None, **_) -> None:
        if self.pattern is DENSE and provider == "flashring":
            self.dense_ms[mode] = ms
        survive = self.extra.get("survive", 1.0 if self.pattern is DENSE else None)   # None: masks failed
        base = self.dense_ms.get(mode)
        ideal = base * survive if base and survive is not None else None
        extra = {k: v for k, v in self.extra.items() if k != "survive" and (provider == "flex" or k != "mask_ms")}
        if provider == "flex" and ms and extra.get("mask_ms"):
            extra["ms_with_mask"] = ms + extra["mask_ms"]           # a mask built per call (new data) pays both
        # TFLOP/s counts useful work only: the causal FLOPs of the surviving pairs.
        super().record(shape, provider, mode, ms=ms, mem=mem, detail=detail, error=error,
                       flops=shape.flops(mode) * (survive or 0.0), tag=self.pattern.label(), pattern=self.pattern.kind,
                       param=self.pattern.param, survive=survive, dense_ms=base, ideal_ms=ideal,
                       ratio_ideal=ms / ideal if ms and ideal else None, speedup=base / ms if ms and base else None,
                       **extra)

    def run_shape(self, shape: H.Shape, seed: int, patterns: Sequence[Pattern], modes: Sequence[str],
                  random_buckets: bool) -> None:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        need_grads = any(m != "fwd" for m in modes)
        self.pattern, self.extra, self.dense_ms = DENSE, {}, {}
        base, error = self.inputs(shape, functools.partial(dense.random_inputs, shape, seed, self.device),
                                  [p.name for p in self.dense_providers], modes,
                                  steps=1 + len(self.dense_providers) * (1 + len(modes)) + len(patterns))
        if error:
            for pattern in patterns:       # the sparse rows of this shape say so too
                self.pattern, self.extra = pattern, {}
                self._skip_pattern(shape, modes, error)
            return
        self.progress.step(f"{shape.label()} | dense reference")
        ref = self.reference(base, shape, need_grads)
        for provider in self.dense_providers:
            self.run_provider(shape, provider, base, ref, modes)
            H.free_memory(self.device)
        for pattern in patterns:
            self.pattern, self.extra = pattern, {}
            self.progress.step(f"{shape.label()} | {pattern.label()} masks + reference")
            try:
                q_side, k_side = self._pattern_sides(pattern, base, seed, gen, random_buckets)
            except Exception as exc:       # e.g. OOM while hashing: error rows for this pattern, sweep goes on
                H.free_memory(self.device)
                self._skip_pattern(shape, modes, H.reason(exc))
                continue
            ref = self.reference(base, shape, need_grads, mask=lambda nb, nh: sparse_pair_mask(
                pattern.kind, q_side[:nb, :, :nh], k_side[:nb, :, :nh], causal=True))
            self.run_provider(shape, self._sparse_provider(pattern, q_side, k_side), base, ref, modes)
            H.free_memory(self.device)
            if self.use_flex:
                self.extra["mask_ms"] = None
                self.run_provider(shape, self._flex_provider(pattern.kind, q_side, k_side), base, ref, modes)
                H.free_memory(self.device)
        self.flex = None

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
                self.extra["lsh_ms"] = self.time(hash_fn)
        self.extra["survive"] = surviving_fraction(pattern.kind, q_side, k_side)
        return q_side, k_side

    def _skip_pattern(self, shape, modes, error: str) -> None:
        for provider in ["flashring"] + (["flex"] if self.use_flex else []):
            for _ in range(1 + len(modes)):                 # keep the progress count: check + modes
                self.progress.step(f"{shape.label()} | {self.pattern.label()} {provider} skipped")
            for mode in modes:
                self.record(shape, provider, mode, error=error)

    @staticmethod
    def _sparse_provider(pattern: Pattern, q_side: torch.Tensor, k_side: torch.Tensor) -> H.Provider:
        if pattern.kind == "qk":
            fn = qk_sparse_attn_func
        else:               # the pattern's bucket count bounds the ids (LSH or --random-buckets alike)
            fn = functools.partial(hash_sparse_attn_func, num_buckets=int(pattern.param))
        return H.Provider("flashring", "bshd",
                          lambda shape, device: (lambda q, k, v: fn(q, k, v, q_side, k_side, causal=True)))

    def _flex_provider(self, kind: str, q_side: torch.Tensor, k_side: torch.Tensor) -> H.Provider:
        def build(shape, device):
            flex = dense.compiled_flex()       # raises Unavailable without flex_attention
            if self.flex is None or self.flex.shape != shape:
                self.flex = FlexMask(shape, device)
            for buf, table in zip((self.flex.bq, self.flex.bk), flex_tables(kind, q_side, k_side)):
                buf.copy_(table)
            # per call even under --cuda-graphs: the compiled mask builder is not captured
            self.extra["mask_ms"] = H.time_ms(self.flex.block_mask, self.device, self.args.rep_ms,
                                              self.args.warmup_ms, self.args.repeats)
            block_mask = self.flex.block_mask()
            return lambda q, k, v: flex(q, k, v, block_mask=block_mask)

        return H.Provider("flex", "bhsd", build)


# ----------------------------------------------------------------------------------------------------- CLI
def _drop_rate(text: str) -> float:
    x = float(text)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"drop rate {text} is not in [0, 1)")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashring bench sparse", description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=H.csv(H.seqlen), help="e.g. 1k,4k (GPU default 1k,2k,4k,8k,16k; CPU 128,256)")
    p.add_argument("--seqlen-32k", action="store_true", help="add seqlen 32k (batch 1) to the sweep")
    p.add_argument("--headdims", type=H.csv(H.headdim), help="default 64 (e.g. 64,128)")
    p.add_argument("--tokens", type=H.positive, default=DEFAULT_TOKENS,
                   help=f"GPU: batch = max(1, tokens // seqlen) (default {DEFAULT_TOKENS})")
    p.add_argument("--batch", type=H.positive, help="fixed batch (overrides --tokens; CPU default 1)")
    p.add_argument("--nheads", type=H.positive, help=f"default: {DEFAULT_HIDDEN} // headdim on GPU, 2 on CPU")
    p.add_argument("--patterns", type=H.csv(str, PATTERNS), help="qk,hash (default both)")
    p.add_argument("--qk-drop", type=H.csv(_drop_rate), help="QK-sparse drop rates for q and k (default 0.2,0.5,0.8)")
    p.add_argument("--hash-buckets", type=H.csv(H.positive),
                   help="hash-sparse bucket counts (default 2,8,32,64; even for LSH)")
    p.add_argument("--random-buckets", action="store_true",
                   help="uniform random bucket ids instead of LSH buckets of q and k")
    p.add_argument("--modes", type=H.csv(str, MODES), help="fwd,fwd+bwd (default); bwd also possible")
    p.add_argument("--dtype", choices=list(H.DTYPES), help="GPU default bf16; CPU fp32")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves one compile per shape)")
    p.add_argument("--no-sdpa", action="store_true", help="skip the dense SDPA flash baseline")
    p.add_argument("--quick", action="store_true",
                   help="sanity run (GPU: seqlen 4k,8k; CPU: 128), qk drop 0.5, hash 8 buckets")
    H.add_cuda_graphs_arg(p)
    H.add_common_args(p)
    return p


def resolve(args):
    """Device-dependent defaults: (shapes, patterns, modes); ValueError on a bad combination."""
    gpu = args.device.type == "cuda"
    if gpu:
        seqlens = [4096, 8192] if args.quick else [1024, 2048, 4096, 8192, 16384]
    else:
        seqlens = [128] if args.quick else [128, 256]
    seqlens = sorted(set((args.seqlens or seqlens) + ([32768] if args.seqlen_32k else [])))
    headdims = args.headdims or [64]
    dtype = H.DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    drops = args.qk_drop or ([0.5] if args.quick else list(DEFAULT_QK_DROPS))
    buckets = args.hash_buckets or ([8] if args.quick else list(DEFAULT_HASH_BUCKETS))
    if not args.random_buckets:
        odd = [n for n in buckets if n < 2 or n % 2]
        if odd:
            raise ValueError(f"--hash-buckets {odd}: LSH needs an even count >= 2 (or use --random-buckets)")
    kinds = args.patterns or list(PATTERNS)
    patterns = ([Pattern("qk", d) for d in dict.fromkeys(drops)] if "qk" in kinds else []) + \
               ([Pattern("hash", n) for n in dict.fromkeys(buckets)] if "hash" in kinds else [])
    modes = H.cuda_graph_modes(args, [m for m in MODES if m in (args.modes or ("fwd", "fwd+bwd"))], gpu)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    shapes = []
    for hd, n in itertools.product(headdims, seqlens):
        batch = args.batch or (max(1, args.tokens // n) if gpu else 1)
        nheads = args.nheads or (max(1, DEFAULT_HIDDEN // hd) if gpu else 2)
        shapes.append(H.Shape(batch, n, nheads, hd, True, dtype))
    return shapes, patterns, modes


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
    for (mode, hd, nheads, dtype), group in sorted(sections.items(),
                                                   key=lambda kv: (MODES.index(kv[0][0]), kv[0][1])):
        rows.append(f"== {mode}  H={nheads} D={hd} causal {dtype}")
        flex = {(r["config"]["seqlen_q"], r["pattern"], r["param"]): r for r in group if r["provider"] == "flex"}
        for r in group:
            if r["provider"] == "flex":
                continue
            c, f = r["config"], flex.get((r["config"]["seqlen_q"], r["pattern"], r["param"]))
            is_dense = r["pattern"] == "dense"
            param = r["provider"] if is_dense else (f"drop {r['param']:g}" if r["pattern"] == "qk" else
                                                    f"{r['param']} {r.get('buckets', '')}".strip())
            flex_ms = f["ms"] if f else None
            keep = "-" if r["survive"] is None else f"{100 * r['survive']:.1f}%"
            both = flex_ms + f["mask_ms"] if flex_ms and f.get("mask_ms") else None
            rows.append([c["seqlen_q"], c["batch"], r["pattern"], param, keep,
                         H.fmt_num(r["ms"], 4), H.fmt_x(r["speedup"]),
                         "-" if is_dense else H.fmt_num(r["ratio_ideal"]), H.fmt_num(r.get("lsh_ms"), 3),
                         H.fmt_num(flex_ms, 4), H.fmt_num(f.get("mask_ms") if f else None, 3), H.fmt_num(both, 4),
                         H.fmt_x(r["dense_ms"] / flex_ms if flex_ms and r["dense_ms"] else None),
                         H.status(r, 40), H.status(f, 40) if not is_dense else ""])
    align = "rrll" + "r" * 9 + "ll"
    # Columns nothing filled (no flex on CPU, no LSH with --random-buckets) are left out.
    optional = {"lsh ms", "flex ms", "mask ms", "flex+mask", "flex vs dense", "flex check"}
    cells = [r for r in rows if not isinstance(r, str)]
    keep_cols = [i for i, h in enumerate(headers) if h not in optional or any(r[i] not in ("-", "") for r in cells)]
    rows = [r if isinstance(r, str) else [r[i] for i in keep_cols] for r in rows]
    return H.format_table([headers[i] for i in keep_cols], rows, align="".join(align[i] for i in keep_cols))


def ideal_summary(results: List[dict], min_seqlen: int = 8192) -> Optional[str]:
    """The worst flashring sparse runtime / ideal at seqlen >= ``min_seqlen``."""
    rows = [r for r in results if r["provider"] == "flashring" and r["pattern"] != "dense" and r["ratio_ideal"]
            and r["config"]["seqlen_q"] >= min_seqlen]
    if not rows:
        return None
    w = max(rows, key=lambda r: r["ratio_ideal"])
    return (f"flashring sparse runtime / ideal at seqlen >= {min_seqlen}: worst {w['ratio_ideal']:.2f} "
            f"({w['pattern']} {w['param']} {w['mode']} S={w['config']['seqlen_q']} D={w['config']['headdim']})")


def plot_results(results: List[dict], stem: Path) -> List[Path]:
    """Speedup of flashring sparse over dense flashring vs seqlen, one curve per sparsity (the paper's figure), and
    runtime / ideal vs seqlen; one panel per (pattern, mode, headdim)."""
    rows = [r for r in results if r["provider"] == "flashring" and r["pattern"] != "dense"]
    title = lambda r: f"{r['pattern']}-sparse {r['mode']} D={r['config']['headdim']} {r['config']['dtype']}"  # noqa
    # save_grid sorts curves by label: pad bucket counts so 8 comes before 32
    curve = lambda r: f"drop {r['param']:g}" if r["pattern"] == "qk" else f"{r['param']:>3} buckets"  # noqa: E731
    x = lambda r: r["config"]["seqlen_q"]  # noqa: E731
    written = [H.save_grid(H.panels(rows, title, curve, x, lambda r: r["speedup"]),
                           "speedup over dense flashring (causal)", Path(f"{stem}-speedup.png")),
               H.save_grid(H.panels(rows, title, curve, x, lambda r: r["ratio_ideal"]), "runtime / ideal",
                           Path(f"{stem}-ideal.png"))]
    return [p for p in written if p is not None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    parsed = H.parse_cli(build_parser(), resolve, argv, "flashring bench sparse")
    if isinstance(parsed, int):
        return parsed
    args, (shapes, patterns, modes), seed = parsed
    gpu = args.device.type == "cuda"
    use_sdpa, use_flex = gpu and not args.no_sdpa, gpu and not args.no_flex
    run = SparseRun(args, args.device, "sparse", argv, seed, use_sdpa=use_sdpa, use_flex=use_flex, modes=modes,
                    patterns=[[p.kind, p.param] for p in patterns], buckets="random" if args.random_buckets else "lsh",
                    providers=["flashring"] + (["sdpa-flash"] if use_sdpa else []) + (["flex"] if use_flex else []))
    run.progress.total = len(shapes) * run.steps_per_shape(len(patterns), len(modes))
    with H.cpu_threads(args.threads):
        for i, shape in enumerate(shapes):
            run.run_shape(shape, seed + i, patterns, modes, args.random_buckets)
    header = ["keep = surviving causal pairs, ideal = dense flashring ms x keep"]
    summary = ideal_summary(run.results)
    return run.finish(render_table, plot_results, ("provider", "pattern", "param", "mode", "config"),
                      header + ([summary] if summary else []))
