"""Dense flash attention against the float64 reference, by the tolerance rule (see tests/_tol.py).

Backends: on a CPU-only machine the Triton kernels run under TRITON_INTERPRET=1 ("interp") and the chunked PyTorch
path runs natively ("torch"); on a GPU machine the kernels run on CUDA ("cuda"), where larger shapes are added.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashring
from flashring import masks
from flashring.testing import assert_close, attention_ref

from conftest import gpu_only


# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype)
CASES = [
    (1, 1, 1, 1, 1, 16, torch.bfloat16),
    (2, 17, 17, 2, 2, 40, torch.float16),
    (1, 113, 113, 4, 2, 64, torch.bfloat16),
    (1, 37, 113, 2, 1, 80, torch.float16),      # seqlen_q < seqlen_k, MQA
    (1, 113, 37, 2, 2, 16, torch.bfloat16),     # seqlen_q > seqlen_k: causal leaves rows with no key
    (1, 64, 64, 2, 2, 256, torch.float16),
    (2, 33, 65, 3, 1, 96, torch.float32),
] + gpu_only([
    (2, 1024, 1024, 8, 2, 128, torch.bfloat16),
    (1, 4096, 4096, 4, 4, 64, torch.float16),
    (1, 8192, 8192, 2, 1, 128, torch.bfloat16),
    (1, 2048, 8192, 4, 2, 192, torch.float16),
    (1, 3000, 1111, 4, 4, 128, torch.bfloat16),
])
# (causal, window_size, softcap)
MASKS = [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0), (False, (16, 4), 0.0), (True, (-1, -1), 5.0),
         (True, (40, -1), 0.0)]


def _inputs(b, sq, sk, h, hk, d, dtype, device):
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    do = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    return q, k, v, do


def _ref_grads(q, k, v, do, dtype, **kw):
    qq, kk, vv = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v))
    out, lse = attention_ref(qq, kk, vv, dtype=dtype, **kw)
    out.backward(do.to(out.dtype))
    return out, lse, qq.grad, kk.grad, vv.grad


def check_case(b, sq, sk, h, hk, d, dtype, device, causal, window, softcap, seed, grads=True):
    q, k, v, do = _inputs(b, sq, sk, h, hk, d, dtype, device)
    scale = 1.0 / math.sqrt(d)
    lower, upper = masks.flash_bounds(sq, sk, causal, window)
    kw = dict(softmax_scale=scale, lower=lower, upper=upper, softcap=softcap)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = flashring.flash_attn_func(qg, kg, vg, causal=causal, window_size=window, softcap=softcap,
                                            return_attn_probs=True)
    ref = _ref_grads(q, k, v, do, torch.float64, **kw) if grads else attention_ref(q, k, v, **kw)
    low = _ref_grads(q, k, v, do, None, **kw) if grads else attention_ref(q, k, v, dtype=None, **kw)
    tag = f"{(b, sq, sk, h, hk, d, dtype)} causal={causal} window={window} softcap={softcap}"
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref[0], low[0], 2, f"out {tag}", seed)
    # LSE is fp32 in every path; empty rows carry the finite sentinel in both.
    assert torch.isfinite(lse).all()
    assert_close(lse, ref[1], low[1], 2, f"lse {tag}", seed)
    if grads:
        out.backward(do)
        for name, g, r, lp in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), ref[2:], low[2:]):
            assert g.shape == r.shape and g.dtype == dtype
            assert_close(g, r, lp, 3, f"{name} {tag}", seed)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(str(x) for x in c[:6]) + f"-{str(c[6])[6:]}")
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"c{int(m[0])}-w{m[1][0]}_{m[1][1]}-cap{m[2]:g}")
def test_flash_matches_reference(case, mask, device, seed):
    check_case(*case, device, *mask, seed=seed)


def test_long_sequence_1023(device, seed):
    # Many tiles and a ragged tail in both directions; causal only, to keep the interpreter run short (~14 s).
    check_case(1, 1023, 1023, 1, 1, 16, torch.bfloat16, device, True, (-1, -1), 0.0, seed=seed)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 2), sq=st.integers(1, 70), sk=st.integers(1, 70), hk=st.integers(1, 2),
       group=st.integers(1, 3), d=st.integers(1, 72), causal=st.booleans(),
       left=st.integers(-1, 40), right=st.integers(-1, 40), softcap=st.sampled_from([0.0, 3.0]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]))
def test_fuzz_shapes(device, b, sq, sk, hk, group, d, causal, left, right, softcap, dtype):
    seed = torch.randint(0, 2**31, ()).item()
    torch.manual_seed(seed)
    check_case(b, sq, sk, hk * group, hk, d, dtype, device, causal, (left, right), softcap, seed=seed)


def test_empty_rows_are_zero_with_finite_lse(device, seed):
    # seqlen_q > seqlen_k with causal (bottom-right): the first sq - sk queries see no key.
    q, k, v, do = _inputs(1, 50, 20, 2, 2, 32, torch.bfloat16, device)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = flashring.flash_attn_func(qg, kg, vg, causal=True, return_attn_probs=True)
    assert (out[:, :30] == 0).all()
    assert (lse[:, :, :30] == masks.EMPTY_ROW_LSE).all() and torch.isfinite(lse).all()
    out.backward(do)
    assert (qg.grad[:, :30] == 0).all() and torch.isfinite(kg.grad).all() and torch.isfinite(vg.grad).all()


def test_deterministic_backward_is_bitwise(device, seed):
    q, k, v, do = _inputs(2, 129, 129, 4, 2, 64, torch.bfloat16, device)
    grads = []
    for _ in range(2):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        flashring.flash_attn_func(qg, kg, vg, causal=True, deterministic=True).backward(do)
        grads.append((qg.grad, kg.grad, vg.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_strided_inputs_match_contiguous(device, seed):
    # q, k, v as views into one packed (B, S, 3, H, D) tensor, as a fused QKV projection produces.
    qkv = torch.randn(2, 70, 3, 4, 32, device=device, dtype=torch.float16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = flashring.flash_attn_func(q, k, v, causal=True)
    ref = flashring.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, ref)


def test_lse_gradient(device, seed):
    # The returned LSE is differentiable: d lse / d s = P.
    q, k, v, _ = _inputs(1, 40, 40, 2, 1, 16, torch.float32, device)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = flashring.flash_attn_func(qg, kg, vg, causal=True, return_attn_probs=True)
    w = torch.randn_like(lse)
    (out.sum() + (lse * w).sum()).backward()
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, l = attention_ref(qr, kr, vr, 0.25, None, 0)
    (o.sum() + (l.double() * w.double()).sum()).backward()
    for g, r in zip((qg.grad, kg.grad, vg.grad), (qr.grad, kr.grad, vr.grad)):
        assert (g.double() - r).abs().max().item() < 1e-4 * max(1.0, r.abs().max().item())


def test_nan_propagates_like_sdpa(device, seed):
    q, k, v, _ = _inputs(1, 24, 24, 1, 1, 16, torch.float32, device)
    q[0, 5, 0, 3] = float("nan")
    out = flashring.flash_attn_func(q, k, v)
    assert torch.isnan(out[0, 5]).all()
    assert torch.isfinite(out[0, :5]).all() and torch.isfinite(out[0, 6:]).all()


def test_sdpa_dropin_matches_torch(device, seed):
    import torch.nn.functional as F
    for sq, sk, causal in ((40, 40, True), (30, 50, True), (50, 30, False)):
        q = torch.randn(2, 4, sq, 32, device=device)
        k = torch.randn(2, 2, sk, 32, device=device)
        v = torch.randn(2, 2, sk, 32, device=device)
        if causal and sq > sk:
            continue
        out = flashring.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                             enable_gqa=True)
        low = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert_close(out, ref, low, 2, f"sdpa sq={sq} sk={sk} causal={causal}", seed)


def test_sdpa_attn_mask_falls_back_with_one_warning(device):
    import torch.nn.functional as F
    from flashring import interface
    interface.FALLBACKS.clear()
    q = torch.randn(1, 2, 8, 16, device=device)
    mask = torch.rand(8, 8, device=device) > 0.3
    mask[:, 0] = True
    with pytest.warns(UserWarning, match="attn_mask"):
        out = flashring.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, q, q, attn_mask=mask))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flashring.scaled_dot_product_attention(q, q, q, attn_mask=mask)   # second time: silent


def test_sdpa_tiny_scale_falls_back_like_torch(device):
    """A scale below float32's smallest normal number, which the kernels refuse (a masked score times a scale that
    rounds to 0 would be NaN): the drop-in hands it to torch and gives torch's result, whatever that is."""
    import torch.nn.functional as F
    from flashring import interface
    interface.FALLBACKS.clear()
    q = torch.randn(1, 2, 8, 16, device=device)
    with pytest.warns(UserWarning, match="smallest normal"):
        out = flashring.scaled_dot_product_attention(q, q, q, is_causal=True, scale=1e-46)
    ref = F.scaled_dot_product_attention(q, q, q, is_causal=True, scale=1e-46)
    torch.testing.assert_close(out, ref, equal_nan=True)      # torch's own CPU kernels give NaN rows here too


def test_torch_compile_fullgraph(device, seed):
    q, k, v, do = _inputs(1, 48, 48, 2, 2, 32, torch.float32, device)

    def f(q, k, v):
        a = flashring.flash_attn_func(q, k, v, causal=True)
        b = flashring.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a + b.transpose(1, 2)

    backend = "inductor" if device == "cuda" else "aot_eager"   # aot_eager traces the same graph, no C++ build
    g = torch.compile(f, fullgraph=True, backend=backend)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = g(qg, kg, vg)
    out.backward(do)
    qe, ke, ve = (t.clone().requires_grad_() for t in (q, k, v))
    ref = f(qe, ke, ve)
    ref.backward(do)
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(qg.grad, qe.grad, atol=1e-6)


# ------------------------------------------------------------------------------------------------- bad input
def _ok(device="cpu"):
    return (torch.randn(1, 8, 2, 16, device=device), torch.randn(1, 8, 2, 16, device=device),
            torch.randn(1, 8, 2, 16, device=device))


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "dtype"),
    (lambda q, k, v: (q.half(), k, v), TypeError, "share one dtype"),
    (lambda q, k, v: (q, k[:, :5], v), ValueError, "same seqlen"),
    (lambda q, k, v: (torch.randn(2, 8, 2, 16), k, v), ValueError, "batch sizes differ"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "headdim must match"),
    (lambda q, k, v: (torch.randn(1, 8, 3, 16), k, v), ValueError, "divisible"),
    (lambda q, k, v: (torch.randn(1, 8, 2, 300),) * 3, ValueError, "headdim 300"),
    (lambda q, k, v: (q[:, :0], k, v), ValueError, "empty"),
])
def test_bad_tensors(mutate, exc, match):
    with pytest.raises(exc, match=match):
        flashring.flash_attn_func(*mutate(*_ok()))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale=1e-46), ValueError, "softmax_scale"),                 # below float32's smallest normal
    (dict(softmax_scale="x"), TypeError, "softmax_scale"),
    (dict(window_size=(4,)), TypeError, "window_size"),
    (dict(window_size=(-3, 0)), ValueError, "window_size"),
    (dict(dropout_p=0.1), NotImplementedError, "dropout_p"),
    (dict(dropout_p=1.5), ValueError, "dropout_p"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(causal="yes"), TypeError, "causal"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        flashring.flash_attn_func(*_ok(), **kwargs)


def test_devices_differ():
    q, k, v = _ok()
    with pytest.raises(ValueError, match="one device"):
        flashring.flash_attn_func(q, k.to("meta"), v)
