"""Where one `flashring train` step spends its GPU time, by kernel, for several attention arms side by side.

    PYTHONPATH=src python3 benchmarks/train_step_profile.py --preset paper-8k --data CORPUS_DIR \
        --arms dense,qk50,hash16 [--steps 3] [--out DIR]

Builds the run exactly as `flashring train` does (`train.loop.Run`, the same options per arm as
benchmarks/paper_experiments.py), takes 3 warm-up steps, then profiles `--steps` steps with torch.profiler and
prints per arm: the step time, the device time summed over kernels, the top kernels by device time, and the
device time of the kernels launched inside the attention cores' forward calls (a profiler range; the backward's
kernels appear in the per-kernel list by name). With `--extra=--cuda-graph` the graph is captured before the
range is added, so that column reads 0 and the kernels still show. Written to answer issue 14's open question:
why the QK-sparse step is ~19 ms slower than its isolated attention time predicts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from flashring.train.config import from_argv
from flashring.train.loop import Env, Run, train_step
from flashring.train.model import CausalAttention
from paper_experiments import ARMS


def mark_attention(model: torch.nn.Module) -> None:
    """Wrap every attention core's forward in a profiler range (its backward shows as autograd nodes)."""
    for m in model.modules():
        if isinstance(m, CausalAttention):
            fwd = m.forward

            def ranged(*a, _fwd=fwd, **kw):
                with record_function("attention_core"):
                    return _fwd(*a, **kw)
            m.forward = ranged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper-8k")
    p.add_argument("--data", required=True)
    p.add_argument("--arms", default="dense,qk50,hash16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", help="write train-step-profile-<preset>.json (the per-arm summary) here")
    p.add_argument("--trace", action="store_true", help="also write profile-<preset>-<arm>.json chrome traces "
                                                         "(large) to --out")
    p.add_argument("--extra", default="", help="more `flashring train` options (one string)")
    args = p.parse_args(argv)
    rows = []
    for arm in args.arms.split(","):
        cfg = from_argv(["--preset", args.preset, "--data", args.data, "--no-save", *ARMS[arm], *args.extra.split()])
        run = Run(cfg, Env(cfg))
        mark_attention(run.raw_model)
        for _ in range(3):
            train_step(run)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            for _ in range(args.steps):
                train_step(run)
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
        cuda = run.device.type == "cuda"          # on a CPU (a check of this script) CPU op time stands in
        kernels = defaultdict(float)
        events = prof.key_averages()
        for e in events:
            if cuda:
                t = (getattr(e, "self_device_time_total", 0) or 0) \
                    if e.device_type == torch.autograd.DeviceType.CUDA else 0
            else:
                t = e.self_cpu_time_total if not e.key.startswith(("attention_core", "ProfilerStep")) else 0
            if t:
                kernels[e.key] += t / args.steps / 1e3
        attn = next(((getattr(e, "device_time_total", 0) if cuda else e.cpu_time_total)
                     for e in events if e.key == "attention_core"), 0) / args.steps / 1e3
        total = sum(kernels.values())
        print(f"== {arm}: {step_ms:.1f} ms/step (profiled), kernels {total:.1f} ms, attention forward range "
              f"{attn:.1f} ms")
        for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"   {ms:8.2f} ms  {name[:100]}")
        rows.append({"arm": arm, "step_ms": step_ms, "kernel_ms": total, "attention_forward_ms": attn,
                     "top": sorted(kernels.items(), key=lambda kv: -kv[1])[:40]})
        if args.out and args.trace:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(Path(args.out) / f"profile-{args.preset}-{arm}.json"))
        del run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"train-step-profile-{args.preset}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
