"""Ring attention on real multi-process gloo groups (CPU), checked against the float64 reference on the full
sequence. Several configurations run inside one spawned group per world size to keep the suite fast."""
from __future__ import annotations

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _dist import run_distributed  # noqa: E402

from flashring.masks import EMPTY_ROW_LSE, visible_mask  # noqa: E402
from flashring.ops.dispatch import bwd as flash_bwd, fwd as flash_fwd  # noqa: E402
from flashring.ring import (local_positions, merge_partial, ring_flash_attn_func, shard_sequence,  # noqa: E402
                            step_plan, unshard_sequence)
from flashring.testing import attention_ref, check_close  # noqa: E402

# Spawned workers re-import this module (and would draw a new seed): the parent's SEED is passed to them.
SEED = int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))


# ------------------------------------------------------------------------------------------- per-rank checks
# (batch, seqlen_local, nheads, nheads_k, headdim, layout, causal, with_dlse, dtype)
CONFIGS = [
    (1, 8, 2, 2, 16, "zigzag", True, False, torch.float32),
    (2, 12, 4, 2, 32, "zigzag", True, True, torch.float32),     # GQA + gradient through lse
    (1, 10, 2, 2, 16, "zigzag", False, False, torch.float32),
    (2, 9, 4, 1, 16, "contiguous", True, True, torch.float32),   # odd local length, MQA
    (1, 24, 2, 2, 32, "contiguous", False, False, torch.float32),
    (2, 16, 4, 2, 16, "contiguous", True, False, torch.float32),
    (1, 16, 4, 2, 16, "zigzag", True, True, torch.bfloat16),
]


def _loss(out, lse, dout, dlse):
    loss = (out.float() * dout).sum()
    return loss + (lse * dlse).sum() if dlse is not None else loss


def _check_config(rank, world, cfg, seed, group=None, device="cpu"):
    """Returns a list of failure strings (empty = pass). Every rank builds the same full inputs from ``seed``."""
    b, s_loc, h, hk, d, layout, causal, with_dlse, dtype = cfg
    n = s_loc * world
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, hh, d, generator=g).to(device, dtype) for hh in (h, hk, hk))
    dout = torch.randn(b, n, h, d, generator=g).to(device)
    dlse = torch.randn(b, h, n, generator=g).to(device) if with_dlse else None
    upper = 0 if causal else None

    grads, outs = {}, {}
    for name, ref_dtype in (("ref", torch.float64), ("low", None)):   # low = same math in the input dtype
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, l = attention_ref(*leaves, None, None, upper, dtype=ref_dtype)
        _loss(o, l, dout, dlse).backward()
        outs[name] = (o.detach(), l.detach())
        grads[name] = [t.grad for t in leaves]

    kw = dict(group=group, layout=layout)
    ql, kl, vl = (shard_sequence(t, **kw).detach().requires_grad_() for t in (q, k, v))
    out, lse, none = ring_flash_attn_func(ql, kl, vl, causal=causal, return_attn_probs=True, **kw)
    assert none is None and out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, h, s_loc)
    _loss(out, lse, shard_sequence(dout, **kw), None if dlse is None else shard_sequence(dlse, dim=2, **kw)).backward()

    checks = [("out", out, outs["ref"][0], outs["low"][0], 1, 2), ("lse", lse, outs["ref"][1], outs["low"][1], 2, 2)]
    checks += [(nm, t.grad, grads["ref"][i], grads["low"][i], 1, 3) for i, (nm, t) in enumerate(zip("qkv", (ql, kl, vl)))]
    fails = []
    for name, got, ref, low, dim, factor in checks:
        ref_l, low_l = shard_sequence(ref, dim=dim, **kw), shard_sequence(low, dim=dim, **kw)
        if name in "qkv":
            name = "d" + name
        c = check_close(got, ref_l, low_l, factor, dtype)
        if not c["ok"]:
            fails.append(f"rank {rank}/{world} cfg={cfg} seed={seed}: {name} error {c['err']:.3g} > tolerance "
                         f"{c['tol']:.3g}")
    return fails


def _roundtrip(rank, world, seed, group=None):
    fails = []
    x = torch.randn(2, 4 * world, 3, 6, generator=torch.Generator().manual_seed(seed))
    for layout in ("zigzag", "contiguous"):
        for dim in (1, 2, -1):
            if x.shape[dim] % (2 * world if layout == "zigzag" else world):
                continue
            loc = shard_sequence(x, group=group, layout=layout, dim=dim)
            pos = local_positions(loc.shape[dim], dist_rank(group), world, layout)
            if not torch.equal(loc, x.index_select(dim % 4, pos)):
                fails.append(f"rank {rank}: shard_sequence({layout}, dim={dim}) holds the wrong positions")
            if not torch.equal(unshard_sequence(loc, group=group, layout=layout, dim=dim), x):
                fails.append(f"rank {rank}: unshard(shard(x)) != x for layout={layout} dim={dim}")
    return fails


def dist_rank(group):
    import torch.distributed as dist
    return dist.get_rank(group)


def _expect_error(fn, exc=ValueError, match=None):
    try:
        fn()
    except exc as e:
        return [] if match is None or match in str(e) else [f"{exc.__name__} without {match!r}: {e}"]
    except Exception as e:  # noqa: BLE001 - the wrong error type is itself the failure to report
        return [f"expected {exc.__name__}, got {type(e).__name__}: {e}"]
    return [f"expected {exc.__name__}, nothing raised"]


def _bad_inputs(rank, world):
    """Errors raised consistently on every rank: divisibility, odd zigzag shard, bad layout."""
    fails = []
    odd = torch.randn(1, 2 * world + 1, 2, 4)
    fails += _expect_error(lambda: shard_sequence(odd, layout="zigzag"), match="divisible by")
    if world > 1:                   # any length divides into 1 contiguous part
        fails += _expect_error(lambda: shard_sequence(torch.randn(1, world + 1, 2, 4), layout="contiguous"),
                               match="divisible by")
    fails += _expect_error(lambda: unshard_sequence(torch.randn(1, 3, 2, 4), layout="zigzag"), match="even")
    q = torch.randn(1, 6, 2, 8)
    fails += _expect_error(lambda: ring_flash_attn_func(q, q, q, layout="ring"), match="layout")
    q5 = torch.randn(1, 5, 2, 8)
    fails += _expect_error(lambda: ring_flash_attn_func(q5, q5, q5, layout="zigzag"), match="even")
    return [f"rank {rank}: {f}" for f in fails]


def _run_all(rank, world, seed):
    import torch.distributed as dist
    fails = []
    for i, cfg in enumerate(CONFIGS):
        fails += _check_config(rank, world, cfg, seed + i)
    fails += _roundtrip(rank, world, seed)
    fails += _bad_inputs(rank, world)
    if world == 4:
        # Subgroups {0, 2} and {1, 3}: group rank -> global rank mapping must be used for the P2P peers.
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        mine = groups[rank % 2]
        fails += _check_config(rank, 2, CONFIGS[1], seed + 100, group=mine)
        fails += _check_config(rank, 2, CONFIGS[3], seed + 101, group=mine)
        fails += _roundtrip(rank, 2, seed, group=mine)
    return fails


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ring_matches_reference(world):
    # World 8 on CI's 2 cores: 8 gloo ranks oversubscribe the CPU, hence the longer timeout.
    fails = [f for rank_fails in run_distributed(_run_all, world, SEED, timeout_s=80 if world <= 4 else 240)
             for f in rank_fails]
    assert not fails, f"FLASHRING_SEED={SEED}\n" + "\n".join(fails)


# ------------------------------------------------------------------------------------- mismatch across ranks
def _mismatch(rank, world):
    """Each case must raise on every rank; afterwards the group is still in step (a matched call succeeds)."""
    outcome = []
    base = dict(b=1, s=8, h=2, d=16, dtype=torch.float32, causal=True, layout="zigzag")
    cases = [dict(s=8 + 2 * rank), dict(causal=rank == 0), dict(h=2 + 2 * rank),
             dict(dtype=torch.float64 if rank == 1 else torch.float32),   # local TypeError on rank 1 only
             dict(layout="contiguous" if rank == 0 else "zigzag")]
    for case in cases:
        c = {**base, **case}
        q = torch.randn(c["b"], c["s"], c["h"], c["d"], dtype=c["dtype"])
        try:
            ring_flash_attn_func(q, q, q, causal=c["causal"], layout=c["layout"])
            outcome.append(None)
        except (ValueError, TypeError) as e:
            outcome.append(type(e).__name__)
    q = torch.randn(1, 8, 2, 16)
    ok = ring_flash_attn_func(q, q, q, causal=True)
    return outcome, tuple(ok.shape)


# (batch, seqlen_local, nheads, nheads_k, headdim, layout, causal, with_dlse, dtype): the old NCCL check's cases
GPU_CONFIGS = [(1, 1024, 8, 8, 128, "zigzag", True, False, torch.bfloat16),
               (1, 1024, 8, 2, 128, "contiguous", True, True, torch.bfloat16),
               (1, 1500, 4, 4, 64, "zigzag", False, False, torch.bfloat16),
               (1, 4096, 4, 1, 128, "zigzag", True, False, torch.bfloat16),
               (1, 510, 4, 4, 96, "zigzag", True, True, torch.float16)]


def _run_nccl(rank, world, seed):
    return [f for i, cfg in enumerate(GPU_CONFIGS) for f in _check_config(rank, world, cfg, seed + i,
                                                                         device=f"cuda:{rank}")]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="ring attention over NCCL needs 2 GPUs")
def test_ring_nccl_matches_reference():
    fails = [f for r in run_distributed(_run_nccl, 2, SEED, timeout_s=600, pg_timeout_s=300, backend="nccl")
             for f in r]
    assert not fails, f"FLASHRING_SEED={SEED}\n" + "\n".join(fails)


def test_mismatched_inputs_raise_on_every_rank():
    results = run_distributed(_mismatch, 3, timeout_s=60, pg_timeout_s=20)
    for rank, (outcome, shape) in enumerate(results):
        assert all(o is not None for o in outcome), f"rank {rank} did not raise for some case: {outcome}"
        assert shape == (1, 8, 2, 16)
    assert results[1][0][3] == "TypeError" and results[0][0][3] == "ValueError"


# --------------------------------------------------------------------------------------- single process
@pytest.mark.parametrize("world", [2, 3, 4, 5])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_step_plan_matches_dense_causal_mask(world, layout):
    """Union of the per-step plans == the dense causal mask on global positions, blocks never overlap."""
    s = 6
    for rank in range(world):
        pq = local_positions(s, rank, world, layout)
        covered = torch.zeros(s, world * s, dtype=torch.int32)
        for source in range(world):
            pk = local_positions(s, source, world, layout)
            plan = step_plan(rank, source, True, layout, s)
            m = torch.zeros(s, s, dtype=torch.int32)
            if plan is not None:
                qs, ks, lo, up = plan
                iq, ik = torch.arange(s)[qs], torch.arange(s)[ks]
                m[iq.unsqueeze(1), ik.unsqueeze(0)] = visible_mask(len(iq), len(ik), lo, up).int()
            covered[:, pk] += m
        dense = (torch.arange(world * s).unsqueeze(0) <= pq.unsqueeze(1)).int()
        assert torch.equal(covered, dense), f"world={world} rank={rank} layout={layout}"


def test_world_one_without_process_group_matches_flash():
    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(2, 7, hh, 16, generator=g) for hh in (4, 2, 2))
    for causal in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ring_flash_attn_func(*leaves, causal=causal, layout="contiguous")
        ref_out, ref_lse = flash_fwd(q, k, v, 0.25, None, 0 if causal else None)
        do = torch.randn(out.shape, generator=g)
        out.backward(do)
        ref = flash_bwd(do, q, k, v, ref_out, ref_lse, 0.25, None, 0 if causal else None)
        assert torch.allclose(out, ref_out, atol=1e-6, rtol=0), f"seed={SEED}"
        for t, r in zip(leaves, ref):
            assert torch.allclose(t.grad, r, atol=1e-6, rtol=0), f"seed={SEED}"


@pytest.mark.parametrize("call, exc, match", [
    (lambda q: ring_flash_attn_func(q, q, q, layout="ring"), ValueError, "layout"),
    (lambda q: ring_flash_attn_func(q[:, :5], q[:, :5], q[:, :5]), ValueError, "even local seqlen"),
    (lambda q: ring_flash_attn_func(q, q[:, :4], q[:, :4]), ValueError, "same local sequence"),
    (lambda q: ring_flash_attn_func(q, q, q, causal=1), TypeError, "causal"),
    (lambda q: ring_flash_attn_func(q.double(), q.double(), q.double()), TypeError, "dtype"),
    (lambda q: ring_flash_attn_func(q, q, q, softmax_scale=-1.0), ValueError, "softmax_scale"),
    (lambda q: ring_flash_attn_func(q[0], q[0], q[0]), ValueError, "4 dims"),
    (lambda q: shard_sequence(q, layout="zigzag", dim=5), ValueError, "dim"),
    (lambda q: shard_sequence(q[:, :5], layout="zigzag"), ValueError, "divisible by 2"),
    (lambda q: ring_flash_attn_func(q, q, q, group=object()), ValueError, "not initialised"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(1, 6, 2, 8))


def test_merge_partial_is_exact_and_empty_rows_are_identity():
    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(2, 10, 3, 8, generator=g) for _ in range(3))
    full_out, full_lse = attention_ref(q, k, v)
    out = torch.zeros(2, 10, 3, 8)
    lse = torch.full((2, 3, 10), EMPTY_ROW_LSE)
    for ks in (slice(0, 4), slice(4, 10)):                 # two key blocks, merged into the empty start
        merge_partial(out, lse, *flash_fwd(q, k[:, ks], v[:, ks], 8 ** -0.5))
    low_out, low_lse = attention_ref(q, k, v, dtype=None)
    assert check_close(out, full_out, low_out, 2)["ok"], f"seed={SEED}"
    assert check_close(lse, full_lse, low_lse, 2)["ok"], f"seed={SEED}"
    before = out.clone(), lse.clone()
    merge_partial(out, lse, torch.zeros_like(out), torch.full_like(lse, EMPTY_ROW_LSE))   # an all-empty block
    assert torch.equal(out, before[0]) and torch.equal(lse, before[1])
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, EMPTY_ROW_LSE)
    merge_partial(empty_out, empty_lse, torch.zeros_like(out), torch.full_like(lse, EMPTY_ROW_LSE))
    assert torch.equal(empty_out, torch.zeros_like(out)) and bool((empty_lse == EMPTY_ROW_LSE).all())
