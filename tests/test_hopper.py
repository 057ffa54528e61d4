"""The Hopper forward (ops/hopper.py; ``FLASHRING_HOPPER_FWD`` switches it): which calls it takes, and on an sm_90 GPU
its results through the public API against the float64 reference, including the non-finite rule in the causal
diagonal tile. Its compiled resources for sm_90 are checked without a GPU in test_compile.py."""
import pytest
import torch

import flashring
from flashring.ops import hopper
from flashring.testing import GRAD_FACTOR, OUT_FACTOR, assert_close, attention_ref, reference_pair

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and hopper.AVAILABLE


def test_applies_only_where_the_kernel_is_exact():
    q = torch.empty(2, 256, 4, 128, dtype=torch.bfloat16)
    k = torch.empty(2, 256, 2, 128, dtype=torch.bfloat16)
    assert hopper.applies(q, k, k, None, None, 0.0) and hopper.applies(q, k, k, None, 0, 0.0)
    assert not hopper.applies(q, k, k, None, -2, 0.0)                        # a band other than (strict) causal
    assert not hopper.applies(q, k, k, -16, 0, 0.0)                          # window
    assert not hopper.applies(q, k, k, None, 0, 30.0)                        # softcap
    assert not hopper.applies(q.float(), k.float(), k.float(), None, 0, 0.0)
    short = q[:, :200].contiguous(), k[:, :200].contiguous()
    assert not hopper.applies(short[0], short[1], short[1], None, 0, 0.0)           # S % 128 != 0
    assert not hopper.applies(q, k[:, :128].contiguous(), k[:, :128].contiguous(), None, None, 0.0)   # Sq != Sk
    assert not hopper.applies(q[..., :96], k[..., :96], k[..., :96], None, None, 0.0)
    assert not hopper.applies(q.transpose(1, 2).contiguous().transpose(1, 2), k, k, None, None, 0.0)
    assert not hopper.enabled(torch.device("cpu"), 128)
    # contiguous but 2 bytes past an aligned address (a view at element offset 1): TMA would fault
    flat = torch.randn(q.numel() + 8).bfloat16()
    odd = flat[1:1 + q.numel()].view(q.shape)
    assert odd.is_contiguous() and odd.data_ptr() % 16 and not hopper.applies(odd, k, k, None, 0, 0.0)
    assert hopper.aligned(odd).data_ptr() % 16 == 0 and torch.equal(hopper.aligned(odd), odd)
    assert hopper.aligned(q) is q


def test_launch_grid_and_tile_walk():
    """One program per SM walks the tiles, drawing them from a counter for causal calls (their tiles differ in
    length) and at a fixed stride otherwise; ``programs`` overrides, clamped to [1, tiles]; causal calls interleave
    the (batch, head) pairs in groups whose K/V fits L2. Launch arguments only: no GPU needed (132 SMs are assumed
    off the GPU)."""
    if not hopper.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    q = torch.empty(4, 4096, 4, 128, dtype=torch.bfloat16)
    k = torch.empty(4, 4096, 2, 128, dtype=torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(4, 4, 4096)
    tiles = 4 * 4 * 4096 // hopper.BLOCK_M
    launch = lambda causal, **kw: hopper.launch_args(q, k, k, 0.1, causal, out, lse, **kw)  # noqa: E731
    grid = lambda causal, **kw: launch(causal, **kw)[0]  # noqa: E731
    assert grid(True) == grid(False) == (132, ) and hopper.PERSISTENT
    assert grid(True, programs=3) == grid(False, programs=3) == (3, )
    assert grid(False, programs=0) == (1, ) and grid(False, programs=10 ** 9) == (tiles, )
    dynamic = lambda causal, **kw: launch(causal, **kw)[1][-7]  # noqa: E731
    assert dynamic(True) and not dynamic(False) and not dynamic(True, programs=10 ** 9)
    counter = launch(True)[1][5]
    assert counter.dtype == torch.int32 and counter.shape == (1, ) and counter.item() == 0
    group = lambda causal, **kw: launch(causal, **kw)[1][11]  # noqa: E731
    # 16 MiB of K and V per group: 4096 keys x 128 x 2 bytes x 2 = 2 MiB per head -> 8 pairs (of 16)
    assert group(True) == hopper.head_group(4096, 128, 2) == 8 and group(False) == 1
    assert group(True, heads_per_group=100) == 16 and hopper.head_group(10 ** 6, 256, 4) == 1
    strict = lambda causal, **kw: launch(causal, **kw)[1][-6]  # noqa: E731
    assert strict(True, strict=True) == 1 and strict(True) == strict(False, strict=True) == 0   # strict needs causal


def test_default_head_dims_and_the_switch(monkeypatch):
    monkeypatch.delenv(hopper.ENV, raising=False)
    assert hopper.wanted(128) and hopper.wanted(64) and not hopper.wanted(96)   # default: where it beat the portable
    assert hopper.DEFAULT_HEAD_DIMS == (64, 128)
    monkeypatch.setenv(hopper.ENV, "1")
    assert hopper.wanted(64) and hopper.wanted(128) and hopper.wanted(96)
    monkeypatch.setenv(hopper.ENV, "0")
    assert not hopper.wanted(64) and not hopper.wanted(128)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("odd_one", ["q", "dout"])
def test_misaligned_inputs_and_gradient(odd_one, seed):
    """An odd-offset view (contiguous, 16-byte misaligned): q sends the call to the portable kernels, dout (with
    aligned q, k, v: the Gluon backward) is realigned by a copy. Exact results, no TMA fault."""
    b, s, h, d = 1, 256, 2, 128

    def make(name):
        n = b * s * h * d
        if name == odd_one:
            return torch.randn(n + 8, device="cuda", dtype=torch.bfloat16)[1:1 + n].view(b, s, h, d)
        return torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (make(name).requires_grad_() for name in ("q", "k", "v"))
    dout = make("dout")
    assert (q.data_ptr() % 16 != 0) == (odd_one == "q") and (dout.data_ptr() % 16 != 0) == (odd_one == "dout")
    out = flashring.flash_attn_func(q, k, v, causal=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    refs = reference_pair(q, k, v, dout, upper=0)
    assert_close(out, refs["ref"]["out"], refs["low"]["out"], OUT_FACTOR, "out", seed)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert_close(g, refs["ref"][name], refs["low"][name], GRAD_FACTOR, name, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hopper_forward_matches_reference(d, causal, dtype, seed, monkeypatch):
    monkeypatch.setenv(hopper.ENV, "1")
    calls = []
    real = hopper.fwd
    monkeypatch.setattr(hopper, "fwd", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    b, s, h, hk = 2, 384, 4, 2
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    dout = torch.randn(b, s, h, d, device="cuda", dtype=dtype)
    out, lse, _ = flashring.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert calls == [dict(causal=causal, strict=False)]
    grads = torch.autograd.grad(out, (q, k, v), dout)           # the portable backward on the Hopper LSE
    refs = reference_pair(q, k, v, dout, upper=0 if causal else None)
    assert_close(out, refs["ref"]["out"], refs["low"]["out"], OUT_FACTOR, "hopper out", seed)
    assert_close(lse, refs["ref"]["lse"], refs["low"]["lse"], OUT_FACTOR, "hopper lse", seed, dtype=torch.float32)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert_close(g, refs["ref"][name], refs["low"][name], GRAD_FACTOR, f"hopper {name}", seed)


def test_strict_causal_switch(monkeypatch):
    """Strictly causal calls (upper = -1) take the Hopper kernels while ``hopper.STRICT_CAUSAL`` is on (the
    default since their GPU run, session 13); the backward follows the forward's contract; other bands do not."""
    from flashring.ops import hopper_bwd
    q = torch.empty(2, 256, 4, 128, dtype=torch.bfloat16)
    k = torch.empty(2, 256, 2, 128, dtype=torch.bfloat16)
    assert hopper.STRICT_CAUSAL
    assert hopper.applies(q, k, k, None, -1, 0.0) and hopper_bwd.applies(q, k, k, None, -1, 0.0)
    assert not hopper.applies(q, k, k, None, -2, 0.0) and not hopper.applies(q, k, k, -1, -1, 0.0)
    monkeypatch.setattr(hopper, "STRICT_CAUSAL", False)
    assert not hopper.applies(q, k, k, None, -1, 0.0) and not hopper_bwd.applies(q, k, k, None, -1, 0.0)


def _strict_inputs(d, dtype, s=384):
    q = torch.randn(2, s, 4, d, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, s, 2, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v, torch.randn(2, s, 4, d, device="cuda", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mode", ["separate", "atomic"])
@pytest.mark.parametrize("s, dtype", [(384, torch.bfloat16), (128, torch.float16)])
def test_hopper_strict_causal_matches_reference(d, mode, s, dtype, seed, monkeypatch):
    """Keys j < i on the Gluon forward and backward: the first row sees nothing (out 0, the empty-row LSE, no
    gradient), the diagonal shifted by one in every masked tile; GQA; one tile (S = 128) in fp16; a gradient on
    the LSE as well as on the output."""
    from flashring.interface import attention
    from flashring.ops import hopper_bwd
    monkeypatch.setenv(hopper.ENV, "1")
    monkeypatch.setenv(hopper_bwd.ENV, "atomic" if mode == "atomic" else "1")
    calls = []
    real_fwd, real_bwd = hopper.fwd, hopper_bwd.bwd
    monkeypatch.setattr(hopper, "fwd", lambda *a, **kw: calls.append(("fwd", kw)) or real_fwd(*a, **kw))
    monkeypatch.setattr(hopper_bwd, "bwd", lambda *a, **kw: calls.append(("bwd", kw["strict"], kw["dq_mode"]))
                        or real_bwd(*a, **kw))
    q, k, v, dout = _strict_inputs(d, dtype, s)
    out, lse = attention(q, k, v, d ** -0.5, None, -1, 0.0, deterministic=False)
    dlse = torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    assert calls == [("fwd", dict(causal=True, strict=True)), ("bwd", True, mode)]
    refs = reference_pair(q, k, v, dout, upper=-1)
    assert_close(out, refs["ref"]["out"], refs["low"]["out"], OUT_FACTOR, "strict out", seed)
    assert_close(lse, refs["ref"]["lse"], refs["low"]["lse"], OUT_FACTOR, "strict lse", seed, dtype=torch.float32)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    want = {}
    for name, dt in (("ref", torch.float64), ("low", None)):
        leaves = [t.detach().to(dt or t.dtype).requires_grad_() for t in (q, k, v)]
        o, lo = attention_ref(*leaves, upper=-1, dtype=dt)
        want[name] = torch.autograd.grad((o, lo), leaves, (dout.to(o.dtype), dlse))
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(grads[i], want["ref"][i], want["low"][i], GRAD_FACTOR, f"strict {name}", seed)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("key", [150, 200])
def test_hopper_strict_causal_nonfinite_rows(key, monkeypatch):
    """Strictly causal: a NaN value row at ``key`` reaches exactly the rows after it."""
    from flashring.interface import attention
    monkeypatch.setenv(hopper.ENV, "1")
    q, k, v = (torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    v[0, key, 1, 5] = float("nan")
    out, _ = attention(q, k, v, 0.125, None, -1, 0.0)
    assert torch.equal(out[0, :, 1].isnan().any(-1), torch.arange(256, device="cuda") > key)
    assert not out[0, :, 0].isnan().any()


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("key", [150, 200])
def test_hopper_nonfinite_value_reaches_exactly_the_rows_that_see_it(causal, key, monkeypatch):
    """A NaN value row at ``key`` inside a causal diagonal tile (128-255; 150 in the half that warpgroup 0 scans,
    200 in warpgroup 1's): causal rows >= key are NaN and rows before it finite; without a mask every row sees
    it."""
    monkeypatch.setenv(hopper.ENV, "1")
    q, k, v = (torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    v[0, key, 1, 5] = float("nan")
    out = flashring.flash_attn_func(q, k, v, causal=causal)
    bad = out[0, :, 1].isnan().any(-1)
    want = torch.arange(256, device="cuda") >= key if causal else torch.ones(256, dtype=torch.bool, device="cuda")
    assert torch.equal(bad, want)
    assert not out[0, :, 0].isnan().any()                        # head 1's value row is head 1's only


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
def test_hopper_repeated_calls_take_the_fast_launch(seed, monkeypatch):
    """The second call of a specialisation skips Triton's generic launch (ops/launch.py): fresh tensors through it
    are still right (the TMA descriptors are rebuilt per call), and a repeat is bitwise equal."""
    monkeypatch.setenv(hopper.ENV, "1")
    make = lambda: [torch.randn(2, 256, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]  # noqa
    first = flashring.flash_attn_func(*make(), causal=True)
    calls = hopper.LAUNCH.fast_calls
    q, k, v = make()
    out = flashring.flash_attn_func(q, k, v, causal=True)
    if hopper.LAUNCH.fast:
        assert hopper.LAUNCH.fast_calls == calls + 1
    refs = reference_pair(q, k, v, None, upper=0)
    assert_close(out, refs["ref"]["out"], refs["low"]["out"], OUT_FACTOR, "hopper, fast launch", seed)
    assert torch.equal(flashring.flash_attn_func(q, k, v, causal=True), out)
    assert first.shape == out.shape


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_programs_walk_several_tiles(d, causal, seed):
    """Fewer programs than tiles (the persistent launch; here 24 tiles for 1, 3 or 5 programs, static or drawn from
    a counter, in head groups of 1, 4 or 6): each program's two Q buffers, its K/V ring and its scan barrier change
    phase across tiles, every walk gives the same bits, and the NaN rule still holds in every tile (a NaN value at
    key 300 of batch 1, head 0)."""
    b, s, h, hk = 2, 512, 3, 1
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    refs = reference_pair(q, k, v, None, upper=0 if causal else None)
    # 6 (batch, head) pairs: groups of 4 leave a short last group; dynamic=True draws tiles from a counter
    walks = {"3": dict(programs=3), "3 static, groups of 4": dict(programs=3, dynamic=False, heads_per_group=4),
             "1 dynamic, groups of 4": dict(programs=1, dynamic=True, heads_per_group=4),
             "5 dynamic, one group": dict(programs=5, dynamic=True, heads_per_group=6),
             "3, a head's blocks in a row": dict(programs=3, heads_per_group=1),
             "a program per tile, drawn (some draw none)": dict(programs=None, dynamic=True), "default": {}}
    outs = {}
    for name, walk in walks.items():
        out, lse = hopper.fwd(q, k, v, d ** -0.5, causal, **walk)
        assert_close(out, refs["ref"]["out"], refs["low"]["out"], OUT_FACTOR, name, seed)
        assert_close(lse, refs["ref"]["lse"], refs["low"]["lse"], OUT_FACTOR, f"{name} lse", seed,
                     dtype=torch.float32)
        outs[name] = out
    assert all(torch.equal(o, outs["default"]) for o in outs.values())      # a tile's result: not the walk's
    v[1, 300, 0, 7] = float("nan")
    want = torch.zeros(b, s, h, dtype=torch.bool, device="cuda")
    want[1, 300 if causal else 0:, :] = True                     # every query head shares KV head 0
    for name, walk in walks.items():
        out, _ = hopper.fwd(q, k, v, d ** -0.5, causal, **walk)
        assert torch.equal(out.isnan().any(-1), want), name

