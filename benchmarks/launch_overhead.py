"""Host time of one decode launch, piece by piece (GPU): Triton's generic path, ops.launch.Launcher, the binder
alone, the compiled kernel's runner, its raw launcher, a torch.empty, and the public call. Microseconds per call,
calls issued back to back (the GPU work is a few microseconds, so the host is the bottleneck in every loop).

    PYTHONPATH=src python benchmarks/launch_overhead.py
"""
from __future__ import annotations

import argparse
import sys

import torch
from triton.runtime import driver

from flashring import flash_attn_with_kvcache
from flashring.bench import harness as H
from flashring.ops import decode, launch


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_overhead.py: no GPU (it times CUDA launches)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    b, sk, h, hk, d = 16, 2048, 32, 8, 128
    q = torch.randn(b, 1, h, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(b, sk, hk, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, 1, device=dev)
    kv = lambda t: (t, t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    args = ((q, q.stride(0), q.stride(1), q.stride(2)), kv(k), kv(v), (out, out.stride(0), out.stride(1),
            out.stride(2)), (lse, lse.stride(0), lse.stride(1)), None, None, None, (None, None, sk), (None, 0), None,
            (1, h), (0.1, 0.0, 0.1), (0, 0))
    kw = dict(GROUP=h // hk, HEAD_DIM=d, BLOCK_D=d, BLOCK_M=16, NUM_SPLITS=1, HAS_LOWER=False, HAS_UPPER=False,
              HAS_SOFTCAP=False, PAGED=False, PAGE=1, HAS_CACHE_IDX=False, HAS_START=False, END_PER_ROW=False,
              PRECISION="tf32", BLOCK_S=1, BLOCK_N=64, num_warps=4, num_stages=3)
    grid = (1, hk, b)
    jit = decode._decode_fwd
    compiled = jit[grid](*args, **kw)
    device = driver.active.get_current_device()
    binder = jit.device_caches[device][4]
    bound, spec, opts = binder(*args, **kw)
    values = list(bound.values())
    stream = driver.active.get_current_stream(device)
    launcher = decode.LAUNCH_DECODE
    launcher[grid](*args, **kw)
    run = compiled.run
    ints = launch.addresses(values)

    def launcher_with(int_pointers: bool, raw_run: bool):
        def call():
            launch.INT_POINTERS, launch.RAW_RUN = int_pointers, raw_run
            launcher[grid](*args, **kw)
        return call
    rows = [
        ("triton generic kernel[grid](...)", lambda: jit[grid](*args, **kw)),
        ("Launcher, tensors, Triton's runner", launcher_with(False, False)),
        ("Launcher, int pointers, runner", launcher_with(True, False)),
        ("Launcher, int pointers, raw run", launcher_with(True, True)),
        ("binder only", lambda: binder(*args, **kw)),
        ("driver device + stream", lambda: driver.active.get_current_stream(driver.active.get_current_device())),
        ("compiled[grid](*values, stream)", lambda: compiled[grid](*values, stream=stream)),
        ("compiled.run(...) raw", lambda: run(grid[0], grid[1], grid[2], stream, compiled.function,
                                              compiled.packed_metadata, None, None, None, *values)),
        ("compiled.run(...) raw, int pointers", lambda: run(grid[0], grid[1], grid[2], stream, compiled.function,
                                                            compiled.packed_metadata, None, None, None, *ints)),
        ("addresses(values)", lambda: launch.addresses(values)),
        ("torch.empty x1", lambda: torch.empty(b, 1, h, d, device=dev, dtype=torch.bfloat16)),
        ("decode.attention (1 split)", lambda: decode.attention(q, k, v, None, sk, 0.1, None, None, 0.0,
                                                                num_splits=1)),
        ("decode.attention (auto splits)", lambda: decode.attention(q, k, v, None, sk, 0.1, None, None, 0.0)),
        ("flash_attn_with_kvcache", lambda: flash_attn_with_kvcache(q, k, v)),
        ("torch SDPA", lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)),
    ]
    launch.INT_POINTERS = launch.RAW_RUN = True
    for name, fn in rows:
        print(f"{name:<36} {H.host_us(fn, dev, n=2000):8.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
