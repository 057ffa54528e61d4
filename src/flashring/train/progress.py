"""The live progress line of ``flashring train``."""
from __future__ import annotations

import math
import sys
from typing import List, Optional


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class ProgressBar:
    """One self-redrawing status line: bar, step, loss, tokens/s and MFU (means over the last 10 steps), ETA.

    Drawn on rank 0 only; ``auto`` draws it when the stream is a terminal, so a log file keeps just the periodic
    lines. ``clear()`` wipes it before a normal line is printed, so the two never interleave.
    """

    WIDTH = 24
    WINDOW = 10

    def __init__(self, total: int, stream=None, mode: str = "auto"):
        self.stream = stream if stream is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.enabled = mode == "on" or (mode == "auto" and isatty())
        self.total = max(1, total)
        self.recent: List[float] = []
        self.shown = False

    def update(self, step: int, loss: float, step_s: float, tokens_per_step: int,
               flops_per_step: float, peak_flops: Optional[float]) -> None:
        if not self.enabled:
            return
        self.recent = (self.recent + [step_s])[-self.WINDOW:]
        mean_s = sum(self.recent) / len(self.recent)
        fill = int(self.WIDTH * min(1.0, step / self.total))
        mfu = "" if not peak_flops else f" | MFU {100 * flops_per_step / mean_s / peak_flops:.1f}%"
        eta = fmt_duration(mean_s * max(0, self.total - step))
        self.stream.write(f"\r\033[K[{'#' * fill}{'.' * (self.WIDTH - fill)}] {step}/{self.total} | "
                          f"loss {loss:.4f} | {tokens_per_step / mean_s / 1e3:.1f}k tok/s{mfu} | ETA {eta}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False
