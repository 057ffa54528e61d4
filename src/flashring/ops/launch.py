"""Kernel launches with less host time: ``Launcher(kernel)[grid](*args, **kwargs)`` behaves like
``kernel[grid](...)`` but, once a specialisation has been compiled, goes straight to the compiled kernel.

Why: a decode step is a few microseconds of GPU work, and on the H100 machine a launch through Triton 3.6's
generic path cost 46.8-50.4 us of host time, of which the argument binder 12-14 us and the compiled kernel's own
C launcher 24 us (benchmarks/launch_overhead.py, 2026-11-23); flashring's decode took 100-200 us of host time per
call where its kernels ran 7-190 us, against 17-34 us for torch's SDPA. Here each call runs Triton's own argument
binder (native code: the same specialisation, dtypes, 16-byte alignment and ``== 1`` integer checks that select a
compiled variant), looks the result up in a dict, and calls the compiled kernel's launcher (37.9-38.8 us in all);
an unseen specialisation takes Triton's normal path, which compiles it, and is remembered. Anything unexpected
(the interpreter, another Triton whose internals differ) falls back to the normal path for good.

CUDA tensors reach the compiled launcher as their addresses (ints): given a tensor, Triton 3.6's C launcher calls
its ``data_ptr`` and asks the driver (``cuPointerGetAttribute``) whether the address is a device pointer, once per
pointer argument; given an int it takes the address as it is. The check is for CPU tensors passed by mistake, which
flashring's front ends rule out before any launch (a CPU tensor still goes through as a tensor and gets Triton's
error). ``FLASHRING_INT_POINTERS=1`` turns this on (off by default until timed on a GPU).

And the launch calls the compiled kernel's ``run`` (its C launcher) itself, as ``CompiledKernel.__getitem__``'s
runner does, without the launch hooks when none is registered: Triton's hook chains are objects, never None, so its
runner builds a launch-metadata dict and its C launcher calls both (empty) chains back into Python on every launch.
With a hook registered (Triton's profiler) the runner is used as it is. ``FLASHRING_RAW_RUN=1`` turns this on (off by
default until timed on a GPU).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, Tuple

import torch

from triton.runtime import driver

try:
    from triton import knobs           # Triton >= 3.4
except ImportError:                    # older: no hook chains to read, so every launch takes Triton's runner
    knobs = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Both off until a GPU run has timed them (benchmarks/NOTES.md, session 18): =1 turns them on.
INT_POINTERS = os.environ.get("FLASHRING_INT_POINTERS", "0") == "1"
RAW_RUN = os.environ.get("FLASHRING_RAW_RUN", "0") == "1"


def hooked() -> bool:
    """Whether a Triton launch hook is registered (then launches go through Triton's runner, which calls it)."""
    rt = getattr(knobs, "runtime", None)
    if rt is None:
        return True
    return any(getattr(getattr(rt, name, None), "calls", True) for name in ("launch_enter_hook", "launch_exit_hook"))


def addresses(values):
    """``values`` with each CUDA tensor replaced by its address (see the module docstring), also inside tuples
    (the kernels take (tensor, strides...) tuples as one argument)."""
    return [v.data_ptr() if isinstance(v, torch.Tensor) and v.is_cuda else
            tuple(addresses(v)) if type(v) is tuple else v for v in values]


class Launcher:
    """A launch-site wrapper around one ``@triton.jit`` kernel (see the module docstring)."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: Dict[Tuple[Any, ...], Any] = {}
        self.fast = not INTERPRET and hasattr(kernel, "device_caches")
        self.fast_calls = 0                      # launches that skipped Triton's generic path (tests read it)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        if not self.fast:
            return self.kernel[grid](*args, **kwargs)
        try:
            device = driver.active.get_current_device()
            binder = self.kernel.device_caches[device][4]
            bound, specialization, options = binder(*args, **kwargs)
            key = (device, tuple(specialization), tuple(options.items()))
            compiled = self.compiled.get(key)
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            self.fast = False                    # not the Triton this was written against: generic path only
            return self.kernel[grid](*args, **kwargs)
        if compiled is None:
            compiled = self.kernel[grid](*args, **kwargs)
            if compiled is not None and hasattr(compiled, "run") and not hasattr(compiled, "result"):
                self.compiled[key] = compiled
            return compiled
        grid = tuple(grid) + (1,) * (3 - len(grid))
        values = addresses(bound.values()) if INT_POINTERS else bound.values()
        stream = driver.active.get_current_stream(device)
        if RAW_RUN and not hooked():
            compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None,
                         None, *values)
        else:
            compiled[grid](*values, stream=stream)
        self.fast_calls += 1
        return compiled


# Host-side grid arithmetic. ``triton.cdiv`` / ``triton.next_power_of_2`` are JIT-callable objects whose Python
# call costs ~0.6 us each on the CPU dev box (argument unwrapping; a decode launcher's six calls: 18.4 -> 15.0 us
# of host time without them), several times that on the GPU machines' slower host.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Multiprocessors of CUDA device ``index``, read once (launch sizing on a hot path)."""
    return torch.cuda.get_device_properties(index).multi_processor_count
