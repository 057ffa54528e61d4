"""``flashring bench --ring``: ring attention across the ranks of a process group.

GPU (NCCL), one process per GPU::

    torchrun --nproc-per-node 2 -m flashring.ring.bench --seqlen 16384 65536 --out benchmarks/results
    flashring bench --ring ...            # same options, when launched under torchrun

CPU (gloo), small sizes, spawns its own processes::

    python -m flashring.ring.bench --cpu --nproc 2

For every global sequence length N (local N/P per rank) it measures, forward + backward:

* ``ring``: ring attention with communication (max over ranks: the slowest rank sets the pace);
* ``compute``: the same ring steps and kernel calls on the local K/V, no communication (``LoopbackComm``);
* ``single``: flashring's single-device kernel (``flash_attn_func``) on the full sequence, run by every rank on
  its own device; ``ideal = single / P`` is perfect scaling, ``efficiency = ideal / ring``;
* peak memory per device (CUDA: ``max_memory_allocated``; CPU: process peak RSS).

``--probe`` then doubles N until a size is predicted not to fit (peak memory grows linearly in N for flash and
ring attention: the next size's peak is extrapolated from the measured one and compared with the free memory of
every rank, so no rank runs out of memory mid-ring while its peers wait) or a step exceeds ``--probe-seconds``.
Results go to stdout (rank 0) and as JSON lines to ``--out/ring_<date>.jsonl``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from .._benchutil import git_sha

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashring bench --ring", description=__doc__.split("\n\n")[0])
    p.add_argument("--ring", action="store_true", help=argparse.SUPPRESS)   # passed through by `flashring bench`
    p.add_argument("--cpu", action="store_true", help="run on CPU with gloo, spawning --nproc processes")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn with --cpu (default 2)")
    p.add_argument("--seqlen", type=int, nargs="+", default=None,
                   help="global sequence lengths (default GPU: 8192 32768 131072; CPU: 256 512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--nheads", type=int, default=None, help="query heads (default GPU 32, CPU 2)")
    p.add_argument("--nheads-k", type=int, default=None, help="K/V heads (GQA); default = nheads")
    p.add_argument("--headdim", type=int, default=None, help="default GPU 128, CPU 32")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default GPU bf16, CPU fp32")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default GPU 10, CPU 3)")
    p.add_argument("--no-single", dest="single", action="store_false",
                   help="skip the single-device full-sequence baseline (e.g. when it does not fit)")
    p.add_argument("--probe", action="store_true", help="probe the longest sequence that fits (see above)")
    p.add_argument("--probe-max", type=int, default=1 << 20, help="stop the probe at this global length")
    p.add_argument("--probe-seconds", type=float, default=60.0,
                   help="stop the probe once one fwd+bwd step takes longer than this")
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON lines file")
    return p


def _fill_defaults(args, cpu: bool) -> None:
    gpu_cpu = dict(seqlen=([8192, 32768, 131072], [256, 512]), nheads=(32, 2), headdim=(128, 32),
                   dtype=("bf16", "fp32"), iters=(10, 3))
    for name, (g, c) in gpu_cpu.items():
        if getattr(args, name) is None:
            setattr(args, name, c if cpu else g)
    if args.nheads_k is None:
        args.nheads_k = args.nheads


# ---------------------------------------------------------------------------------------------------- helpers
def _env_info(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return dict(device=name, torch=torch.__version__, triton=triton_version, git_sha=git_sha() or "unknown",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                backend=dist.get_backend() if dist.is_initialized() else None)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], None], device, warmup: int, iters: int) -> float:
    """Mean milliseconds per call; CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if dist.is_initialized():
        dist.barrier()                    # start every rank together: the ring runs at the slowest rank's pace
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def _peak_bytes(fn: Callable[[], None], device) -> int:
    """Peak device memory during one call (CUDA), or the process's peak RSS so far (CPU, an upper bound)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device)
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def _gather_floats(x: float, device) -> List[float]:
    if not dist.is_initialized():
        return [x]
    dev = device if (device.type == "cuda" and dist.get_backend() == "nccl") else torch.device("cpu")
    t = torch.tensor([float(x)], dtype=torch.float64, device=dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.item() for o in out]


def _attn_flops(b, h, n, d, causal) -> float:
    # fwd: 2 matmuls of 2*n*n*d flops per head; causal keeps half; bwd = 2.5 x fwd (FlashAttention-2 convention).
    return 3.5 * 4.0 * b * h * n * n * d * (0.5 if causal else 1.0)


class _Case:
    """Inputs and callables for one global sequence length."""

    def __init__(self, args, n: int, device, world: int):
        self.n, self.local = n, n // world
        dt = _DTYPES[args.dtype]
        g = torch.Generator(device="cpu").manual_seed(1234 + n)
        shape = lambda h, s: (args.batch, s, h, args.headdim)  # noqa: E731
        mk = lambda h, s: torch.randn(shape(h, s), generator=g).to(device=device, dtype=dt)  # noqa: E731
        full = [mk(args.nheads, self.local), mk(args.nheads_k, self.local), mk(args.nheads_k, self.local)]
        # Random local shards stand in for shard_sequence() of a full tensor: the timing does not depend on values,
        # and no rank has to hold the full sequence (which the longest-sequence probe could not afford).
        self.qkv = [t.requires_grad_() for t in full]
        self.do = torch.randn(shape(args.nheads, self.local), generator=g).to(device=device, dtype=dt)
        self.args, self.device = args, device

    def ring_step(self, loopback: bool) -> Callable[[], None]:
        from .attention import LoopbackComm, _RingAttnFn, ring_flash_attn_func
        from ..interface import _check_scale
        scale = _check_scale(None, self.args.headdim)

        def step():
            for t in self.qkv:
                t.grad = None
            if loopback:
                out, _ = _RingAttnFn.apply(*self.qkv, scale, self.args.causal, self.args.layout, None, LoopbackComm)
            else:       # the public entry point: its cross-rank input check (one tiny all_gather) is timed too
                out = ring_flash_attn_func(*self.qkv, causal=self.args.causal, layout=self.args.layout)
            out.backward(self.do)
        return step

    def single_step(self) -> Callable[[], None]:
        from ..interface import flash_attn_func
        a, dt = self.args, _DTYPES[self.args.dtype]
        g = torch.Generator(device="cpu").manual_seed(99 + self.n)
        mk = lambda h: torch.randn(a.batch, self.n, h, a.headdim, generator=g).to(self.device, dt).requires_grad_()  # noqa: E731,E501
        q, k, v = mk(a.nheads), mk(a.nheads_k), mk(a.nheads_k)
        do = torch.randn(q.shape, generator=g).to(self.device, dt)

        def step():
            for t in (q, k, v):
                t.grad = None
            flash_attn_func(q, k, v, causal=a.causal).backward(do)
        return step


def _free_bytes(device) -> Optional[int]:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _run(args, rank: int, world: int, device) -> int:
    info = _env_info(device)
    base = dict(info, world=world, layout=args.layout, causal=args.causal, dtype=args.dtype, batch=args.batch,
                nheads=args.nheads, nheads_k=args.nheads_k, headdim=args.headdim)
    records: List[Dict] = []
    for n in args.seqlen:
        parts = 2 * world if args.layout == "zigzag" else world
        if n % parts:
            raise SystemExit(f"--seqlen {n} must be divisible by {parts} for layout={args.layout} on {world} ranks")
        case = _Case(args, n, device, world)
        ring_fn, comp_fn = case.ring_step(False), case.ring_step(True)
        ring_ms = _gather_floats(_time_ms(ring_fn, device, args.warmup, args.iters), device)
        comp_ms = _gather_floats(_time_ms(comp_fn, device, args.warmup, args.iters), device)
        mem = _gather_floats(_peak_bytes(ring_fn, device), device)
        rec = dict(base, kind="ring", seqlen=n, seqlen_local=case.local, ring_ms=max(ring_ms), ring_ms_per_rank=ring_ms,
                   compute_ms=max(comp_ms), compute_ms_per_rank=comp_ms,
                   comm_overhead=max(ring_ms) / max(comp_ms) - 1.0,
                   peak_mem_gib_per_rank=[m / 2**30 for m in mem], peak_mem_kind=(
                       "max_memory_allocated" if device.type == "cuda" else "process peak RSS"),
                   ring_tflops_per_device=_attn_flops(args.batch, args.nheads, n, args.headdim, args.causal)
                   / world / (max(ring_ms) * 1e-3) / 1e12)
        del case, ring_fn, comp_fn
        if args.single:
            single = _Case(args, n, device, world).single_step()
            single_ms = _time_ms(single, device, args.warmup, args.iters)
            single_mem = _peak_bytes(single, device)
            rec.update(single_ms=single_ms, single_peak_mem_gib=single_mem / 2**30, ideal_ms=single_ms / world,
                       efficiency=single_ms / world / max(ring_ms))
            del single
        records.append(rec)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.probe:
        records += _probe(args, base, rank, world, device)
    if rank == 0:
        _report(args, records)
    return 0


def _probe(args, base, rank, world, device) -> List[Dict]:
    """Double N from the largest benchmarked length; stop on predicted OOM, time limit or --probe-max."""
    out = []
    n, last_peak, reason = max(args.seqlen), None, f"reached --probe-max {args.probe_max}"
    while n <= args.probe_max:
        if last_peak is not None:
            free = _gather_floats(_free_bytes(device) or float("inf"), device)
            need = 2.0 * last_peak      # memory is linear in N for flash/ring attention
            if any(need > f for f in free):
                reason = f"N={n} predicted to need {need / 2**30:.1f} GiB > free {min(free) / 2**30:.1f} GiB"
                break
        case = _Case(args, n, device, world)
        step = case.ring_step(False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        secs = max(_gather_floats(time.perf_counter() - t0, device))
        peak = max(_gather_floats(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0, device))
        out.append(dict(base, kind="ring_probe", seqlen=n, seqlen_local=n // world, step_s=secs,
                        peak_mem_gib=peak / 2**30))
        del case, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # Resident memory beyond the live tensors (allocator state, comm buffers) is in `peak` via the allocator.
        last_peak = peak - (torch.cuda.memory_allocated(device) if device.type == "cuda" else 0)
        if secs > args.probe_seconds / 4:   # the next size (2N) takes ~4x as long
            reason = f"next size N={2 * n} would take ~{4 * secs:.0f}s > --probe-seconds {args.probe_seconds:g}"
            break
        n *= 2
    if out:
        out[-1]["probe_stop"] = reason
    return out


def _report(args, records: List[Dict]) -> None:
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"ring_{stamp}.jsonl")
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    r0 = records[0]
    print(f"ring attention: {r0['world']} x {r0['device']} ({r0['backend']}), layout={args.layout}, "
          f"causal={args.causal}, {args.dtype}, B={args.batch} H={args.nheads} Hk={args.nheads_k} D={args.headdim}; "
          f"torch {r0['torch']}, triton {r0['triton']}, git {r0['git_sha'][:10]}")
    hdr = f"{'seqlen':>9} {'local':>8} {'ring ms':>9} {'compute':>9} {'comm%':>6} {'single':>9} {'ideal':>9} " \
          f"{'eff':>6} {'TFLOP/s':>8} {'mem GiB':>8}"
    print(hdr)
    for r in (r for r in records if r["kind"] == "ring"):
        fmt = lambda k, w=9: f"{r[k]:>{w}.2f}" if k in r else f"{'-':>{w}}"  # noqa: E731
        eff = f"{100 * r['efficiency']:>5.0f}%" if "efficiency" in r else f"{'-':>6}"
        print(f"{r['seqlen']:>9} {r['seqlen_local']:>8} {fmt('ring_ms')} {fmt('compute_ms')} "
              f"{100 * r['comm_overhead']:>5.0f}% {fmt('single_ms')} {fmt('ideal_ms')} {eff} "
              f"{r['ring_tflops_per_device']:>8.1f} {max(r['peak_mem_gib_per_rank']):>8.2f}")
    probes = [r for r in records if r["kind"] == "ring_probe"]
    if probes:
        for r in probes:
            print(f"probe: N={r['seqlen']:>9} step {r['step_s']:.2f}s peak {r['peak_mem_gib']:.2f} GiB/device")
        print(f"probe: longest run N={probes[-1]['seqlen']} ({probes[-1]['probe_stop']})")
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------- launch
def _cpu_worker(rank: int, world: int, port: int, argv: List[str]) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    try:
        args = _parser().parse_args(argv)
        _fill_defaults(args, cpu=True)
        _run(args, rank, world, torch.device("cpu"))
        # Leave together. Without this barrier a worker rarely aborted at teardown ("terminate called without
        # an active exception", 2 of ~40 runs here, not root-caused); ranks exiting in step is the usual cure.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Reached only on success. The barrier made the abort rarer, not gone: a worker that had finished its work
    # and destroyed its group still died of SIGABRT now and then during interpreter shutdown (1 in ~60 runs of
    # the test suite, torch 2.13 CPU), which mp.spawn reports as a failure. Leave without the shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.cpu:
        import socket
        import torch.multiprocessing as mp
        if args.nproc < 1:
            raise SystemExit("--nproc must be >= 1")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_cpu_worker, args=(args.nproc, port, argv), nprocs=args.nproc, join=True)
        return 0
    if not torch.cuda.is_available():
        print("flashring bench --ring: no CUDA device; use --cpu --nproc N for the gloo CPU run", file=sys.stderr)
        return 2
    _fill_defaults(args, cpu=False)
    if "RANK" in os.environ:                       # torchrun
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10))
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
        print("flashring bench --ring: not under torchrun; running a single process (world size 1)",
              file=sys.stderr)
    try:
        rc = _run(args, rank, world, torch.device("cuda", torch.cuda.current_device()))
        if dist.is_initialized():
            dist.barrier()                         # leave together (see _cpu_worker)
        return rc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
