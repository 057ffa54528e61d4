"""Dynamic sparse flash attention (QK-sparse, hash-sparse) against the float64 dense reference with the equivalent
boolean mask, by the tolerance rule; edge cases that must equal dense attention; bad input."""
import math

import pytest
import torch

import flashring
from flashring import masks
from flashring.masks import sparse_pair_mask, sparse_visible
from flashring.ops.sparse_ranges import PAD_POS, SparseMeta, tile_ranges
from flashring.testing import assert_close, attention_ref

from conftest import CUDA, gpu_only


def run_sparse(kind, b, sq, sk, h, hk, d, dtype, device, causal, seed, qa=None, ka=None, rate=0.5, nb=4,
               strict=False):
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hk, d, device=device, dtype=dtype)
    do = torch.randn(b, sq, h, d, device=device, dtype=dtype)
    if qa is None:
        if kind == "qk":
            qa, ka = torch.rand(b, sq, h, device=device) > rate, torch.rand(b, sk, hk, device=device) > rate
        else:
            qa = torch.randint(0, nb, (b, sq, h), device=device)
            ka = torch.randint(0, nb, (b, sk, hk), device=device)
    fn = flashring.qk_sparse_attn_func if kind == "qk" else flashring.hash_sparse_attn_func
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    extra = dict(strict_causal=True) if strict else {}
    out, lse, _ = fn(qg, kg, vg, qa, ka, causal=causal, return_attn_probs=True, **extra)
    out.backward(do)
    mask = sparse_pair_mask(kind, qa, ka, causal, shift=sk - sq - int(strict))     # strict: j <= i - 1
    kw = dict(softmax_scale=1 / math.sqrt(d), mask=mask)
    refs = []
    for dt in (torch.float64, None):
        qr, kr, vr = (t.detach().to(dt or t.dtype).requires_grad_() for t in (q, k, v))
        o, l = attention_ref(qr, kr, vr, dtype=dt, **kw)
        o.backward(do.to(o.dtype))
        refs.append((o, l, qr.grad, kr.grad, vr.grad))
    tag = f"{kind} {(b, sq, sk, h, hk, d, dtype)} causal={causal} strict={strict}"
    assert_close(out, refs[0][0], refs[1][0], 2, f"out {tag}", seed)
    assert torch.isfinite(lse).all()
    assert_close(lse, refs[0][1], refs[1][1], 2, f"lse {tag}", seed)
    for name, g, r, lp in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), refs[0][2:], refs[1][2:]):
        assert_close(g, r, lp, 3, f"{name} {tag}", seed)
    return out, lse, (qg.grad, kg.grad, vg.grad)


SHAPES = [(2, 70, 70, 4, 2, 32, torch.bfloat16), (1, 113, 113, 2, 1, 64, torch.float16),
          (1, 40, 90, 2, 2, 40, torch.float32), (1, 1, 1, 1, 1, 16, torch.bfloat16)] + \
    gpu_only([(2, 2048, 2048, 8, 8, 64, torch.bfloat16), (1, 4096, 4096, 4, 2, 128, torch.bfloat16)])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + str(s[6])[5:])
@pytest.mark.parametrize("kind", ["qk", "hash"])
@pytest.mark.parametrize("causal", [True, False])
def test_sparse_matches_dense_masked_reference(kind, shape, causal, device, seed):
    run_sparse(kind, *shape, device, causal, seed)


@pytest.mark.parametrize("shape", [(2, 70, 70, 4, 2, 32, torch.bfloat16), (1, 33, 33, 2, 2, 16, torch.float32)])
def test_hash_strictly_causal(shape, device, seed):
    """strict_causal: j < i inside a bucket (no self-attention); the first token, and any token first in its
    bucket, sees nothing: out 0 and the empty-row LSE."""
    out, lse, _ = run_sparse("hash", *shape, device, True, seed, strict=True)
    assert (out[:, 0] == 0).all() and (lse[:, :, 0] == -1e30).all()
    q = torch.randn(1, 4, 1, 16, device=device)
    with pytest.raises(ValueError, match="strict_causal"):
        flashring.hash_sparse_attn_func(q, q, q, *(torch.zeros(1, 4, 1, dtype=torch.long, device=device),) * 2,
                                        causal=False, strict_causal=True)


@pytest.mark.parametrize("dtypes", [(torch.int32, torch.int32), (torch.int32, torch.int64), (torch.int16, torch.int32)])
def test_hash_bucket_id_dtypes(dtypes, device, seed):
    """Bucket ids of any integer dtype, mixed between q and k, GQA and not (int32 ids used to stay transposed in
    memory and the kernels read them with the wrong strides: found in review)."""
    for hk in (2, 1):
        qb = torch.randint(0, 3, (2, 70, 2), device=device, dtype=dtypes[0])
        kb = torch.randint(0, 3, (2, 70, hk), device=device, dtype=dtypes[1])
        run_sparse("hash", 2, 70, 70, 2, hk, 32, torch.float32, device, True, seed, qa=qb, ka=kb)


def test_hash_positions_never_borrow_from_the_bucket(device, seed):
    """Regression (review of strict_causal): the tile-range builder packs (bucket, position) into one sort key, so
    a negative query position (token 0 under strict causality, or seqlen_q > seqlen_k) read as the previous
    bucket and gave token 0 a full tile of future keys (and inf/NaN gradients). Token 0 alone in bucket 1 at the
    end of a query tile; and a causal call with seqlen_q > seqlen_k."""
    buckets = torch.zeros(1, 64, 1, dtype=torch.long, device=device)
    buckets[0, 0] = 1
    out, lse, grads = run_sparse("hash", 1, 64, 64, 1, 1, 16, torch.float32, device, True, seed, qa=buckets,
                                 ka=buckets, strict=True)
    assert (out[0, 0] == 0).all() and all(torch.isfinite(g).all() for g in grads)
    qb = torch.randint(0, 3, (1, 64, 2), device=device)
    kb = torch.randint(0, 3, (1, 62, 2), device=device)
    run_sparse("hash", 1, 64, 62, 2, 2, 16, torch.float32, device, True, seed, qa=qb, ka=kb)
    run_sparse("qk", 1, 64, 62, 2, 2, 16, torch.float32, device, True, seed)


def test_lsh_unit_norm_rotations():
    r = flashring.lsh_rotations(3, 16, 8, torch.Generator().manual_seed(0), unit_norm=True)
    assert torch.allclose(r.norm(dim=1), torch.ones(3, 4))
    x = torch.randn(2, 5, 3, 16)
    # bucket = argmax over [xR, -xR]: scale-invariant in x, so normalising x (shared-QK keys) keeps its bucket
    assert torch.equal(flashring.lsh_buckets(x, 8, r), flashring.lsh_buckets(3.0 * x, 8, r))


def test_keep_everything_equals_dense_flash(device, seed):
    b, s, h, d = 1, 77, 2, 32
    keep = torch.ones(b, s, h, dtype=torch.bool, device=device)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    dense = flashring.flash_attn_func(q, k, v, causal=True)
    sparse = flashring.qk_sparse_attn_func(q, k, v, keep, keep, causal=True)
    assert_close(sparse, dense.double(), dense, 0, "keep-all vs dense", seed)


def test_keep_nothing_gives_zeros(device, seed):
    b, s, h, d = 2, 30, 2, 16
    none = torch.zeros(b, s, h, dtype=torch.bool, device=device)
    q, k, v = (torch.randn(b, s, h, d, device=device, requires_grad=True) for _ in range(3))
    out, lse, _ = flashring.qk_sparse_attn_func(q, k, v, none, none, return_attn_probs=True)
    assert (out == 0).all() and (lse == masks.EMPTY_ROW_LSE).all()
    out.sum().backward()
    assert all((t.grad == 0).all() for t in (q, k, v))


def test_one_bucket_equals_dense_causal(device, seed):
    b, s, h, d = 1, 65, 2, 32
    zero = torch.zeros(b, s, h, dtype=torch.long, device=device)
    q, k, v = (torch.randn(b, s, h, d, device=device, dtype=torch.float16) for _ in range(3))
    dense = flashring.flash_attn_func(q, k, v, causal=True)
    sparse = flashring.hash_sparse_attn_func(q, k, v, zero, zero, causal=True)
    assert_close(sparse, dense.double(), dense, 0, "one bucket vs dense", seed)


def test_every_token_its_own_bucket(device, seed):
    # Query i only sees key i: out_i = v_i exactly (softmax over one element).
    b, s, h, d = 1, 50, 2, 16
    ids = torch.arange(s, device=device).view(1, s, 1).expand(b, s, h).contiguous()
    q, k, v = (torch.randn(b, s, h, d, device=device) for _ in range(3))
    out = flashring.hash_sparse_attn_func(q, k, v, ids, ids, causal=True)
    assert torch.allclose(out, v, atol=1e-6)


def test_ragged_keep_counts_per_head(device, seed):
    # Heads keep very different numbers of tokens (all, half, one, none): the per-head lengths path.
    b, s, h, d = 1, 48, 4, 16
    qa = torch.ones(b, s, h, dtype=torch.bool, device=device)
    qa[..., 1] = torch.rand(b, s, device=device) > 0.5
    qa[..., 2] = False
    qa[0, 17, 2] = True
    qa[..., 3] = False
    run_sparse("qk", b, s, s, h, h, d, torch.float32, device, True, seed, qa=qa, ka=qa.clone())


def test_compact_level_call_matches_front_end(device, seed):
    b, s, h, d = 1, 40, 2, 16
    q, k, v = (torch.randn(b, s, h, d, device=device) for _ in range(3))
    keep = torch.rand(b, s, h, device=device) > 0.4
    full = flashring.qk_sparse_attn_func(q, k, v, keep, keep, causal=True)
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    lens = keep.sum(1).to(torch.int32)
    gather = lambda x: x.gather(1, idx.unsqueeze(-1).expand(*idx.shape, d))  # noqa: E731
    out_c = flashring.sparse_attn_compact_func(gather(q), gather(k), gather(v), idx, idx, lens, lens, causal=True)
    for hh in range(h):
        n = int(lens[0, hh])
        assert torch.allclose(out_c[0, :n, hh], full[0, idx[0, :n, hh], hh], atol=1e-6)


def _random_side(b, h, s, hashed, device):
    """Random SparseMeta side tensors (B, H, S): ragged lengths (one head full, one empty), positions sorted by
    (bucket, position) within each head's length, PAD_POS past it."""
    lens = torch.randint(0, s + 1, (b, h), dtype=torch.int32, device=device)
    lens[0, 0], lens[-1, -1] = s, 0
    pos = torch.rand(b, h, 2 * s, device=device).argsort(-1)[..., :s].sort(-1).values     # distinct positions
    bkt = torch.randint(0, 4, (b, h, s), device=device) if hashed else None
    if hashed:
        order = (pos + (bkt << 31)).argsort(-1)
        pos, bkt = pos.gather(-1, order), bkt.gather(-1, order)
    pad = torch.arange(s, device=device) >= lens.unsqueeze(-1)
    pos = pos.masked_fill(pad, PAD_POS).int()
    return pos, (bkt.masked_fill(pad, PAD_POS).int() if hashed else None), lens


@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("from_keys", [False, True])
def test_tile_ranges_follow_the_visibility_rule(hashed, causal, from_keys, seed):
    """The one-launch range table against ``masks.sparse_visible``, GQA and ragged lengths included: every visible
    pair lies in [lo, hi); every tile of [mid_lo, mid_hi) (run without masking) is visible to every real row of
    the block and holds real columns only; ranges start tile-aligned; empty blocks get [0, 0, 0, 0]."""
    dev = "cuda" if CUDA else "cpu"
    b, h, hk, sq, sk = 2, 4, 2, 70, 90
    (qp, qb, ql), (kp, kb, kl) = _random_side(b, h, sq, hashed, dev), _random_side(b, hk, sk, hashed, dev)
    sp = SparseMeta(qp, kp, ql, kl, qb, kb, causal)
    ex = lambda t: None if t is None else t.repeat_interleave(h // hk, 1)  # noqa: E731 - K side to query heads
    row = lambda t: None if t is None else t.unsqueeze(-1)  # noqa: E731
    col = lambda t: None if t is None else ex(t).unsqueeze(-2)  # noqa: E731
    i, j = torch.arange(sq, device=dev).view(-1, 1), torch.arange(sk, device=dev).view(1, -1)
    vis = (i < ql[..., None, None]) & (j < ex(kl)[..., None, None]) & \
        sparse_visible(row(qp), col(kp), row(qb), col(kb), causal)                   # (B, H, Sq, Sk)
    rows_len, cols_len = (ex(kl), ql) if from_keys else (ql, ex(kl))
    if from_keys:
        vis = vis.transpose(-1, -2)                                                  # rows are keys
    for rows_block, cols_block in ((16, 32), (32, 16), (64, 64)):
        r = tile_ranges(sp, h // hk, rows_block, cols_block, from_keys).long().cpu()  # (B, H, nblk, 4)
        for bi in range(b):
            for hi in range(h):
                for blk in range(r.shape[2]):
                    lo, mid_lo, mid_hi, hi_ = r[bi, hi, blk].tolist()
                    tag = f"blocks {(rows_block, cols_block)} b={bi} h={hi} blk={blk} (seed {seed})"
                    rows = slice(blk * rows_block, min((blk + 1) * rows_block, int(rows_len[bi, hi])))
                    v = vis[bi, hi, rows].cpu()
                    if v.shape[0] == 0:
                        assert (lo, mid_lo, mid_hi, hi_) == (0, 0, 0, 0), tag
                        continue
                    assert lo <= mid_lo <= mid_hi <= hi_ and lo % cols_block == 0, tag
                    assert mid_lo == mid_hi or (mid_lo % cols_block == 0 and mid_hi % cols_block == 0), tag
                    seen = v.any(0).nonzero().flatten()
                    assert seen.numel() == 0 or (lo <= seen.min() and seen.max() < hi_), tag
                    assert mid_hi <= int(cols_len[bi, hi]) and bool(v[:, mid_lo:mid_hi].all()), tag


def test_lsh_buckets_reproducible_and_in_range():
    x = torch.randn(2, 33, 3, 16)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    b1, b2 = flashring.lsh_buckets(x, 8, generator=g1), flashring.lsh_buckets(x, 8, generator=g2)
    assert torch.equal(b1, b2) and b1.shape == (2, 33, 3) and 0 <= int(b1.min()) and int(b1.max()) < 8
    # Angular LSH is scale invariant and sends x and -x to opposite halves.
    r = flashring.lsh_rotations(3, 16, 8, torch.Generator().manual_seed(1))
    assert torch.equal(flashring.lsh_buckets(3.0 * x, 8, rotations=r), flashring.lsh_buckets(x, 8, rotations=r))
    assert torch.equal((flashring.lsh_buckets(-x, 8, rotations=r) + 4) % 8, flashring.lsh_buckets(x, 8, rotations=r))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(q_keep=torch.ones(1, 8, 2, dtype=torch.int64)), TypeError, "q_keep must be a bool"),
    (dict(k_keep=torch.ones(1, 7, 2, dtype=torch.bool)), ValueError, "k_keep must have shape"),
    (dict(causal=1), TypeError, "causal"),
])
def test_qk_bad_input(kwargs, exc, match):
    q = torch.randn(1, 8, 2, 16)
    keep = torch.ones(1, 8, 2, dtype=torch.bool)
    args = dict(q=q, k=q, v=q, q_keep=keep, k_keep=keep)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        flashring.qk_sparse_attn_func(**args)


@pytest.mark.parametrize("qb, exc, match", [
    (torch.full((1, 8, 2), -1), ValueError, "bucket ids"),
    (torch.zeros(1, 8, 2), TypeError, "integer"),
    (torch.zeros(1, 8, 3, dtype=torch.long), ValueError, "shape"),
])
def test_hash_bad_input(qb, exc, match):
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(exc, match=match):
        flashring.hash_sparse_attn_func(q, q, q, qb, torch.zeros(1, 8, 2, dtype=torch.long))


def test_compact_unsorted_indices_rejected():
    q = torch.randn(1, 8, 1, 16)
    idx = torch.arange(8).flip(0).view(1, 8, 1)
    with pytest.raises(ValueError, match="sorted"):
        flashring.sparse_attn_compact_func(q, q, q, idx, idx)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["qk", "hash"])
def test_sparse_fwd_bwd_is_capturable_in_a_cuda_graph(kind, seed):
    """No host syncs or host-to-device copies per call: the whole sparse forward + backward, LSH included,
    replays from a CUDA graph with the same result as eager."""
    b, s, h, d = 2, 1024, 4, 64
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    keep = [torch.rand(b, s, h, device="cuda") > 0.5 for _ in range(2)]

    def step():
        for t in leaves:
            t.grad = None
        if kind == "qk":
            out = flashring.qk_sparse_attn_func(*leaves, *keep, causal=True)
        else:
            rot = flashring.lsh_rotations(h, d, 8, device="cuda")
            qb, kb = flashring.lsh_buckets(leaves[0], 8, rot), flashring.lsh_buckets(leaves[1], 8, rot)
            out = flashring.hash_sparse_attn_func(*leaves, qb, kb, causal=True)
        out.backward(do)
        return out

    torch.manual_seed(seed)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):                                     # warm-up (compiles kernels) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    torch.manual_seed(seed)
    graph.replay()
    torch.cuda.synchronize()
    got = (out.clone(), *(t.grad.clone() for t in leaves))
    torch.manual_seed(seed)
    eager = step()
    want = (eager, *(t.grad for t in leaves))
    for a, w in zip(got, want):
        assert torch.isfinite(a).all() and (kind == "hash" or torch.equal(a, w))


def _front_end(kind, shape, device, drop, buckets):
    """The public sparse function of ``kind`` and random (q, k) sides of ``shape`` (B, S, H): keep masks that drop
    the given fractions, or bucket ids in [0, buckets)."""
    if kind == "qk":
        return flashring.qk_sparse_attn_func, tuple(torch.rand(shape, device=device) > p for p in drop)
    return flashring.hash_sparse_attn_func, tuple(torch.randint(0, buckets, shape, device=device) for _ in range(2))


@pytest.mark.parametrize("kind", ["qk", "hash"])
def test_sparse_reads_strided_views_in_place(kind, device, seed):
    """The kernels read q / k / v and dout and write out and the gradients through the front ends' row tables
    (``SparseMeta.q_rows`` / ``k_rows``): views of a fused projection, as a model's q / v are, give bitwise the
    results of contiguous copies, and the gradient lands in the fused tensor's layout."""
    b, s, h, d = 2, 37, 3, 33
    qkv = torch.randn(b, s, 3, h, d, device=device, requires_grad=True)
    dout = torch.randn(b, s, h, d, device=device)
    fn, side = _front_end(kind, (b, s, h), device, drop=(0.4, 0.4), buckets=3)
    out, lse, _ = fn(*qkv.unbind(2), *side, return_attn_probs=True)
    out.backward(dout)
    copies = [t.detach().clone().requires_grad_() for t in qkv.unbind(2)]
    out_c, lse_c, _ = fn(*copies, *side, return_attn_probs=True)
    out_c.backward(dout)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    assert torch.equal(qkv.grad, torch.stack([t.grad for t in copies], 2))


@pytest.mark.parametrize("kind", ["qk", "hash"])
def test_row_tables_read_ahead_or_in_the_iteration_agree(kind, device, seed, monkeypatch):
    """The row-table kernels read the next tile's row-table entries one iteration ahead or in the iteration
    (``ops.flash.ROWS_AHEAD_MAX_D``, per pass): both give bitwise the same forward, LSE and gradients (lengths that
    leave partial tiles, and kept sets that leave some tiles empty)."""
    from flashring.ops import dispatch, flash
    if device != "cuda" and dispatch.CPU_BACKEND != "triton":
        pytest.skip("the chunked PyTorch path has no row tables")
    b, s, h, d = 2, 77, 2, 24
    q, k, v = (torch.randn(b, s, h, d, device=device, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, s, h, d, device=device)
    fn, side = _front_end(kind, (b, s, h), device, drop=(0.3, 0.6), buckets=4)
    res = []
    for max_d in (0, 1024):
        monkeypatch.setattr(flash, "ROWS_AHEAD_MAX_D", dict(fwd=max_d, bwd=max_d))
        out, lse, _ = fn(q, k, v, *side, return_attn_probs=True)
        res.append((out, lse, *torch.autograd.grad(out, (q, k, v), dout)))
    # one backward kernel ahead and the other not (launch-config keys, as benchmarks/sparse_tiles.py sets them)
    base = flash.default_config
    for keys in (dict(ROWS_AHEAD_DKDV=True), dict(ROWS_AHEAD_DQ=True)):
        monkeypatch.setattr(flash, "default_config", lambda *a, backward=False, keys=keys, **kw: dict(
            base(*a, backward=backward, **kw), ROWS_AHEAD=False, **(keys if backward else {})))
        out, lse, _ = fn(q, k, v, *side, return_attn_probs=True)
        res.append((out, lse, *torch.autograd.grad(out, (q, k, v), dout)))
    for got in res[1:]:
        for a, w in zip(got, res[0]):
            assert torch.isfinite(a).all() and torch.equal(a, w)


@pytest.mark.parametrize("shape", [(2, 37, 3, 5), (1, 1, 2, 8), (2, 300, 2, 64), (1, 1023, 1, 2), (1, 40, 2, 128)])
def test_partition_is_a_stable_sort(shape, seed):
    """ops.partition (the front ends' counting sort) against torch.sort: the slot order, positions, keys and
    lengths, for bucket ids and keep masks, transposed ids, one token, and ids past the bound flagged."""
    from flashring.ops.partition import partition
    b, s, h, n = shape
    dev = "cuda" if CUDA else "cpu"
    ids = torch.randint(0, n, (b, h, s), device=dev).transpose(1, 2)              # (B, S, H), strided
    perm, lens, pos, bkt, bad = partition(ids, n, 3, keep=False)
    want_ids, want = torch.sort(ids.transpose(1, 2), dim=-1, stable=True)
    assert torch.equal(perm, want) and torch.equal(bkt.long(), want_ids) and torch.equal(pos.long(), want + 3)
    assert (lens == s).all() and int(bad.sum()) == 0
    keep = torch.rand(b, s, h, device=dev) > 0.5
    perm, lens, pos, bkt, _ = partition(keep, 2, 1, keep=True)
    kept = keep.transpose(1, 2)
    want = torch.sort((~kept).long(), dim=-1, stable=True)[1]
    n_kept = kept.sum(-1, keepdim=True)
    assert bkt is None and torch.equal(perm, want) and torch.equal(lens.long(), n_kept.squeeze(-1))
    assert torch.equal(pos.long(), torch.where(torch.arange(s, device=dev) < n_kept, want + 1, PAD_POS))
    ids = ids.clone()
    ids[0, 0, 0] = n
    ids[-1, -1, -1] = -1
    assert int(partition(ids, n, 0, keep=False)[4].sum()) == (1 if b * s * h == 1 else 2)


@pytest.mark.parametrize("strict", [False, True])
def test_hash_num_buckets_gives_the_sorted_result(device, strict, seed):
    """hash_sparse_attn_func with num_buckets (counting sort) equals the call without it (torch.sort), forward,
    LSE and gradients, bitwise; ids past num_buckets and bad values of it raise naming the argument."""
    q, k, v = (torch.randn(2, 67, 4, 16, device=device, requires_grad=True) for _ in range(3))
    qb, kb = (torch.randint(0, 6, (2, 67, 4), device=device) for _ in range(2))
    dout = torch.randn_like(q)
    res = []
    for nb in (None, 6):
        out, lse, _ = flashring.hash_sparse_attn_func(q, k, v, qb, kb, strict_causal=strict, num_buckets=nb,
                                                      return_attn_probs=True)
        res.append((out, lse, *torch.autograd.grad(out, (q, k, v), dout)))
    for a, b in zip(*res):
        assert torch.equal(a, b)
    # one tensor for both sides (shared-QK models): ordered once, the same result as two equal tensors
    shared = flashring.hash_sparse_attn_func(q, k, v, qb, qb, strict_causal=strict, num_buckets=6)
    assert torch.equal(shared, flashring.hash_sparse_attn_func(q, k, v, qb, qb.clone(), strict_causal=strict,
                                                               num_buckets=6))
    # anything with __index__ is an int (numpy integers, 0-d integer tensors)
    assert torch.equal(flashring.hash_sparse_attn_func(q, k, v, qb, kb, strict_causal=strict,
                                                       num_buckets=torch.tensor(6)), res[1][0])
    if device == "cpu":
        bound = int(qb.max()) + 1
        kb[0, 0, 0] = bound
        with pytest.raises(ValueError, match=rf"k_buckets must hold bucket ids in \[0, {bound}\)"):
            flashring.hash_sparse_attn_func(q, k, v, qb, kb, num_buckets=bound)
    with pytest.raises(TypeError, match="num_buckets"):
        flashring.hash_sparse_attn_func(q, k, v, qb, kb, num_buckets=6.0)

    with pytest.raises(ValueError, match="num_buckets"):
        flashring.hash_sparse_attn_func(q, k, v, qb, kb, num_buckets=0)


def test_partition_applies_only_where_its_count_table_stays_small():
    """ops.partition's scatter reads its row's whole (chunks, keys) count table: past MAX_COUNT_CELLS cells (or
    MAX_KEYS keys, or unknown keys) the front ends sort instead (a review found kilobytes of spills and reads
    growing with chunks^2 at 128 buckets and S >= 128k)."""
    from flashring.ops import partition
    assert partition.applies(16, 131072) and partition.applies(128, 16384) and partition.applies(2, 1, keep=True)
    assert not partition.applies(128, 32768) and not partition.applies(16, 2 ** 21)
    assert not partition.applies(None, 1024) and not partition.applies(129, 1024) and not partition.applies(0, 64)
    assert partition.applies(None, 8192, keep=True) and not partition.applies(None, 2 ** 27, keep=True)


def test_row_tables_are_checked(device):
    """The kernels index the row tables as contiguous (B, H, S): one given without the other, or a strided one, is a
    ValueError naming it, not rows read from the wrong place."""
    from flashring.ops import sparse_ranges
    s = 8
    pos = torch.arange(s, dtype=torch.int32).expand(1, 2, s).contiguous()
    lens = torch.full((1, 2), s, dtype=torch.int32)
    rows = torch.arange(s).expand(1, 2, s).contiguous()
    meta = sparse_ranges.SparseMeta(pos, pos, lens, lens, None, None, True, rows, None)
    with pytest.raises(ValueError, match="q_rows and k_rows"):
        sparse_ranges.kernel_side(meta, 1, 16, 16, from_keys=False)
    strided = torch.arange(s).expand(1, 2, s)
    with pytest.raises(ValueError, match="k_rows must be a contiguous"):
        sparse_ranges.kernel_side(meta._replace(k_rows=strided), 1, 16, 16, from_keys=False)


@pytest.mark.parametrize("rows", [True, False])
def test_slot_copy_zeroes_the_padding(rows, device, seed):
    """``sparse_ranges.slot_copy`` (what the Gluon kernels read): slot order with the slots past each head's count
    zero up to the next tile (``SLOT_PAD_TO``), never read (an inf / NaN there stays out), two tensors (one a
    strided view, as a fused projection's) and the LSE / delta rows (padding +inf / 0) per launch, by the Triton
    launch and the torch path alike; ``slot_return`` puts results back with the padding slots' rows zero,
    unread."""
    from flashring.ops.sparse_ranges import SLOT_PAD_TO, gather_rows, scatter_rows, slot_copy, slot_return
    b, s, h, d = 2, 300, 3, 16
    xs = [torch.randn(b, s, 2, h, d, device=device)[:, :, 1]] + [torch.randn(b, s, h, d, device=device)
                                                               for _ in range(2)]
    lse, delta = torch.randn(b, h, s, device=device), torch.randn(b, h, s, device=device)
    perm = torch.rand(b, h, s, device=device).argsort(-1) if rows else None
    lens = torch.randint(0, s + 1, (b, h), device=device, dtype=torch.int32)
    lens[0, 0], lens[-1, -1] = 0, 129
    slot = torch.arange(s, device=device)
    pad = slot >= lens.unsqueeze(-1)                                                    # (B, H, S)
    written = (slot < (lens.unsqueeze(-1) + SLOT_PAD_TO - 1) // SLOT_PAD_TO * SLOT_PAD_TO).transpose(1, 2)
    src = [x if perm is None else gather_rows(x, perm) for x in xs]
    want = [t.masked_fill(pad.transpose(1, 2).unsqueeze(-1), 0) for t in src]
    side_src = [t if perm is None else gather_rows(t, perm) for t in (lse, delta)]
    want_side = [side_src[0].masked_fill(pad, float("inf")), side_src[1].masked_fill(pad, 0.0)]
    if perm is None:                                    # the padding is never read (want is a copy already)
        for x in xs:
            x.transpose(1, 2)[pad] = float("nan")
    for kernel in (True, False):
        got, side = slot_copy(xs[:2], perm, lens, sides=(lse, delta), kernel=kernel)
        got += slot_copy(xs[2:], perm, lens, kernel=kernel)
        for g, w in zip(got, want):
            assert torch.equal(g[written], w[written]), kernel
        for g, w in zip(side, want_side):
            assert torch.equal(g, w), kernel
    if perm is not None:
        back = slot_return([t.masked_fill(pad.transpose(1, 2).unsqueeze(-1), float("nan")) for t in src[:2]], perm,
                           lens)
        for g, w in zip(back, want):
            assert torch.equal(g, scatter_rows(w, perm))


@pytest.mark.parametrize("dlse", [False, True])
def test_preprocess_computes_only_the_kept_rows(dlse, device, seed):
    """``flash.preprocess`` with a sparse call's row tables (what both sparse backwards run): delta = rowsum(dO * O)
    - dlse at each kept token's row, bitwise what the dense preprocess gives there (the same arithmetic, read
    through the table); the dropped tokens' rows are not computed (never read; their out / dout are NaN here and
    reach no kept row). A head that keeps nothing, one that keeps all."""
    from flashring.ops import flash
    b, s, h, d = 2, 150, 3, 40
    out, do = (torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    keep = torch.rand(b, s, h, device=device) > 0.6
    keep[0, :, 0], keep[1, :, 2] = False, True
    out[~keep], do[~keep] = float("nan"), float("nan")
    perm = torch.argsort((~keep).transpose(1, 2).to(torch.int8), dim=-1, stable=True).contiguous()  # kept first
    lens = keep.sum(1).to(torch.int32)
    pos = perm.to(torch.int32)
    meta = SparseMeta(pos, pos, lens, lens, None, None, True, perm, perm)
    lse = torch.randn(b, h, s, device=device)
    grad = torch.randn(b, h, s, device=device) if dlse else None
    seq = (h, s, s, None, None)
    got = flash.preprocess(out, do, lse, grad, seq, sparse=meta)
    dense = flash.preprocess(out, do, lse, grad, seq)
    kept = keep.transpose(1, 2)
    assert torch.equal(got[kept], dense[kept]), f"seed {seed}"
    assert torch.isfinite(got[kept]).all()
