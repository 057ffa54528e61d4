"""Run a function on N real processes joined by a process group (gloo on CPU; nccl with one GPU per rank), with a
hard timeout.

Used by the ring-attention tests: each worker calls ``fn(rank, world_size, *args)`` between
``init_process_group`` and ``destroy_process_group`` and sends back its return value or its traceback.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, List


def free_port() -> int:
    # Ask the OS for an unused port. Another process could grab it before rank 0 binds it; the window is tiny.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, results, args, pg_timeout_s, backend="gloo"):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)          # N processes on a 2-core CI box: more threads only contend
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        results.put((rank, True, fn(rank, world_size, *args)))
        # Leave together: tearing gloo down while a peer is still busy was seen to abort a process now and then.
        dist.barrier()
    except BaseException:             # report everything, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float = 60.0,
                    pg_timeout_s: float = 30.0, backend: str = "gloo") -> List[Any]:
    """Spawn ``world_size`` processes running ``fn(rank, world_size, *args)``; return their results by rank.

    Raises AssertionError with every failing rank's traceback, or if the group does not finish within
    ``timeout_s`` (the processes are then killed: a hang fails the test instead of stalling the suite).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, args, pg_timeout_s, backend),
                         daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"distributed run timed out after {timeout_s:.0f}s; ranks that finished: "
                                     f"{sorted(got)}")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
                got[rank] = (ok, value)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    raise AssertionError(f"rank(s) {dead} died without a result (exit codes "
                                         f"{[procs[r].exitcode for r in dead]})")
    finally:
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()) if len(got) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    errors = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
    if errors:
        raise AssertionError("distributed workers failed:\n" + "\n".join(errors))
    return [got[r][1] for r in range(world_size)]


__all__ = ["free_port", "run_distributed"]
