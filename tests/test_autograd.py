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


@pytest.mark.parametrize("kind", ["qk", "hash"])
def test_func_over_the_sparse_front_ends(device, kind, seed):
    """torch.func.grad and vmap through qk_sparse_attn_func / hash_sparse_attn_func (they raised while the front
    ends gathered rows with autograd.Functions that had no setup_context)."""
    q, k, v = qkv(device, h=2, hk=2)
    b, s, h = q.shape[:3]
    if kind == "qk":
        fn, side = flashring.qk_sparse_attn_func, (torch.rand(b, s, h, device=device) > 0.4,
                                                   torch.rand(b, s, h, device=device) > 0.4)
    else:
        fn, side = flashring.hash_sparse_attn_func, (torch.randint(0, 3, (b, s, h), device=device),
                                                     torch.randint(0, 3, (b, s, h), device=device))
    dout = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(fn(*leaves, *side), leaves, dout)
    got = torch.func.grad(lambda q, k, v: (fn(q, k, v, *side) * dout).sum(), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"d{name}")
    qs = torch.stack([q, torch.randn_like(q)])
    mapped = torch.func.vmap(lambda q: fn(q, k, v, *side))(qs)
    torch.testing.assert_close(mapped, torch.stack([fn(x, k, v, *side) for x in qs]), atol=1e-5, rtol=1e-5)


def test_double_backward_and_jvp_raise(device, seed):
    q, k, v = qkv(device, grad=True)
    loss = lambda q: flashring.flash_attn_func(q, k, v).pow(2).sum()       # noqa: E731 - dout depends on q
    not_twice = pytest.raises(NotImplementedError, match="not differentiable")
    with not_twice:
        (dq,) = torch.autograd.grad(loss(q), q, create_graph=True)
        torch.autograd.grad(dq.sum(), q)
    small = qkv(device, b=1, s=3, h=1, hk=1, d=4)          # a Hessian of 12 x 12
    with not_twice:
        torch.autograd.functional.hessian(lambda q: flashring.flash_attn_func(q, *small[1:]).pow(2).sum(),
                                          small[0].requires_grad_())
    with not_twice:
        torch.func.grad(lambda q: torch.func.grad(loss)(q).sum())(q.detach())
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(lambda q: flashring.flash_attn_func(q, k.detach(), v.detach()), (q.detach(),),
                       (torch.randn_like(q),))


def test_create_graph_elsewhere_still_works(device, seed):
    """A second-order term that does not pass through attention (a gradient penalty on other weights)."""
    q, k, v = qkv(device, grad=True)
    w = torch.randn(3, device=device, requires_grad=True)
    total = flashring.flash_attn_func(q, k, v).sum() + w.pow(3).sum()
    gq, gw = torch.autograd.grad(total, (q, w), create_graph=True)
    (hw,) = torch.autograd.grad(gw.sum(), w)
    torch.testing.assert_close(hw, 6 * w.detach())
    torch.testing.assert_close(gq, torch.autograd.grad(flashring.flash_attn_func(q, k, v).sum(), q)[0])


@pytest.mark.parametrize("mode", ["real", "fake", "symbolic"])
def test_make_fx_records_the_custom_ops(device, mode, seed):
    """Every entry point traces to its custom op, with fake tensors too (no host read of cu_seqlens or of the
    cache lengths while traced)."""
    q, k, v = qkv(device)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    lens = torch.tensor([5, 30], dtype=torch.int32, device=device)
    calls = {
        "flashring.fwd.default": (lambda q, k, v: flashring.flash_attn_func(q, k, v, causal=True), (q, k, v)),
        "flashring.varlen_fwd.default": (lambda q, cu: flashring.flash_attn_varlen_func(
            q, q, q, cu, cu, 13, 13, causal=True), (q[0, :20], cu)),
        "flashring.fwd_kvcache.default": (lambda q, k, v, s: flashring.flash_attn_with_kvcache(
            q, k, v, cache_seqlens=s, causal=True), (q[:, :1], k, v, lens)),
    }
    for op, (fn, args) in calls.items():
        gm = make_fx(fn, tracing_mode=mode)(*args)
        targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        assert op in targets, (op, targets)
        if mode == "real":
            torch.testing.assert_close(gm(*args), fn(*args), atol=0, rtol=0)


def test_inplace_change_to_cu_seqlens_before_backward_raises(device, seed):
    q, k, v = (torch.randn(20, 2, 16, device=device, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    out = flashring.flash_attn_varlen_func(q, k, v, cu, cu, 13, 13, causal=True)
    cu.add_(0)          # bumps its version: the saved cu_seqlens no longer describe this forward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_first_order_transforms_and_checkpoint(device, seed):
    """jacrev and vmap(grad) (torch.func backpropagates with grad on, so _NotTwice sits in their path), and a
    non-reentrant checkpoint under create_graph=True (the backward reads its saved tensors once)."""
    from torch.utils.checkpoint import checkpoint
    q, k, v = qkv(device, b=2, s=3, h=1, hk=1, d=4)
    jac = torch.func.jacrev(lambda q: flashring.flash_attn_func(q, k, v, causal=True))(q)
    leaf = q.detach().requires_grad_()
    rows = [torch.autograd.grad(flashring.flash_attn_func(leaf, k, v, causal=True).flatten()[i], leaf)[0]
            for i in range(q.numel())]
    torch.testing.assert_close(jac.reshape(q.numel(), -1), torch.stack(rows).reshape(q.numel(), -1),
                               atol=1e-5, rtol=1e-5)
    loss = lambda q, k, v: flashring.flash_attn_func(q[None], k[None], v[None]).pow(2).sum()   # noqa: E731
    got = torch.func.vmap(torch.func.grad(loss))(q.detach(), k, v)
    want = torch.stack([torch.func.grad(loss)(q.detach()[i], k[i], v[i]) for i in range(q.shape[0])])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    w = torch.randn(4, device=device, requires_grad=True)
    a = q.detach().requires_grad_()
    out = checkpoint(lambda a: flashring.flash_attn_func(a, k, v), a, use_reentrant=False)
    _, gw = torch.autograd.grad((out * w).sum() + w.pow(3).sum(), (a, w), create_graph=True)
    (hw,) = torch.autograd.grad(gw.sum(), w)
    torch.testing.assert_close(hw, 6 * w.detach())


def test_eager_calls_skip_the_argument_binding(device, seed, monkeypatch):
    """Eager calls enter the autograd Function without torch's per-call binding of the arguments to ``forward``'s
    signature (``inspect.signature``, host time on every call; it changes nothing when every argument comes
    positionally): none during a forward + backward of flash_attn_func / flash_attn_varlen_func, while torch.func
    (which needs that path) still goes through it and agrees."""
    import inspect
    q, k, v = qkv(device, grad=True)
    cu = torch.tensor([0, 37], dtype=torch.int32, device=device)

    def step():
        out = flashring.flash_attn_func(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
        flashring.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 37, 37, causal=True).sum().backward()
    step()                                  # first calls: lazy imports and kernel compiles may inspect signatures
    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    step()
    assert not calls
    dq = torch.func.grad(lambda q: flashring.flash_attn_func(q, k.detach(), v.detach(), causal=True).sum())(
        q.detach())
    assert calls
    want, = torch.autograd.grad(flashring.flash_attn_func(q, k, v, causal=True).sum(), (q, ))
    torch.testing.assert_close(dq, want, atol=1e-5, rtol=1e-5)
