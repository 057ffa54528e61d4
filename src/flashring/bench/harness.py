"""The one benchmark harness behind every ``flashring bench`` suite: timing, FLOPs, the check before timing, run
metadata, the results file, the text table, progress and plots. Suites (``dense``, ``sparse``, ``ring``, ``tune``,
``decode``, ``varlen``) define shapes and providers and call into this.

- Timing: median of per-call CUDA-event times after warm-up, with the L2 cache flushed before every call
  (:func:`time_ms`); on CPU the median of wall-clock calls. A fixed call count can be imposed, which ring ranks
  agree on so that every rank runs the same number of collective calls.
- FLOPs: flash-attn's convention (:func:`attention_flops`).
- Check: every provider's output (and gradients) against the float64 reference by ``flashring.testing``'s rule,
  once per configuration, before it is timed; a FAIL is reported loudly and makes the exit code 1.
- Results: ``<device>-<suite>-<date>-<sha>.jsonl`` under ``--out`` (default ``./flashring-results``): one metadata
  line (``flashring.metadata.run_metadata``) then one ``"type": "result"`` row per measurement.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch

from .. import testing
from ..masks import flash_bounds
from ..metadata import device_slug, git_sha, run_metadata

MODES = ("fwd", "bwd", "fwd+bwd")
# flash-attn's benchmark convention: the backward does 2.5x the forward's matmul work (dQ, dK, dV, dP plus the
# recomputed S), so fwd+bwd is 3.5x.
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_OUT = Path("flashring-results")
# H100 SXM has 50 MB of L2; used when the device does not report its own size (and on CPU, where it only decides
# how many input copies to rotate through).
DEFAULT_L2_BYTES = 50 * 2**20
CPU_MIN_S = 0.02
# The float64 reference materialises (slices, S, S) score matrices and autograd keeps ~4 of them; 512 MiB per
# matrix keeps it a few GiB even at seqlen 32k, where a single (batch, head) slice is 8 GiB on its own.
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


# ----------------------------------------------------------------------------------------------------- device
def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)
    return DEFAULT_L2_BYTES


def is_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or an allocator failure surfaced as a plain RuntimeError (the CPU allocator's
    reads "DefaultCPUAllocator: can't allocate memory") or MemoryError."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in ("out of memory", "can't allocate memory",
                                                                     "cannot allocate memory"))


def free_memory(device: torch.device) -> None:
    """Drop cached blocks after an OOM or between shapes so the next provider starts from a clean allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------- timing
_FLUSH: Dict[torch.device, torch.Tensor] = {}


def time_ms(fn: Callable[[], object], device: torch.device, rep_ms: float = 100, warmup_ms: float = 25,
            repeats: int = 3, n_calls: Optional[int] = None) -> float:
    """Median milliseconds per call of ``fn``: THE timing method of every suite.

    CUDA: calls for ``warmup_ms``, then per-call CUDA events for ``rep_ms`` worth of calls (or exactly
    ``n_calls``), each call preceded by an L2 flush outside its events. CPU: one warm-up call, then the median of at
    least ``repeats`` wall-clock timings, more (up to 50) while less than ``CPU_MIN_S`` has elapsed: a
    sub-millisecond call preempted once on a busy 2-core CI box reads 30x slow, and a median over ~20 samples
    shrugs that off where one over 3 does not.
    """
    if device.type != "cuda":
        fn()
        samples: List[float] = []
        start = time.perf_counter()
        while len(samples) < max(1, n_calls or repeats) or (
                n_calls is None and time.perf_counter() - start < CPU_MIN_S and len(samples) < 50):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    if device not in _FLUSH:
        _FLUSH[device] = torch.empty(2 * l2_bytes(device) // 4, dtype=torch.int32, device=device)
    flush = _FLUSH[device]
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    estimate_ms = max(1e-3, (time.perf_counter() - t0) * 1e3)
    if n_calls is None:
        for _ in range(max(1, int(warmup_ms / estimate_ms))):
            fn()
        n_calls = max(5, min(10_000, int(rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_calls)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_calls)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def host_us(fn: Callable[[], object], device: torch.device, n: int = 300) -> float:
    """Host microseconds per call of ``fn``: calls issued back to back, one sync before and after. For calls whose
    GPU work is shorter than their launch (small decode steps) this is what bounds their throughput; ``time_ms``
    measures the device side."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize(device)
    return (t1 - t0) / n * 1e6


def add_cuda_graphs_arg(p) -> None:
    p.add_argument("--cuda-graphs", action="store_true",
                   help="time CUDA-graph replays of each call: the device work alone, without the host time "
                        "that per-call timing includes at small sizes")


def cuda_graph_modes(args, modes: List[str], gpu: bool) -> List[str]:
    """The modes a suite times under ``--cuda-graphs`` (ValueError where it cannot): "bwd" replays the backward
    of forwards built outside the capture, on another stream, which is not capturable."""
    if not args.cuda_graphs:
        return modes
    if not gpu:
        raise ValueError("--cuda-graphs needs a CUDA device")
    if args.modes and "bwd" in args.modes:
        raise ValueError("--cuda-graphs times fwd and fwd+bwd only; drop bwd from --modes")
    return [m for m in modes if m != "bwd"]


def cuda_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph: the returned callable replays it and returns the captured output. Timing
    the replay measures the device work alone, without the host time of launching it (what inference servers that
    capture their decode step see)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):               # warm-up off the capture: compiles, allocator pools
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it (inputs excluded).
    None on CPU, where torch keeps no allocator statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    del result
    return int(torch.cuda.max_memory_allocated(device) - base)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2 << 30) -> Optional[float]:
    """Device copy bandwidth (GB/s, bytes read + written) measured now, the ceiling memory-bound rows are
    compared with in the same run."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rep_ms=200)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------- providers
class Unavailable(Exception):
    """The provider cannot run here (missing backend, wrong device); recorded on its rows, never raised further."""


@dataclass(frozen=True)
class Provider:
    name: str
    layout: str      # "bshd" (flash-attn) or "bhsd" (torch SDPA / flex); inputs are converted before timing
    build: Callable[[Shape, torch.device], Callable]  # -> attn(q, k, v) -> out; one-off setup happens here
    context: Callable[[], ContextManager] = contextlib.nullcontext  # wraps the check and the timing


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    # (B, S, H, D) -> (B, H, S, D) materialised, so no provider pays for a strided read inside the timing.
    return t if layout == "bshd" else t.transpose(1, 2).contiguous()


def from_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bshd" else t.transpose(1, 2)          # (B, H, S, D) -> (B, S, H, D) view


def reason(exc: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """One line for an error row."""
    if is_oom(exc):
        return "OOM"
    if isinstance(exc, Unavailable):
        return f"unavailable: {exc}"
    text = (str(exc).strip().splitlines() or [""])[0]
    why = ""
    if "no available kernel" in text.lower():
        # SDPA explains why a forced backend refused only in warnings; keep the first reason it gave.
        why = next((str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()), "")
    return f"{type(exc).__name__}: {text}" + (f" ({why})" if why else "")


# ----------------------------------------------------------------------------------------------------- checks
@dataclass
class Reference:
    """The float64 reference (and its low-precision twin, for the tolerance) on a (batch, head) subset."""
    nb: int
    nh: int
    refs: Dict[str, Dict[str, torch.Tensor]]
    dtype: torch.dtype


def subset_sizes(shape: Shape) -> Tuple[int, int]:
    per_slice = shape.seqlen * shape.seqlen * 8
    n = max(1, REF_BUDGET_BYTES // per_slice)
    nh = min(shape.nheads, n)
    return min(shape.batch, max(1, n // nh)), nh


def make_reference(base: Sequence[torch.Tensor], shape: Shape, need_grads: bool,
                   mask: Optional[Callable[[int, int], torch.Tensor]] = None) -> Reference:
    """``base`` = (q, k, v, do) in (B, S, H, D). ``mask(nb, nh)``: an extra (nb, nh, S, S) visibility on the
    subset (sparse patterns). Heads and batches are independent, so the subset is exact."""
    nb, nh = subset_sizes(shape)
    q, k, v, do = (t[:nb, :, :nh] for t in base)
    lower, upper = flash_bounds(shape.seqlen, shape.seqlen, shape.causal, (-1, -1))
    refs = testing.reference_pair(q, k, v, do if need_grads else None, lower=lower, upper=upper,
                                  mask=None if mask is None else mask(nb, nh))
    return Reference(nb, nh, refs, shape.dtype)


def compare(ref: Reference, out: torch.Tensor, grads: Optional[Sequence[torch.Tensor]]) -> Dict[str, dict]:
    """{"out"/"dq"/"dk"/"dv": {"err", "tol", "ok"}} for the tensors given, all in (B, S, H, D)."""
    results = {"out": out[:ref.nb, :, :ref.nh]}
    if grads is not None:
        results.update(zip(("dq", "dk", "dv"), (g[:ref.nb, :, :ref.nh] for g in grads)))
    return testing.check_all(results, ref.refs, ref.dtype)


def check_status(detail: Optional[dict]) -> Optional[str]:
    return None if detail is None else ("PASS" if all(d["ok"] for d in detail.values()) else "FAIL")


# ----------------------------------------------------------------------------------------------------- the run
def timed_fn(mode: str, attn: Callable, sets: List[Tuple[torch.Tensor, ...]]) -> Callable[[], object]:
    """The callable that gets timed. Inputs rotate through ``sets`` so repeated calls do not hit warm caches;
    gradients come back from ``torch.autograd.grad``, so nothing accumulates into ``.grad``. The forward is a
    training forward (inputs require grad); bwd re-runs the backward of graphs built here, outside the timing."""
    turn = itertools.cycle(range(len(sets)))
    if mode == "fwd":
        def fn():
            q, k, v, _ = sets[next(turn)]
            return attn(q, k, v)
    elif mode == "fwd+bwd":
        def fn():
            q, k, v, do = sets[next(turn)]
            return torch.autograd.grad(attn(q, k, v), (q, k, v), do)
    else:
        outs = [attn(q, k, v) for q, k, v, _ in sets]

        def fn():
            i = next(turn)
            q, k, v, do = sets[i]
            return torch.autograd.grad(outs[i], (q, k, v), do, retain_graph=True)
    return fn


def n_copies(nbytes: int, device: torch.device) -> int:
    # Rotate 3 input sets unless one set alone is 4x the L2 cache (then caches cannot help).
    return 3 if nbytes < 4 * l2_bytes(device) else 1


class Run:
    """One suite run: the results file (metadata line first), rows kept for the table, progress, FAIL reports."""

    def __init__(self, args, device: torch.device, suite: str, argv: Sequence[str], seed: int, **meta):
        self.args, self.device, self.suite, self.seed = args, device, suite, seed
        self.results: List[dict] = []
        self.progress = Progress(1)
        self.t0 = time.perf_counter()
        args.out.mkdir(parents=True, exist_ok=True)
        self.path = args.out / results_name(device, suite)
        timing = "cuda-graph replays" if getattr(args, "cuda_graphs", False) else "per-call events"
        self.meta = run_metadata(device, ["flashring", "bench", suite, *argv], suite=suite, seed=seed,
                                 timing=timing, **meta)
        self.sink = open(self.path, "w")
        self.sink.write(json.dumps(self.meta) + "\n")
        self.sink.flush()

    def emit(self, row: dict, what: str) -> None:
        """Keep ``row``, append it to the results file, and say at once which checks failed."""
        row = {"type": "result", "suite": self.suite, **row}
        self.results.append(row)
        self.sink.write(json.dumps(row) + "\n")
        self.sink.flush()
        if row.get("check") == "FAIL":
            worst = ", ".join(f"{k} err {d['err']:.3g} > tol {d['tol']:.3g}"
                              for k, d in row["check_detail"].items() if not d["ok"])
            self.progress.message(f"!!! FAIL {what}: {worst}")

    def record(self, shape: Shape, provider: str, mode: str, ms=None, mem=None, detail=None, error=None,
               flops: Optional[float] = None, tag: str = "", **extra) -> None:
        flops = shape.flops(mode) if flops is None else flops
        row = {"config": shape.config(), "provider": provider, "mode": mode, "ms": ms,
               "tflops": flops / (ms * 1e-3) / 1e12 if ms else None, "flops": flops, "mem_bytes": mem,
               "check": check_status(detail), "check_detail": detail, "error": error, **extra}
        self.emit(row, f"{provider}{' ' + tag if tag else ''} {mode} [{shape.label()}]")

    def inputs(self, shape: Shape, make: Callable[[], object], providers: Sequence[str], modes: Sequence[str],
               steps: int = 0) -> Tuple[object, Optional[str]]:
        """``(make(), None)``, or ``(None, error)`` after recording an error row per (provider, mode) when it fails
        (out of memory for a shape too large for the device), so that the sweep goes on with the next shape.
        ``steps``: progress steps the skipped shape would have taken."""
        try:
            return make(), None
        except Exception as exc:
            free_memory(self.device)
            error = f"{reason(exc)} allocating inputs"
            self.progress.message(f"[{shape.label()}]: {error}; skipped")
            for _ in range(steps):
                self.progress.step(f"{shape.label()} skipped")
            for provider in providers:
                for mode in modes:
                    self.record(shape, provider, mode, error=error)
            return None, error

    def time(self, fn: Callable[[], object]) -> float:
        """:func:`time_ms` of ``fn``, or of its CUDA-graph replay when the suite was asked for ``--cuda-graphs``
        (recorded in the results' metadata as ``timing``)."""
        if getattr(self.args, "cuda_graphs", False):
            fn = cuda_graph(fn, self.device)
        return time_ms(fn, self.device, self.args.rep_ms, self.args.warmup_ms, self.args.repeats)

    def run_provider(self, shape: Shape, provider: Provider, base, ref: Optional[Reference], modes,
                     record: Optional[Callable] = None) -> None:
        """Build, check once against ``ref``, then time each mode; failures become error rows, never crashes."""
        record = record or self.record
        label = f"{shape.label()} | {provider.name}"
        need_grads = any(m != "fwd" for m in modes)
        sets, error, checks = [], None, {}
        self.progress.step(f"{label} check")
        nbytes = sum(t.numel() * t.element_size() for t in base) * 5 // 4
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with provider.context():
                    attn = provider.build(shape, self.device)
                    sets = [tuple(to_layout(t, provider.layout).clone().requires_grad_(i < 3 and need_grads)
                                  for i, t in enumerate(base)) for _ in range(n_copies(nbytes, self.device))]
                    checks = self._check(provider, attn, sets[0], ref, need_grads)
            except Exception as exc:
                error = reason(exc, caught)
        if error:
            sets = []
            free_memory(self.device)
            for mode in modes:
                self.progress.step(f"{label} {mode} skipped")
                record(shape, provider.name, mode, error=error)
            return
        for mode in modes:
            self.progress.step(f"{label} {mode}")
            detail = checks.get("fwd" if mode == "fwd" else "bwd")
            if isinstance(detail, str):          # the backward failed in the check: it would fail here too
                record(shape, provider.name, mode, error=detail)
                continue
            ms = mem = err = None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    with provider.context():
                        fn = timed_fn(mode, attn, sets)
                        ms = self.time(fn)
                        mem = peak_extra_bytes(fn, self.device)
                except Exception as exc:
                    err = reason(exc)
                fn = None
            if err:
                free_memory(self.device)
            record(shape, provider.name, mode, ms=ms if not err else None, mem=mem if not err else None,
                   detail=detail, error=err)

    @staticmethod
    def _check(provider: Provider, attn, inputs, ref: Optional[Reference], need_grads: bool) -> dict:
        """{"fwd": detail, "bwd": detail}: detail None without a reference; a string when the backward could
        not run although the forward did."""
        if ref is None:
            return {}
        q, k, v, do = inputs
        out = attn(q, k, v)
        result = {"fwd": compare(ref, from_layout(out.detach(), provider.layout), None)}
        if need_grads:
            try:
                grads = torch.autograd.grad(out, (q, k, v), do)
                result["bwd"] = compare(ref, from_layout(out.detach(), provider.layout),
                                        [from_layout(g, provider.layout) for g in grads])
            except Exception as exc:           # e.g. OOM in the backward only: the fwd rows are still timed
                result["bwd"] = f"backward: {reason(exc)}"
        return result

    def reference(self, base, shape: Shape, need_grads: bool, mask=None) -> Optional[Reference]:
        """:func:`make_reference`, or None (checks n/a, timing still runs) when it cannot be built."""
        try:
            return make_reference(base, shape, need_grads, mask)
        except Exception as exc:
            free_memory(self.device)
            self.progress.message(f"reference failed for [{shape.label()}]: {reason(exc)}; checks skipped")
            return None

    def finish(self, render: Callable[[List[dict]], str], plot: Optional[Callable] = None,
               row_keys: Sequence[str] = ("provider", "mode", "config"), header: Sequence[str] = ()) -> int:
        """Header + table (unless --json-only), plots (unless --no-plot), the results path, and a loud list of
        rows that FAILED their check. Returns the exit code (1 on any FAIL)."""
        self.sink.close()
        self.progress.close()
        m = self.meta
        lines = [f"flashring bench {self.suite} on {m['device']} (torch {m['torch']}, triton {m['triton']}, "
                 f"git {(m['git_sha'] or 'unknown')[:12]}, seed {self.seed}, {time.perf_counter() - self.t0:.1f} s)",
                 *header]
        if not self.args.json_only:
            print("\n".join(lines))
            print(render(self.results))
        plots = [] if (self.args.no_plot or self.args.json_only or plot is None) else \
            plot(self.results, self.path.with_suffix(""))
        print(f"results: {self.path}" + "".join(f"\nplot: {p}" for p in plots))
        too_big = list(dict.fromkeys(config_label(r["config"]) for r in self.results
                                     if (r.get("error") or "").startswith("OOM")))
        if too_big:
            print(f"flashring bench {self.suite}: out of memory on {m['device']} (rows marked OOM; the rest of the "
                  f"sweep ran): {'; '.join(too_big)}", file=sys.stderr)
        fails = [r for r in self.results if r.get("check") == "FAIL"]
        if fails:
            print(f"\n!!! {len(fails)} row(s) FAILED the correctness check (seed {self.seed}):", file=sys.stderr)
            for r in fails:
                bad = {k: d for k, d in r["check_detail"].items() if not d["ok"]}
                print("!!!   " + " ".join(str(r.get(k)) for k in row_keys) + f": {bad}", file=sys.stderr)
            return 1
        return 0


def config_label(c: dict) -> str:
    """A result row's ``config`` as :meth:`Shape.label` writes it (the fields it has: ring probe rows have fewer)."""
    parts = [f"{short}={c[key]}" for short, key in (("B", "batch"), ("S", "seqlen_q"), ("H", "nheads"),
                                                     ("D", "headdim")) if key in c]
    if "causal" in c:
        parts.append("causal" if c["causal"] else "full")
    return " ".join(parts + ([c["dtype"]] if "dtype" in c else []))


def results_name(device: torch.device, suite: str) -> str:
    """``<device>-<suite>-<date>-<sha>.jsonl``; the sha cut to 10 characters, ``-dirty`` marking a dirty checkout
    (letters, digits and dashes only: the GPU machines' file return drops names with other characters)."""
    raw = git_sha() or "nogit"
    sha = "".join(c for c in raw.split("-")[0] if c.isalnum())[:10] + ("-dirty" if raw.endswith("-dirty") else "")
    return f"{device_slug(device)}-{suite}-{time.strftime('%Y%m%d-%H%M%S')}-{sha or 'nogit'}.jsonl"


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """A driver's results file: one JSON object per line (the run's metadata first, as every results file)."""
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ----------------------------------------------------------------------------------------------------- CLI
def csv(kind: Callable, choices: Optional[Sequence[str]] = None):
    """argparse type: a comma-separated list of ``kind``, optionally restricted to ``choices``."""
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


def positive(text: str) -> int:
    # ArgumentTypeError, not ValueError: argparse prints its message (for a ValueError only "invalid value")
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return n


def keywords(text: str) -> Dict[str, object]:
    """argparse type: ``"programs=3,dynamic=False"`` -> ``{"programs": 3, "dynamic": False}`` (keyword arguments
    of a kernel's launch_args from a developer's command line; values are Python literals)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            if not eq or not name.strip().isidentifier():
                raise ValueError
            out[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=LITERAL") from None
    return out


def variants(text: str) -> Dict[str, Dict[str, object]]:
    """argparse type: ``"tile:programs=1000000000;s3:stages=3"`` -> ``{name: keywords(...)}``."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, colon, kw = item.partition(":")
        if not colon or not name.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME:KEYWORDS")
        out[name.strip()] = keywords(kw)
    return out


def seqlen(text: str) -> int:
    """512, 1k, 16k"""
    return positive(text[:-1]) * 1024 if text.lower().endswith("k") else positive(text)


def headdim(text: str) -> int:
    d = positive(text)
    if d > 256:
        raise argparse.ArgumentTypeError(f"headdim {d} > 256 is not supported by flashring")
    return d


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options every suite shares."""
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--repeats", type=positive,
                   help="CPU: at least this many timed calls per row, median taken (default 3; 2 with --quick)")
    p.add_argument("--rep-ms", type=positive, default=100, help="CUDA: measured time per row (ms)")
    p.add_argument("--warmup-ms", type=positive, default=25, help="CUDA: warm-up time per row (ms)")
    p.add_argument("--threads", type=positive, help="CPU: torch intra-op threads for the run (default 1)")
    p.add_argument("--seed", type=int, help="input seed (default: $FLASHRING_SEED, else random; always recorded)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default ./{DEFAULT_OUT})")
    p.add_argument("--no-plot", action="store_true", help="do not write PNG plots")
    p.add_argument("--json-only", action="store_true", help="write only the JSONL results (no plots, no table)")


def parse_cli(parser: argparse.ArgumentParser, resolve: Callable, argv: Sequence[str], prog: str):
    """argparse + ``resolve(args)``: ``(args, resolved, seed)``, or an exit code (--help: 0, usage error: 2).
    The seed is --seed, else FLASHRING_SEED, else fresh; it is recorded so any run can be replayed."""
    try:
        args = parser.parse_args(list(argv))
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda given but CUDA is not available")
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.threads is None and args.device.type == "cpu":
            # The CPU shapes are tiny: intra-op threads add barrier waits, and one barrier preempted on a busy
            # 2-core CI box reads 30-60 ms for a 0.3 ms call. One thread gives stable numbers.
            args.threads = 1
        resolved = resolve(args)
        check_out_dir(args.out)
    except SystemExit as exc:              # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))
    return args, resolved, seed


def check_out_dir(out: Path) -> None:
    """--out must be a directory we can create and write."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise ValueError(f"--out {out}: {probe} is not writable")


@contextlib.contextmanager
def cpu_threads(n: Optional[int]):
    before = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------- table
def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """Plain monospace table. ``align`` holds one 'l'/'r' per column (default: first column left, rest right).
    A row that is a single string is printed as a section header spanning the table."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(c) for c in r] for r in rows if not isinstance(r, str)]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, align)).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = [line(headers), rule]
    for r in rows:
        out.append(r if isinstance(r, str) else line([str(c) for c in r]))
    return "\n".join(out)


def fmt_num(x: Optional[float], digits: int = 3) -> str:
    """Significant-digit formatting that stays readable from 0.0012 (CPU TFLOP/s) to 612 (H100)."""
    if x is None or not math.isfinite(x):
        return "-"
    if x >= 10 ** digits:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def fmt_bytes(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def fmt_x(v: Optional[float]) -> str:
    return f"{v:.2f}x" if v else "-"


def status(r: Optional[dict], width: int = 48) -> str:
    """A row's check column: its error (shortened), FAIL <<<, PASS or n/a."""
    if r is None:
        return "-"
    if r.get("error"):
        return r["error"] if len(r["error"]) <= width else r["error"][:width - 3] + "..."
    return "FAIL <<<" if r.get("check") == "FAIL" else (r.get("check") or "n/a")


# ----------------------------------------------------------------------------------------------------- progress
class Progress:
    """One self-overwriting stderr line on a terminal; plain lines when stderr is a file or pipe (CI logs)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        text = f"[{self.done:>{len(str(self.total))}}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {label}"
        self.stream.write(("\r\033[K" + text) if self.tty else (text + "\n"))
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must stay visible (e.g. a FAIL), printed above the progress line."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------------- plots
def panels(rows: List[dict], title: Callable[[dict], str], curve: Callable[[dict], str], x: Callable[[dict], float],
           y: Callable[[dict], Optional[float]]) -> Dict[str, Dict[str, list]]:
    """{panel title: {curve label: sorted [(x, y)]}} from result rows (rows whose y is None are left out)."""
    out: Dict[str, Dict[str, list]] = {}
    for r in rows:
        if y(r) is not None:
            out.setdefault(title(r), {}).setdefault(curve(r), []).append((x(r), y(r)))
    for curves in out.values():
        for pts in curves.values():
            pts.sort()
    return out


def save_grid(grid: Dict[str, Dict[str, list]], ylabel: str, path: Path, xlabel: str = "seqlen",
              logx: bool = True) -> Optional[Path]:
    """One panel per title, one line per curve; None when matplotlib is not installed or nothing to plot."""
    try:
        from matplotlib.figure import Figure   # no pyplot: no GUI backend, no global state
    except ImportError:
        return None
    if not grid:
        return None
    ncols = min(3, len(grid))
    nrows = math.ceil(len(grid) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, curves) in zip(axes, grid.items()):
        for label, pts in sorted(curves.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(grid):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    return path
