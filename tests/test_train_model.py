"""The GPT of ``flashring train``: attention modes against each other, chunked feed-forward / cross-entropy,
block recomputation, the sparse modes' call contract, preset sizes (CPU, small shapes)."""
import os
import random

import pytest
import torch

SEED = int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))


def seed_msg(extra: str = "") -> str:
    return f"FLASHRING_SEED={SEED} {extra}"


from flashring.train import model as M
from flashring.train.config import PRESETS
from flashring.train.model import GPT, CausalAttention, ChunkedMLP, GPTConfig, chunked_cross_entropy


def _clone(model: GPT, cfg: GPTConfig, dtype) -> GPT:
    m = GPT(cfg).to(dtype)
    m.load_state_dict(model.state_dict())
    return m


def test_attention_modes_agree():
    """flash vs sdpa logits and gradients for the same weights, against an fp64 sdpa model (tolerance rule)."""
    torch.manual_seed(SEED)
    base = GPTConfig(vocab_size=256, n_layer=2, n_head=2, d_model=32, attn="sdpa")
    ref64 = GPT(base).double()
    for p in ref64.parameters():  # LayerNorm gains/biases off their 1/0 init so they matter
        if p.dim() == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    sdpa32 = _clone(ref64, base, torch.float32)
    flash32 = _clone(ref64, GPTConfig(**{**base.to_dict(), "attn": "flash"}), torch.float32)
    idx = torch.randint(0, 256, (2, 48))
    tgt = torch.randint(0, 256, (2, 48))
    logits = [m(idx) for m in (ref64, sdpa32, flash32)]
    err_flash = (logits[2].double() - logits[0]).abs().max().item()
    err_sdpa = (logits[1].double() - logits[0]).abs().max().item()
    assert err_flash <= 2 * err_sdpa + 1e-5, seed_msg(f"logits: flash err {err_flash:.3g}, sdpa err {err_sdpa:.3g}")
    grads = []
    for m in (ref64, sdpa32, flash32):
        m(idx, tgt).div(tgt.numel()).backward()
        grads.append({n: p.grad.double() for n, p in m.named_parameters()})
    for name in grads[0]:
        e_f = (grads[2][name] - grads[0][name]).abs().max().item()
        e_s = (grads[1][name] - grads[0][name]).abs().max().item()
        assert e_f <= 3 * e_s + 1e-5, seed_msg(f"grad {name}: flash err {e_f:.3g}, sdpa err {e_s:.3g}")


def _check_rule(ref, low, kern):
    """Each argument is (output, [gradients]) in fp64 / fp32-with-the-reference-code / fp32-with-the-code-under-test:
    the output within 2x (+1e-5) and gradients within 3x (+1e-5) the reference-in-fp32 error."""
    e_k, e_l = (kern[0].double() - ref[0]).abs().max().item(), (low[0].double() - ref[0]).abs().max().item()
    assert e_k <= 2 * e_l + 1e-5, seed_msg(f"forward err {e_k:.3g} vs reference-in-fp32 err {e_l:.3g}")
    for i, (gk, gl, gr) in enumerate(zip(kern[1], low[1], ref[1])):
        e_k, e_l = (gk.double() - gr).abs().max().item(), (gl.double() - gr).abs().max().item()
        assert e_k <= 3 * e_l + 1e-5, seed_msg(f"grad {i} err {e_k:.3g} vs reference-in-fp32 err {e_l:.3g}")


@pytest.mark.parametrize("with_norm", [False, True])
def test_chunked_ffn_equals_unchunked(with_norm):
    torch.manual_seed(SEED)
    d, hidden = 24, 96
    mlp64 = ChunkedMLP(d, hidden).double()
    norm64 = torch.nn.LayerNorm(d).double()
    with torch.no_grad():  # gains/biases off their 1/0 init so their gradients are exercised
        norm64.weight.add_(0.1 * torch.randn(d, dtype=torch.float64))
        norm64.bias.add_(0.1 * torch.randn(d, dtype=torch.float64))
    x64 = torch.randn(3, 29, d, dtype=torch.float64)  # 87 tokens, chunk 10: the last chunk is short
    dout = torch.randn(3, 29, d, dtype=torch.float64)

    def run(chunk, dtype):
        m = ChunkedMLP(d, hidden, chunk).to(dtype)
        m.load_state_dict(mlp64.state_dict())
        norm = torch.nn.LayerNorm(d).to(dtype)
        norm.load_state_dict(norm64.state_dict())
        x = x64.to(dtype, copy=True).requires_grad_()
        y = m(x, norm) if with_norm else m(x)
        y.backward(dout.to(dtype))
        extra = [norm.weight.grad, norm.bias.grad] if with_norm else []
        return y.detach(), [x.grad, m.fc1.weight.grad, m.fc2.weight.grad] + extra
    _check_rule(run(0, torch.float64), run(0, torch.float32), run(10, torch.float32))


def test_chunked_cross_entropy_equals_unchunked():
    torch.manual_seed(SEED)
    h64 = torch.randn(2, 37, 16, dtype=torch.float64)
    w64 = 0.3 * torch.randn(300, 16, dtype=torch.float64)
    t = torch.randint(0, 300, (2, 37))

    def run(chunk, dtype):
        h, w = h64.to(dtype, copy=True).requires_grad_(), w64.to(dtype, copy=True).requires_grad_()
        # per-token mean, as training uses it: O(1) values, so the fp32 floor of the rule means what it says
        y = chunked_cross_entropy(h, w, t, chunk) / t.numel()
        y.backward()
        return y.detach(), [h.grad, w.grad]
    ref = run(0, torch.float64)
    direct = torch.nn.functional.cross_entropy((h64 @ w64.T).reshape(-1, 300), t.reshape(-1), reduction="sum")
    assert torch.allclose(ref[0] * t.numel(), direct, rtol=1e-12), seed_msg()  # 74 tokens, chunk 9: last chunk short
    _check_rule(ref, run(0, torch.float32), run(9, torch.float32))


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for the backward while running fn()."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_chunking_keeps_saved_activations_to_the_input():
    """The point of chunking (BPT): what is kept for the backward is ~ the (tokens, d) input, not the 4d-wide hidden
    layer or the vocab-wide logits. Unchunked: 9x the input for the MLP, ~4x vocab/d for the cross-entropy."""
    torch.manual_seed(SEED)
    n, d, vocab = 2048, 32, 1024
    x = torch.randn(1, n, d, requires_grad=True)
    w = torch.randn(vocab, d, requires_grad=True)
    t = torch.randint(0, vocab, (1, n))
    x_bytes = x.numel() * x.element_size()
    mlp_full, mlp_chunked = ChunkedMLP(d, 4 * d, 0), ChunkedMLP(d, 4 * d, 128)
    assert _saved_bytes(lambda: mlp_full(x)) >= 8 * x_bytes
    assert _saved_bytes(lambda: mlp_chunked(x)) <= 1.1 * x_bytes
    # with the block's LayerNorm inside the chunk, its output is recomputed, not kept
    assert _saved_bytes(lambda: mlp_chunked(x, torch.nn.LayerNorm(d))) <= 1.1 * x_bytes
    assert _saved_bytes(lambda: chunked_cross_entropy(x, w, t, 0)) >= vocab / d * x_bytes
    assert _saved_bytes(lambda: chunked_cross_entropy(x, w, t, 128)) <= 1.1 * x_bytes


def test_checkpointed_blocks_match():
    """--checkpoint (block recomputation) changes memory, not the math: same loss and gradients."""
    torch.manual_seed(SEED)
    cfg = GPTConfig(n_layer=2, n_head=2, d_model=32, ffn_chunk=16, ce_chunk=16)
    m0 = GPT(cfg)
    m1 = GPT(GPTConfig(**{**cfg.to_dict(), "checkpoint": True}))
    m1.load_state_dict(m0.state_dict())
    idx, tgt = torch.randint(0, 256, (2, 40)), torch.randint(0, 256, (2, 40))
    l0, l1 = m0(idx, tgt), m1(idx, tgt)
    l0.backward(), l1.backward()
    assert torch.equal(l0, l1), seed_msg()
    for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters()):
        assert torch.equal(p0.grad, p1.grad), seed_msg(n)  # recomputation repeats the same ops


# ------------------------------------------------------------------------- sparse modes: how the model calls them
def _masked_attn(q, k, v, allowed):
    """Dense causal attention restricted to ``allowed`` (B, H, Sq, Sk); rows with no allowed key give 0."""
    causal = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
    allowed = allowed & causal
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def test_sparse_modes_call_contract(monkeypatch):
    """With stand-ins for the sparse kernels: keep masks are bool (B, S, H), fresh per layer and per step, at the
    requested rate, and redrawn identically when --checkpoint recomputes a block; LSH buckets for Q and K come from
    one call (one rotation)."""
    calls = []

    def qk_sparse(q, k, v, q_keep, k_keep, causal=True, softmax_scale=None):
        assert causal and q_keep.dtype == torch.bool and q_keep.shape == q.shape[:3] == k_keep.shape
        calls.append(q_keep.clone())
        allowed = (q_keep.permute(0, 2, 1)[..., :, None] & k_keep.permute(0, 2, 1)[..., None, :])  # (B, H, S, S)
        return _masked_attn(q, k, v, allowed)

    def lsh(x, n_buckets, generator=None, unit_norm=False):
        calls.append((x.shape, unit_norm))
        return torch.randint(0, n_buckets, x.shape[:3])

    def hash_sparse(q, k, v, q_buckets, k_buckets, causal=True, softmax_scale=None, strict_causal=False,
                    num_buckets=None):
        assert q_buckets.shape == q.shape[:3] == k_buckets.shape and not q_buckets.is_floating_point()
        assert int(q_buckets.max()) < num_buckets and int(k_buckets.max()) < num_buckets   # the bound is given
        calls.append(("strict", strict_causal))
        allowed = q_buckets.permute(0, 2, 1)[..., :, None] == k_buckets.permute(0, 2, 1)[..., None, :]
        return _masked_attn(q, k, v, allowed)

    monkeypatch.setattr(M, "qk_sparse_attn_func", qk_sparse)
    monkeypatch.setattr(M, "hash_sparse_attn_func", hash_sparse)
    monkeypatch.setattr(M, "lsh_buckets", lsh)
    torch.manual_seed(SEED)
    idx, tgt = torch.randint(0, 256, (2, 64)), torch.randint(0, 256, (2, 64))
    cfg = GPTConfig(n_layer=2, n_head=4, d_model=32, attn="qk-sparse", drop=0.3)
    m = GPT(cfg)
    m(idx, tgt).backward()
    m(idx, tgt)
    assert len(calls) == 4  # 2 layers x 2 steps
    assert all(not torch.equal(a, b) for i, a in enumerate(calls) for b in calls[i + 1:])
    keep = torch.stack(calls).float().mean().item()
    assert abs(keep - 0.7) < 0.05, keep  # 4 x 2 x 64 x 4 = 2048 coins at p = 0.7
    # --checkpoint: the recomputed forward must redraw the very same masks, so the gradients are unchanged
    grads = []
    for ckpt in (False, True):
        mc = GPT(GPTConfig(**{**cfg.to_dict(), "checkpoint": ckpt}))
        mc.load_state_dict(m.state_dict())
        torch.manual_seed(SEED + 1)
        mc(idx, tgt).backward()
        grads.append([p.grad for p in mc.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads)), seed_msg()  # recomputation repeats the same ops
    calls.clear()
    mh = GPT(GPTConfig(n_layer=2, n_head=4, d_model=32, attn="hash-sparse", buckets=4))
    mh(idx, tgt).backward()
    # queries and keys of a layer, concatenated: one rotation
    assert calls == [(torch.Size([2, 128, 4, 8]), False), ("strict", False)] * 2
    # shared-QK: k = normalize(q) shares q's buckets, so only q is hashed; the recipe's flags reach the calls
    calls.clear()
    ms = GPT(GPTConfig(n_layer=2, n_head=4, d_model=32, attn="hash-sparse", buckets=4, shared_qk=True,
                       lsh_unit_norm=True, strict_causal=True))
    ms(idx, tgt).backward()
    assert calls == [(torch.Size([2, 64, 4, 8]), True), ("strict", True)] * 2


def test_presets_shapes():
    for name, preset in PRESETS.items():
        cfg = GPTConfig(n_layer=preset["n_layer"], n_head=preset["n_head"], d_model=preset["d_model"])
        with torch.device("meta"):  # shapes only: the ring preset's 3.8B parameters would take 15 GB here
            n = GPT(cfg).num_params()
        if name == "gpt3b-ring":  # the model whose sequence does not fit one GPU (experiment 2)
            assert 3.7e9 <= n <= 3.9e9, n
            assert preset["seqlen"] % 4 == 0  # zigzag over 2 ranks
        elif name != "tiny":  # experiment 1: ~20-120M parameters
            assert 20e6 <= n <= 120e6, (name, n)


def test_shared_qk_and_learned_positions():
    """shared-QK: the projection makes q and v only and attention sees k = normalize(q); learned positions: an
    embedding table instead of rotary, so a token's output depends on where it stands."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, attn="flash", shared_qk=True,
                    positions="learned", n_positions=12)
    model = GPT(cfg)
    assert model.blocks[0].qkv.out_features == 2 * 16 and model.wpe.num_embeddings == 12
    seen = {}
    model.blocks[0].attn.register_forward_pre_hook(lambda mod, args: seen.update(q=args[0], k=args[1]))
    idx = torch.randint(0, 50, (2, 12))
    logits = model(idx)
    assert torch.allclose(seen["k"], torch.nn.functional.normalize(seen["q"], dim=-1))
    assert torch.allclose(seen["k"].norm(dim=-1), torch.ones(2, 12, 2))
    # the same token at two positions: different logits (positions are learned, not absent)
    same = torch.full((1, 12), 7)
    out = model(same)
    assert not torch.allclose(out[0, 0], out[0, 5])
    assert logits.shape == (2, 12, 50)
    with pytest.raises(ValueError, match="learned 12 positions"):
        model(torch.randint(0, 50, (1, 13)))
    with pytest.raises(ValueError, match="n_positions"):
        GPTConfig(positions="learned")
    with pytest.raises(ValueError, match="positions must be one of"):
        GPTConfig(positions="alibi")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (autocast casts normalize to fp32 there)")
def test_shared_qk_under_cuda_autocast_keeps_one_dtype():
    """CUDA autocast runs F.normalize in fp32: k = normalize(q) must come back in q's dtype, or the attention
    refuses mixed dtypes (found in the first bf16 paper-8k run)."""
    cfg = GPTConfig(vocab_size=50, n_layer=1, n_head=2, d_model=32, attn="flash", shared_qk=True,
                    positions="learned", n_positions=64)
    model = GPT(cfg).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.randint(0, 50, (2, 64), device="cuda"), torch.randint(0, 50, (2, 64), device="cuda"))
    loss.float().sum().backward()
    assert torch.isfinite(loss).all() and model.blocks[0].qkv.weight.grad is not None


@pytest.mark.parametrize("mode", ["flash", "sdpa"])
def test_strict_causal_dense_core(mode):
    """Dense strictly causal attention (the fair dense baseline for shared-QK models): query i attends keys
    j < i exactly (float64 reference with the mask), query 0 outputs 0, and gradients flow."""
    torch.manual_seed(SEED)
    q, k, v = (torch.randn(2, 37, 3, 16, dtype=torch.float64 if mode == "sdpa" else torch.float32,
                           requires_grad=True) for _ in range(3))
    out = CausalAttention(mode, strict=True)(q, k, v)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / 4.0
    allowed = torch.ones(37, 37).tril(-1).bool()
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)     # row 0: nothing visible -> 0
    want = torch.einsum("bhqk,bkhd->bqhd", p, v.double())
    assert torch.allclose(out.double(), want, atol=1e-5), (out.double() - want).abs().max()
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    wants = torch.autograd.grad(want, (q, k, v), dout.double())
    for name, g, w in zip("qkv", grads, wants):
        assert torch.allclose(g.double(), w.double(), atol=1e-4), (name, (g.double() - w.double()).abs().max())
    assert torch.equal(grads[2][:, -1], torch.zeros_like(grads[2][:, -1]))


@pytest.mark.parametrize("strict", [False, True])
def test_kept_pair_fraction_shared_buckets_fast_path(strict):
    """Shared-QK buckets (the same tensor for queries and keys) count pairs per bucket; the general running count
    (a copy, so the fast path is not taken) gives the same fraction."""
    from flashring.train.model import kept_pair_fraction
    torch.manual_seed(SEED)
    buckets = torch.randint(0, 6, (2, 50, 3))
    fast = kept_pair_fraction(buckets, buckets, 6, strict)
    slow = kept_pair_fraction(buckets, buckets.clone(), 6, strict)
    assert torch.allclose(fast, slow), (fast, slow)
    one = torch.zeros(1, 10, 1, dtype=torch.long)                 # one bucket: every causal pair (strict: j < i)
    assert float(kept_pair_fraction(one, one, 2, strict)) == pytest.approx(45 / 55 if strict else 1.0)
