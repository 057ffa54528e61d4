"""Helpers for ``flashring bench``: timing, peak memory, the text table, run metadata, progress and plots.

Nothing here knows about attention; ``flashring.bench`` owns the providers, the sweep and the checks.
"""
from __future__ import annotations

import datetime
import gc
import math
import platform
import statistics
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

# H100 SXM has 50 MB of L2; used when the device does not report its own size (and on CPU, where it only decides
# how many input copies to rotate through).
DEFAULT_L2_BYTES = 50 * 2**20
CPU_MIN_S = 0.02


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_L2_BYTES)
    return DEFAULT_L2_BYTES


def is_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or an allocator failure surfaced as a plain RuntimeError (e.g. on CPU)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Drop cached blocks after an OOM or between shapes so the next provider starts from a clean allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------- timing
def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, rep_ms: int, warmup_ms: int) -> float:
    """Median milliseconds per call of ``fn``.

    CUDA: ``triton.testing.do_bench`` (warm-up, L2 flush between calls, CUDA events, median over ~``rep_ms`` of
    calls). CPU: one warm-up call, then the median of at least ``repeats`` wall-clock timings, more (up to 50) while
    less than ``CPU_MIN_S`` has elapsed: a sub-millisecond call preempted once on a busy 2-core CI box reads 30x
    slow, and a median over ~20 samples shrugs that off where one over 3 does not.
    """
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < max(1, repeats) or (time.perf_counter() - start < CPU_MIN_S and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


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


# ----------------------------------------------------------------------------------------------------- metadata
def git_sha() -> Optional[str]:
    """HEAD of the checkout this package runs from, ``-dirty`` if tracked files differ; None without git.
    A checkout copied without .git (e.g. onto a GPU machine) passes its sha in FLASHRING_GIT_SHA."""
    if os.environ.get("FLASHRING_GIT_SHA"):
        return os.environ["FLASHRING_GIT_SHA"]
    here = str(Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def run_metadata(device: torch.device, argv: Sequence[str]) -> Dict[str, object]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import __version__
    from .ops import flash
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "type": "meta",
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "flashring": __version__,
        "flashring_cpu_backend": flash.CPU_BACKEND,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv),
    }


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
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
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
def plot_results(results: List[dict], stem: Path) -> List[Path]:
    """TFLOP/s vs seqlen (one panel per dtype/headdim/causal/mode, one line per provider) and, when memory was
    measured, fwd+bwd peak memory vs seqlen. Returns the PNGs written; [] when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure   # no pyplot: no GUI backend, no global state
    except ImportError:
        return []
    ok = [r for r in results if r["ms"] is not None]
    written = []
    perf = _panels(ok, ("dtype", "headdim", "causal", "mode"), "tflops")
    if perf:
        written.append(_save_grid(Figure, perf, "TFLOP/s", Path(f"{stem}-tflops.png")))
    mem = _panels([r for r in results if r["mem_bytes"] is not None and r["mode"] == "fwd+bwd"],
                  ("dtype", "headdim", "causal", "mode"), "mem_bytes", scale=2.0**-20)
    if mem:
        written.append(_save_grid(Figure, mem, "peak extra memory (MiB)", Path(f"{stem}-memory.png")))
    return written


def _panels(rows: List[dict], keys: Sequence[str], field: str, scale: float = 1.0):
    """{panel title: {provider: sorted [(seqlen, value)]}}"""
    panels: Dict[str, Dict[str, list]] = {}
    for r in rows:
        cfg = dict(r["config"], mode=r["mode"])
        title = " ".join(f"{k}={cfg[k]}" if k != "causal" else ("causal" if cfg[k] else "full") for k in keys)
        panels.setdefault(title, {}).setdefault(r["provider"], []).append((cfg["seqlen_q"], r[field] * scale))
    for lines in panels.values():
        for pts in lines.values():
            pts.sort()
    return panels


def _save_grid(Figure, panels, ylabel: str, path: Path) -> Path:
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, lines) in zip(axes, panels.items()):   # sweep order: dtype, headdim, causal, mode
        for provider, pts in sorted(lines.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("seqlen")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)
    return path
