"""``flashring bench [SUITE] [options]``: one harness (``bench.harness``), several suites.

    flashring bench                  # = flashring bench dense: GPU -> the full table; CPU -> a small quick run
    flashring bench sparse           # dynamic sparse vs dense, FlexAttention
    flashring bench ring             # ring attention (torchrun on GPUs; --cpu --nproc N spawns gloo ranks)
    flashring bench tune             # tile-configuration sweep of the Triton kernels
    flashring bench decode           # KV-cache decode (bandwidth-bound inference step)
    flashring bench varlen           # packed variable-length batches

Every suite checks each provider against the float64 reference before timing it, prints a table last and writes
``<device>-<suite>-<date>-<sha>.jsonl`` (a metadata line, then rows) under ``--out`` (default
``./flashring-results``). Exit codes: 0 ok, 1 a correctness check FAILed, 2 bad arguments.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

SUITES = {
    "dense": ("flashring.bench.dense", "flashring vs PyTorch's SDPA backends, FlexAttention and naive attention"),
    "sparse": ("flashring.bench.sparse", "QK-sparse / hash-sparse vs dense causal attention and FlexAttention"),
    "ring": ("flashring.bench.ring", "ring attention over a process group vs one device"),
    "tune": ("flashring.bench.tune", "tile-configuration sweep of the Triton kernels"),
    "decode": ("flashring.bench.decode", "one-token decode over a KV cache: flashring (contiguous, paged) vs SDPA "
                                         "backends, GB/s and share of copy bandwidth"),
    "varlen": ("flashring.bench.varlen", "packed variable-length batches vs one sequence of the same tokens and "
                                         "padded SDPA"),
}
LEGACY_FLAGS = {"--sparse": "sparse", "--ring": "ring"}


def usage() -> str:
    lines = ["usage: flashring bench [SUITE] [options]", "", "suites (default: dense):"]
    lines += [f"  {name:<8}{help_}" for name, (_, help_) in SUITES.items()]
    lines += ["", "`flashring bench SUITE --help` lists a suite's options."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(usage())
        return 0
    suite = "dense"
    if argv and not argv[0].startswith("-"):
        suite, argv = argv[0], argv[1:]
        if suite not in SUITES:
            print(f"flashring bench: unknown suite {suite!r}\n\n{usage()}", file=sys.stderr)
            return 2
    for flag, name in LEGACY_FLAGS.items():          # `flashring bench --sparse ...` from earlier releases
        if flag in argv:
            suite, argv = name, [a for a in argv if a != flag]
    module = importlib.import_module(SUITES[suite][0])
    return int(module.main(argv) or 0)
