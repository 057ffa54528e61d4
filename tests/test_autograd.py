"""Eager autograd (``interface._Eager``) against PyTorch's function transforms and tracers: torch.func's grad and
vmap give what plain autograd / a loop give, make_fx records the custom ops (not the kernels' inner calls), a
double backward and forward-mode AD raise instead of returning zeros, and an in-place change to a side tensor
(cu_seqlens) between forward and backward raises like one to q would."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import flashring


def qkv(device, b=2, s=37, h=4, hk=2, d=16, grad=False):
    return tuple(torch.randn(b, s, n, d, device=device, requires_grad=grad) for n in (h, hk, hk))


def test_func_grad_matches_autograd(device, seed):
    q, k, v = qkv(device, grad=True)
    dout = torch.randn_like(q)
    want = torch.autograd.grad(flashring.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    got = torch.func.grad(lambda q, k, v: (flashring.flash_attn_func(q, k, v, causal=True) * dout).sum(),
                          argnums=(0, 1, 2))(q.detach(), k.detach(), v.detach())
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"d{name}")


@pytest.mark.parametrize("mapped", ["all", "q only"])
def test_vmap_matches_a_loop(device, mapped, seed):
    x = 3
    q = torch.randn(x, 2, 37, 4, 16, device=device)
    k, v = (torch.randn(x, 2, 37, 2, 16, device=device) for _ in range(2))
    if mapped == "q only":
        k, v = k[0], v[0]
        dims, pick = (0, None, None), lambda i: (q[i], k, v)
    else:
        dims, pick = (0, 0, 0), lambda i: (q[i], k[i], v[i])
    got = torch.func.vmap(lambda q, k, v: flashring.flash_attn_func(q, k, v, causal=True), in_dims=dims)(q, k, v)
    want = torch.stack([flashring.flash_attn_func(*pick(i), causal=True) for i in range(x)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_double_backward_and_jvp_raise(device, seed):
    q, k, v = qkv(device, grad=True)
    (dq,) = torch.autograd.grad(flashring.flash_attn_func(q, k, v).sum(), q, create_graph=True)
    assert not dq.requires_grad        # once differentiable: no silent zeros from a second backward
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dq.sum(), q)
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda q: flashring.flash_attn_func(q, k.detach(), v.detach()), (q.detach(),),
                       (torch.randn_like(q),))


def test_make_fx_records_the_custom_op(device, seed):
    q, k, v = qkv(device)
    gm = make_fx(lambda q, k, v: flashring.flash_attn_func(q, k, v, causal=True))(q, k, v)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "flashring.fwd.default" in targets, targets
    torch.testing.assert_close(gm(q, k, v), flashring.flash_attn_func(q, k, v, causal=True), atol=0, rtol=0)


def test_inplace_change_to_cu_seqlens_before_backward_raises(device, seed):
    q, k, v = (torch.randn(20, 2, 16, device=device, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    out = flashring.flash_attn_varlen_func(q, k, v, cu, cu, 13, 13, causal=True)
    cu.add_(0)          # bumps its version: the saved cu_seqlens no longer describe this forward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
