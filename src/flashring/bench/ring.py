"""``flashring bench ring``: ring attention across the ranks of a process group.

GPU (NCCL), one process per GPU::

    torchrun --nproc-per-node 2 -m flashring bench ring --seqlens 16k,64k

CPU (gloo), small sizes, spawns its own processes::

    flashring bench ring --cpu --nproc 2

For every global sequence length N (local N/P per rank), forward + backward:

* ``ring``: ring attention with communication (slowest rank: it sets the pace);
* ``ring-compute``: the same ring steps and kernel calls on the local K/V, no communication (``LoopbackComm``);
* ``single``: flashring's single-device kernel (``flash_attn_func``) on the full sequence, run by every rank on
  its own device; ``efficiency = single / P / ring`` (1.0 = perfect scaling);
* peak memory per device (CUDA: allocator peak; CPU: process peak RSS).

Before timing, each N is checked: ranks shard the same full inputs (2 heads), run ring attention, and compare
their shard's output with the float64 reference on up to 256 of their query rows (``flashring.testing``'s rule).
``--probe`` then doubles N until a size is predicted not to fit (peak memory is linear in N: the next size's peak is
extrapolated and compared with every rank's free memory, so no rank runs out mid-ring while its peers wait) or a
step exceeds ``--probe-seconds``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import socket
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from . import harness as H
from .. import testing
from ..interface import flash_attn_func
from ..ring.attention import RingAttnFn, ring_flash_attn_func
from ..ring.comm import LoopbackComm, group_rank_world
from ..ring.layout import local_positions, shard_sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashring bench ring", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true",
                   help="run on CPU with gloo, spawning --nproc processes (implied where there is no CUDA device)")
    p.add_argument("--nproc", type=H.positive, default=2, help="processes to spawn with --cpu (default 2)")
    p.add_argument("--seqlens", type=H.csv(H.seqlen), help="global lengths (default GPU: 8k,32k,128k; CPU: 256,512)")
    p.add_argument("--batch", type=H.positive, default=1)
    p.add_argument("--nheads", type=H.positive, help="query heads (default GPU 32, CPU 2)")
    p.add_argument("--nheads-k", type=H.positive, help="K/V heads (GQA); default = nheads")
    p.add_argument("--headdim", type=H.headdim, help="default GPU 128, CPU 32")
    p.add_argument("--dtype", choices=list(H.DTYPES), help="default GPU bf16, CPU fp32")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    p.add_argument("--layout", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--iters", type=H.positive, help="timed calls per row (default GPU 10, CPU 3)")
    p.add_argument("--no-single", dest="single", action="store_false",
                   help="skip the single-device full-sequence baseline (e.g. when it does not fit)")
    p.add_argument("--probe", action="store_true", help="probe the longest sequence that fits (see above)")
    p.add_argument("--probe-max", type=H.seqlen, default=1 << 20, help="stop the probe at this global length")
    p.add_argument("--probe-seconds", type=float, default=60.0,
                   help="stop the probe once one fwd+bwd step takes longer than this")
    H.add_common_args(p)
    return p


def resolve(args):
    if args.device.type == "cpu" and not args.cpu:
        if "RANK" in os.environ:
            raise ValueError("no CUDA device for this torchrun rank; the CPU run spawns its own gloo processes: "
                             "run `flashring bench ring --cpu --nproc N` without torchrun")
        args.cpu = True           # the CPU run: there is no other way to run ring attention here
    cpu = args.cpu
    if args.cpu:
        args.device = torch.device("cpu")
    defaults = dict(seqlens=([8192, 32768, 131072], [256, 512]), nheads=(32, 2), headdim=(128, 32),
                    dtype=("bf16", "fp32"), iters=(10, 3))
    for name, (gpu_value, cpu_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu_value if cpu else gpu_value)
    if args.nheads_k is None:
        args.nheads_k = args.nheads
    if args.nheads % args.nheads_k:
        raise ValueError(f"--nheads {args.nheads} must be divisible by --nheads-k {args.nheads_k}")
    if not cpu and not torch.cuda.is_available():
        raise ValueError("no CUDA device; use --cpu --nproc N for the gloo CPU run")
    if not args.probe_seconds > 0:
        raise ValueError(f"--probe-seconds must be > 0, got {args.probe_seconds}")
    # checked here, before any process starts: a rank that raised inside the ring run left the others waiting
    world = args.nproc if cpu else int(os.environ.get("WORLD_SIZE", "1"))
    parts = 2 * world if args.layout == "zigzag" else world
    bad = [n for n in args.seqlens if n % parts]
    if bad:
        raise ValueError(f"--seqlens {','.join(map(str, bad))}: every length must be divisible by {parts} "
                         f"(--layout {args.layout} on {world} ranks)")
    args.repeats = args.iters
    return None


def _gather(x: float, device) -> List[float]:
    if not dist.is_initialized():
        return [x]
    dev = device if (device.type == "cuda" and dist.get_backend() == "nccl") else torch.device("cpu")
    t = torch.tensor([float(x)], dtype=torch.float64, device=dev)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.item() for o in out]


def _peak_bytes(fn: Callable[[], None], device) -> int:
    """Peak device memory during one call (CUDA), or the process's peak RSS so far (CPU, an upper bound)."""
    if device.type == "cuda":
        H.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        H.sync(device)
        return torch.cuda.max_memory_allocated(device)
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


class Case:
    """Inputs and step callables for one global length. Random local shards stand in for shard_sequence() of a
    full tensor in the timing: values do not change the time, and no rank has to hold the full sequence."""

    def __init__(self, args, n: int, device, world: int, seed: int):
        self.args, self.device, self.n, self.local = args, device, n, n // world
        dt = H.DTYPES[args.dtype]
        g = torch.Generator(device="cpu").manual_seed(seed)
        mk = lambda h, s: torch.randn(args.batch, s, h, args.headdim, generator=g).to(device, dt)  # noqa: E731
        self.qkv = [mk(args.nheads, self.local).requires_grad_(), mk(args.nheads_k, self.local).requires_grad_(),
                    mk(args.nheads_k, self.local).requires_grad_()]
        self.do = mk(args.nheads, self.local)
        self.scale = args.headdim ** -0.5

    def ring_step(self, loopback: bool) -> Callable[[], None]:
        a = self.args

        def step():
            for t in self.qkv:
                t.grad = None
            if loopback:
                out, _ = RingAttnFn.apply(*self.qkv, self.scale, a.causal, a.layout, None, LoopbackComm)
            else:       # the public entry point: its cross-rank input check (one tiny all_gather) is timed too
                out = ring_flash_attn_func(*self.qkv, causal=a.causal, layout=a.layout)
            out.backward(self.do)
        return step

    def single_step(self, seed: int) -> Callable[[], None]:
        a, dt = self.args, H.DTYPES[self.args.dtype]
        g = torch.Generator(device="cpu").manual_seed(seed)
        mk = lambda h: torch.randn(a.batch, self.n, h, a.headdim, generator=g).to(self.device, dt).requires_grad_()  # noqa: E731,E501
        q, k, v = mk(a.nheads), mk(a.nheads_k), mk(a.nheads_k)
        do = torch.randn(q.shape, generator=g).to(self.device, dt)

        def step():
            for t in (q, k, v):
                t.grad = None
            flash_attn_func(q, k, v, causal=a.causal).backward(do)
        return step


def check(args, n: int, rank: int, world: int, device, seed: int, rows: int = 256) -> dict:
    """Ring output vs the float64 reference on up to ``rows`` of this rank's queries (2 heads, same full inputs on
    every rank from ``seed``): ``{"out": {"err", "tol", "ok"}}``."""
    dt, hk = H.DTYPES[args.dtype], min(args.nheads_k, 2)
    h = hk * (args.nheads // args.nheads_k)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(args.batch, n, heads, args.headdim, generator=g).to(device, dt) for heads in (h, hk, hk))
    shard = lambda x: shard_sequence(x, layout=args.layout)  # noqa: E731
    out = ring_flash_attn_func(shard(q), shard(k), shard(v), causal=args.causal, layout=args.layout)
    pos = local_positions(n // world, rank, world, args.layout).to(device)[:rows]
    mask = (torch.arange(n, device=device)[None, :] <= pos[:, None]) if args.causal else None
    refs = testing.reference_pair(q[:, pos], k, v, None, mask=mask)
    return testing.check_all({"out": out[:, :pos.shape[0]]}, refs, dt, names=("out",))


def _run(args, argv, seed: int, rank: int, world: int, device) -> int:
    shape_of = lambda n: H.Shape(args.batch, n, args.nheads, args.headdim, args.causal, H.DTYPES[args.dtype])  # noqa
    run = H.Run(args, device, "ring", argv, seed, world=world, layout=args.layout, nheads_k=args.nheads_k,
                backend=dist.get_backend() if dist.is_initialized() else None) if rank == 0 else None
    results = []

    def time_agreed(fn) -> List[float]:
        # One timing method (harness.time_ms) with a call count every rank shares: collective calls must match.
        return _gather(H.time_ms(fn, device, n_calls=args.iters), device)

    for i, n in enumerate(args.seqlens):
        detail = check(args, n, rank, world, device, seed + i)
        ok = _gather(float(all(d["ok"] for d in detail.values())), device)
        if not all(ok):
            detail["out"]["ok"] = False            # every rank's row reports a failure on any rank
        case = Case(args, n, device, world, seed + i)
        ring_ms = time_agreed(case.ring_step(False))
        comp_ms = time_agreed(case.ring_step(True))
        mem = _gather(_peak_bytes(case.ring_step(False), device), device)
        row = dict(config=dict(shape_of(n).config(), world=world, seqlen_local=n // world, layout=args.layout,
                               nheads_k=args.nheads_k), mode="fwd+bwd", flops=shape_of(n).flops("fwd+bwd"))
        rows = [dict(row, provider="ring", ms=max(ring_ms), ms_per_rank=ring_ms, mem_bytes=int(max(mem)),
                     mem_per_rank=mem, check=H.check_status(detail), check_detail=detail, error=None),
                dict(row, provider="ring-compute", ms=max(comp_ms), ms_per_rank=comp_ms, mem_bytes=None,
                     check=None, check_detail=None, error=None)]
        del case
        if args.single:
            # the whole sequence on one device is what stops fitting first: out of memory is a row, not a crash
            # (no collective runs inside, so a rank may fail here alone)
            single = single_ms = mem_single = error = None
            try:
                single = Case(args, n, device, world, seed + i).single_step(seed + 1000 + i)
                single_ms = H.time_ms(single, device, n_calls=args.iters)
                mem_single = _peak_bytes(single, device)
            except Exception as exc:
                single_ms, error = None, H.reason(exc)
                H.free_memory(device)
            rows.append(dict(row, provider="single", ms=single_ms, mem_bytes=mem_single, check=None,
                             check_detail=None, error=error))
            if single_ms:
                rows[0]["efficiency"] = single_ms / world / max(ring_ms)
            del single
        rows[0]["comm_overhead"] = max(ring_ms) / max(comp_ms) - 1.0
        for r in rows:
            devices = world if r["provider"] != "single" else 1
            r["tflops_per_device"] = r["flops"] / devices / (r["ms"] * 1e-3) / 1e12 if r["ms"] else None
        results += rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.probe:
        results += _probe(args, rank, world, device, seed)
    if run is None:
        return 0
    for r in results:
        run.emit(r, f"{r['provider']} N={r['config']['seqlen_q']}")
    return run.finish(render_table, row_keys=("provider", "config"))


def _probe(args, rank, world, device, seed) -> List[dict]:
    """Double N from the largest benchmarked length; stop on predicted OOM, time limit or --probe-max."""
    out = []
    n, last_peak, why = max(args.seqlens), None, f"reached --probe-max {args.probe_max}"
    while n <= args.probe_max:
        if last_peak is not None:
            free = _gather(torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf"), device)
            need = 2.0 * last_peak      # memory is linear in N for flash/ring attention
            if any(need > f for f in free):
                why = f"N={n} predicted to need {need / 2**30:.1f} GiB > free {min(free) / 2**30:.1f} GiB"
                break
        case = Case(args, n, device, world, seed)
        step = case.ring_step(False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        H.sync(device)
        t0 = time.perf_counter()
        step()
        H.sync(device)
        secs = max(_gather(time.perf_counter() - t0, device))
        peak = max(_gather(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0, device))
        out.append(dict(provider="ring-probe", mode="fwd+bwd", config=dict(seqlen_q=n, world=world),
                        ms=secs * 1e3, mem_bytes=int(peak), check=None, check_detail=None, error=None))
        del case, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
        last_peak = peak - (torch.cuda.memory_allocated(device) if device.type == "cuda" else 0)
        if secs > args.probe_seconds / 4:   # the next size (2N) takes ~4x as long
            why = f"next size N={2 * n} would take ~{4 * secs:.0f}s > --probe-seconds {args.probe_seconds:g}"
            break
        n *= 2
    if out:
        out[-1]["probe_stop"] = why
    return out


def render_table(results: List[dict]) -> str:
    headers = ["seqlen", "world", "local", "ring ms", "compute ms", "comm", "single ms", "efficiency",
               "TFLOP/s/dev", "mem", "check"]
    rows: List[object] = []
    by_n = {}
    for r in results:
        by_n.setdefault(r["config"]["seqlen_q"], {})[r["provider"]] = r
    for n, group in by_n.items():
        ring = group.get("ring")
        if ring is None:
            probe = group["ring-probe"]
            rows.append([n, probe["config"]["world"], "-", H.fmt_num(probe["ms"], 4), "-", "-", "-", "-", "-",
                         H.fmt_bytes(probe["mem_bytes"]), probe.get("probe_stop", "probe")])
            continue
        comp, single = group.get("ring-compute"), group.get("single")
        eff = ring.get("efficiency")
        single_ms = "-" if single is None else (single.get("error") or H.fmt_num(single["ms"], 4))
        rows.append([n, ring["config"]["world"], ring["config"]["seqlen_local"], H.fmt_num(ring["ms"], 4),
                     H.fmt_num(comp["ms"] if comp else None, 4), f"{100 * ring['comm_overhead']:.0f}%",
                     single_ms, "-" if eff is None else f"{100 * eff:.0f}%",
                     H.fmt_num(ring["tflops_per_device"]), H.fmt_bytes(ring["mem_bytes"]), H.status(ring)])
    return H.format_table(headers, rows)


def _cpu_worker(rank: int, world: int, port: int, argv: List[str], seed: int, rcs) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    try:
        args, _, _ = H.parse_cli(build_parser(), resolve, argv, "flashring bench ring")
        rcs[rank] = _run(args, argv, seed, rank, world, torch.device("cpu"))
        dist.barrier()                    # leave together: a gloo rank torn down while a peer is busy can abort
    finally:
        dist.destroy_process_group()
    # Reached only on success. A worker that finished its work and destroyed its group can still die of SIGABRT
    # during interpreter shutdown (gloo teardown, torch 2.13 CPU), which mp.spawn reports as a failure: leave
    # without the shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv or [])
    parsed = H.parse_cli(build_parser(), resolve, argv, "flashring bench ring")
    if isinstance(parsed, int):
        return parsed
    args, _, seed = parsed
    if args.cpu:
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rcs = mp.get_context("spawn").Manager().dict()
        try:
            mp.spawn(_cpu_worker, args=(args.nproc, port, argv + ["--seed", str(seed)], seed, rcs),
                     nprocs=args.nproc, join=True)
        except mp.ProcessRaisedException as exc:   # the rank's traceback is in the message: its last line says why
            last = [line for line in str(exc).splitlines() if line.strip()][-1]
            print(f"flashring bench ring: error: rank {exc.error_index} failed: {last}", file=sys.stderr)
            return 1
        return int(rcs.get(0, 1))
    with H.cpu_threads(args.threads):
        if "RANK" in os.environ:                       # torchrun
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=10))
        rank, world = group_rank_world()
        if world == 1:
            print("flashring bench ring: not under torchrun; running a single process (world size 1)",
                  file=sys.stderr)
        try:
            rc = _run(args, argv, seed, rank, world, torch.device("cuda", torch.cuda.current_device()))
            if dist.is_initialized():
                dist.barrier()                         # leave together (see _cpu_worker)
            return rc
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
