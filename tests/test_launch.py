"""ops.launch: the launch-site wrapper must launch exactly what Triton's own path launches.

On CPU (interpreter) it must fall back to the generic path; on a GPU the second call of a specialisation takes the
fast path with a bitwise-identical result, and a call whose arguments specialise differently (a pointer that is not
16-byte aligned) compiles its own variant instead of reusing one built on that assumption."""
import pytest
import torch

from flashring import flash_attn_func, flash_attn_with_kvcache
from flashring.ops import decode, flash, launch
from flashring.masks import flash_bounds
from flashring.testing import assert_close, reference_pair


def test_grid_helpers_match_triton():
    import triton
    for n in range(1, 3000):
        assert launch.next_power_of_2(n) == triton.next_power_of_2(n)
        assert launch.cdiv(n, 7) == triton.cdiv(n, 7) and launch.cdiv(n, 64) == triton.cdiv(n, 64)
    assert launch.cdiv(0, 64) == 0


def _decode_inputs(device, b=3, sk=70, h=4, hk=2, d=32, dtype=torch.float32):
    q = torch.randn(b, 1, h, d, device=device, dtype=dtype)
    k, v = (torch.randn(b, sk, hk, d, device=device, dtype=dtype) for _ in range(2))
    return q, k, v


def test_interpreter_falls_back(seed):
    if torch.cuda.is_available():
        pytest.skip("CPU: the interpreter path")
    from flashring.ops import dispatch
    q, k, v = _decode_inputs("cpu")
    before = decode.LAUNCH_DECODE.fast_calls
    old = dispatch.CPU_BACKEND
    dispatch.CPU_BACKEND = "triton"
    try:
        out = flash_attn_with_kvcache(q, k, v)
    finally:
        dispatch.CPU_BACKEND = old
    assert not decode.LAUNCH_DECODE.fast and decode.LAUNCH_DECODE.fast_calls == before
    refs = reference_pair(q, k, v, None)
    assert_close(out, refs["ref"]["out"], refs["low"]["out"], 2.0, "decode via Launcher (interpreter)", seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_bitwise_and_respecialises(dtype, seed):
    q, k, v = _decode_inputs("cuda", b=5, sk=333, h=8, hk=2, d=64, dtype=dtype)
    first = flash_attn_with_kvcache(q, k, v)            # may compile: the generic path
    calls = decode.LAUNCH_DECODE.fast_calls
    second = flash_attn_with_kvcache(q, k, v)
    assert decode.LAUNCH_DECODE.fast_calls == calls + 1, "the repeated specialisation did not take the fast path"
    assert torch.equal(first, second)
    refs = reference_pair(q, k, v, None)
    assert_close(second, refs["ref"]["out"], refs["low"]["out"], 2.0, "decode, fast launch", seed)
    # q two elements into a buffer: 4-byte aligned, not 16: a different specialisation, compiled on its own
    buf = torch.empty(q.numel() + 2, device="cuda", dtype=dtype)
    q_odd = buf[2:].view(q.shape).copy_(q)
    assert q_odd.data_ptr() % 16
    odd = flash_attn_with_kvcache(q_odd, k, v)
    assert torch.equal(odd, second)
    assert len({key[1] for key in decode.LAUNCH_DECODE.compiled}) >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_kernels_take_fast_path(seed):
    q, k, v = (torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    outs = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
        outs.append((out.detach().clone(), q.grad.clone()))
        q.grad = k.grad = v.grad = None
    assert flash.LAUNCH_FWD.fast_calls >= 1 and flash.LAUNCH_BWD_DQ.fast_calls >= 1
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_addresses_replace_cuda_tensors_only():
    t = torch.ones(3)
    values = [t, 5, None, 0.5, "x"]
    assert launch.addresses(values) == values        # a CPU tensor stays a tensor: Triton's own error for it


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_int_pointers_and_raw_run_launch_the_same(seed):
    """Every combination of the two host-time switches launches the same kernel; with a Triton launch hook
    registered the hook is called (Triton's runner) and the result is unchanged."""
    from triton import knobs
    q, k, v = _decode_inputs("cuda", b=4, sk=517, h=8, hk=2, d=64, dtype=torch.bfloat16)
    assert launch.addresses([q]) == [q.data_ptr()]
    outs, seen = [], []
    old = launch.INT_POINTERS, launch.RAW_RUN
    try:
        for flags in ((False, False), (True, False), (False, True), (True, True), (True, True)):
            launch.INT_POINTERS, launch.RAW_RUN = flags
            hook = len(outs) == 4
            if hook:
                knobs.runtime.launch_enter_hook.add(seen.append)
            calls = decode.LAUNCH_DECODE.fast_calls
            try:
                outs.append(flash_attn_with_kvcache(q, k, v, causal=True))
            finally:
                knobs.runtime.launch_enter_hook.remove(seen.append)
            if len(outs) > 1:                       # the first call may compile (Triton's own path)
                assert decode.LAUNCH_DECODE.fast_calls == calls + 1
    finally:
        launch.INT_POINTERS, launch.RAW_RUN = old
    assert len(seen) >= 1, "a registered launch hook was not called"
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    refs = reference_pair(q, k, v, None, **dict(zip(("lower", "upper"), flash_bounds(1, k.shape[1], True, (-1, -1)))))
    assert_close(outs[-1], refs["ref"]["out"], refs["low"]["out"], 2.0, "decode, int pointers", seed)
