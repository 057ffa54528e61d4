"""Front-end cost of the dynamic sparse calls, measured on CPU with every Triton kernel stubbed out.

What this counts is the work *around* the kernels (compaction, side tensors, tile-range tables, scatter-back and
their autograd), which on a GPU is a stream of small launches plus any host sync:
- ``aten`` ops at the top level of the call (nested ops, e.g. ``copy_`` inside ``to``, are not counted twice;
  views and bare allocations are listed apart: they launch nothing on a GPU),
- host syncs: ``aten::_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``) and ``nonzero``,
- Triton launches (counted by the stubs),
- CPU wall time of one fwd+bwd call with the kernels stubbed (median of ``--repeats``).

The Triton interpreter is switched on so CPU tensors take the same launcher path as CUDA tensors.

    PYTHONPATH=src python benchmarks/sparse_frontend.py [--batch 2 --seqlen 2048 --nheads 8 --headdim 64]
"""
import argparse
import collections
import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import flashring  # noqa: E402
from flashring.ops import flash, partition, sparse_ranges  # noqa: E402

VIEWS = {"view", "as_strided", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select", "t", "permute",
         "alias", "detach", "_reshape_alias", "unflatten", "flatten", "narrow", "lift_fresh", "split", "unbind",
         "reshape", "contiguous", "_unsafe_view", "expand_as", "view_as", "chunk", "numpy_T", "unsafe_split"}
ALLOCS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "resize_"}
SYNCS = {"_local_scalar_dense", "nonzero", "item", "is_nonzero"}


class _Stub:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` only counts the launch."""

    def __init__(self, name, counter):
        self.name, self.counter = name, counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter[self.name] += 1
        return launch


def stub_kernels(counter):
    for module in (flash, partition, sparse_ranges):
        for name in dir(module):
            obj = getattr(module, name)
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                setattr(module, name, _Stub(name, counter))
            elif type(obj).__name__ == "Launcher":           # ops.launch wrappers launch their own kernel
                obj.kernel, obj.fast = _Stub(name, counter), False


def make_inputs(kind, b, s, h, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g, dtype=torch.bfloat16).requires_grad_() for _ in range(3))
    if kind == "qk":
        qa, ka = (torch.rand(b, s, h, generator=g) > 0.5 for _ in range(2))
    else:
        qa = ka = torch.randint(0, 8, (b, s, h), generator=g)
    do = torch.randn(b, s, h, d, generator=g, dtype=torch.bfloat16)
    return q, k, v, qa, ka, do


def call(kind, q, k, v, qa, ka, do):
    fn = flashring.qk_sparse_attn_func if kind == "qk" else flashring.hash_sparse_attn_func
    for t in (q, k, v):
        t.grad = None                  # no gradient accumulation (an add_ per input) in what is measured
    out = fn(q, k, v, qa, ka, causal=True)
    out.backward(do)


def top_level_ops(prof):
    """aten ops with no aten ancestor, by name."""
    counts = collections.Counter()
    for ev in prof.profiler.function_events:
        if not ev.name.startswith("aten::"):
            continue
        p, nested = ev.cpu_parent, False
        while p is not None:
            if p.name.startswith("aten::"):
                nested = True
                break
            p = p.cpu_parent
        if not nested:
            counts[ev.name[6:]] += 1
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nheads", type=int, default=8)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--verbose", action="store_true", help="list the ops")
    args = ap.parse_args()
    torch.set_num_threads(1)
    launches = collections.Counter()
    stub_kernels(launches)
    shape = (args.batch, args.seqlen, args.nheads, args.headdim)
    for kind in ("qk", "hash"):
        inputs = make_inputs(kind, *shape)
        call(kind, *inputs)                                    # warm-up
        launches.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call(kind, *inputs)
        n_launch = dict(launches)
        ops = top_level_ops(prof)
        views = sum(n for o, n in ops.items() if o in VIEWS)
        allocs = sum(n for o, n in ops.items() if o in ALLOCS)
        syncs = sum(n for o, n in ops.items() if o in SYNCS)
        compute = sum(ops.values()) - views - allocs
        # Nested syncs count too (e.g. inside aten::item).
        nested_syncs = sum(1 for ev in prof.profiler.function_events if ev.name == "aten::_local_scalar_dense")
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            call(kind, *inputs)
            times.append(time.perf_counter() - t0)
        print(f"{kind}-sparse fwd+bwd {shape}: {compute} aten compute ops (+{views} views, {allocs} allocs), "
              f"{max(syncs, nested_syncs)} host syncs, {sum(n_launch.values())} Triton launches "
              f"{n_launch}; front-end CPU time {statistics.median(times) * 1e3:.2f} ms (median of "
              f"{args.repeats})")
        if args.verbose:
            for o, n in sorted(ops.items(), key=lambda x: -x[1]):
                tag = "view" if o in VIEWS else "alloc" if o in ALLOCS else "sync" if o in SYNCS else ""
                print(f"    {n:3d} {o} {tag}")


if __name__ == "__main__":
    main()
