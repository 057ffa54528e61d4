"""The Hopper backward (ops/hopper_bwd.py, on by default; ``FLASHRING_HOPPER_BWD``): which calls it takes and which dQ
variant it picks, its kernels compiled for sm_90 without a GPU, and on an sm_90 GPU its gradients through the
public API against the float64 reference (both dQ variants, GQA, causal and not, fp16 / bf16, a gradient on the
LSE), with ``deterministic=True`` never taking the atomic variant and giving bitwise-equal gradients."""
import re

import pytest
import torch

import flashring
from flashring.ops import flash, hopper, hopper_bwd
from flashring.testing import GRAD_FACTOR, assert_close, attention_ref, reference_pair
from test_compile import probe

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and hopper_bwd.AVAILABLE
SMEM_MAX = 232_448          # sm_90's largest dynamic shared memory per block (227 KB)


def test_applies_only_where_the_kernels_are_exact():
    q = torch.empty(2, 256, 4, 128, dtype=torch.bfloat16)
    k = torch.empty(2, 256, 2, 128, dtype=torch.bfloat16)
    assert hopper_bwd.applies(q, k, k, None, None, 0.0) and hopper_bwd.applies(q, k, k, None, 0, 0.0)
    assert hopper_bwd.applies(q[..., :64].contiguous(), k[..., :64].contiguous(), k[..., :64].contiguous(), None,
                              0, 0.0)
    assert hopper_bwd.applies(q.half(), k.half(), k.half(), None, 0, 0.0)
    assert not hopper_bwd.applies(q, k, k, None, -2, 0.0)                   # a band other than (strict) causal
    assert not hopper_bwd.applies(q, k, k, -16, 0, 0.0)                     # window
    assert not hopper_bwd.applies(q, k, k, None, 0, 30.0)                   # softcap
    assert not hopper_bwd.applies(q.float(), k.float(), k.float(), None, 0, 0.0)
    assert not hopper_bwd.applies(q, k.half(), k.half(), None, 0, 0.0)      # mixed dtypes
    short = q[:, :200].contiguous(), k[:, :200].contiguous()
    assert not hopper_bwd.applies(short[0], short[1], short[1], None, 0, 0.0)           # S % 128 != 0
    assert not hopper_bwd.applies(q, k[:, :128].contiguous(), k[:, :128].contiguous(), None, None, 0.0)
    assert not hopper_bwd.applies(q[..., :96], k[..., :96], k[..., :96], None, None, 0.0)
    assert not hopper_bwd.applies(q.transpose(1, 2).contiguous().transpose(1, 2), k, k, None, None, 0.0)
    assert not hopper_bwd.applies(q, torch.empty(2, 256, 3, 128, dtype=torch.bfloat16),
                                  torch.empty(2, 256, 3, 128, dtype=torch.bfloat16), None, 0, 0.0)   # 4 % 3
    flat = torch.empty(2 * 256 * 4 * 128 + 4, dtype=torch.bfloat16)
    assert not hopper_bwd.applies(flat[4:].view(2, 256, 4, 128), k, k, None, 0, 0.0)   # 8-byte aligned only
    assert not hopper_bwd.enabled(torch.device("cpu"))


def test_switch_and_deterministic(monkeypatch):
    monkeypatch.delenv(hopper_bwd.ENV, raising=False)
    assert hopper_bwd.dq_mode(False) == "separate"                    # the default (session 8's measurement)
    monkeypatch.setenv(hopper_bwd.ENV, "0")
    assert hopper_bwd.dq_mode(False) is None
    for value in ("1", "separate"):
        monkeypatch.setenv(hopper_bwd.ENV, value)
        assert hopper_bwd.dq_mode(False) == hopper_bwd.dq_mode(True) == "separate"
    monkeypatch.setenv(hopper_bwd.ENV, "atomic")
    assert hopper_bwd.dq_mode(False) == "atomic"
    assert hopper_bwd.dq_mode(True) == "separate" and hopper_bwd.dq_mode() == "separate"
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert hopper_bwd.dq_mode(False) == "separate"                    # torch's global switch wins too


def test_delta_from_the_portable_preprocess():
    """delta = rowsum(dO * O) - dlse, (B, H, S) fp32, from ops.flash's preprocess kernel (the interpreter on CPU)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out, do = (torch.randn(2, 128, 3, 64, device=dev, dtype=torch.bfloat16) for _ in range(2))
    lse, dlse = (torch.randn(2, 3, 128, device=dev) for _ in range(2))
    want = (out.float() * do.float()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(hopper_bwd._delta(out, do, lse, None), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hopper_bwd._delta(out, do, lse, dlse), want - dlse, atol=1e-4, rtol=1e-4)


PROBE_LINE = (r"D=(\d+)\s+causal=(\w+)\s+window=None\s+(HOPPER_\w+) \{'dq': '(\w+)'\}\n\s+regs\s+(\d+) stack\s+(\d+) B"
              r"\s+smem\s+(\d+) B\s+spills/MMAs between branches: ([\d\sms/]*?)\s+"
              r"(?:exp2s between wgmma waits: \[[\d, ]*\]\s+)?wgmma (\d+)")


def test_hopper_backward_compiles_for_sm90_without_spills():
    """Every variant (head dim 64 / 128, causal or not, dQ separate or atomic) compiles for sm_90 within the shared
    memory limit, with wgmma, and without local memory in any span of the SASS that holds MMAs. Triton 3.6's ptxas
    (the GPU image's) leaves the D=128 atomic dK/dV kernel scalar spills: 16 B outside its step loop without a
    mask, 40 B causal with a few one-register reloads inside it (ops/hopper_bwd.py); everything else has no stack
    at all."""
    out = probe("--hopper-bwd", "--headdims", "64,128", "--seqlen", "1024", "--loops")
    if "not available" in out:
        pytest.skip("this Triton has no Gluon")
    found = re.findall(PROBE_LINE, out)
    assert len(found) == 12, out            # 2 head dims x 2 masks x (dK/dV + dQ separate, dK/dV atomic)
    for d, causal, kernel, mode, regs, stack, smem, spans, wgmma in found:
        what = (d, causal, kernel, mode, stack, smem, spans, wgmma)
        assert int(smem) <= SMEM_MAX and int(wgmma) > 0, what
        if (d, causal, mode) != ("128", "True", "atomic"):
            assert all(int(s) == 0 or int(m) == 0 for s, m in re.findall(r"(\d+)s/(\d+)m", spans)), what
        assert int(stack) <= ((40 if causal == "True" else 16) if (d, mode) == ("128", "atomic") else 0), what


def test_dkdv_query_block_rows():
    """128 query rows per dK/dV step at D=64 with the separate dQ kernel (session 12), 64 otherwise; an explicit
    ``block_q`` must be 64 or 128 and divide the length (a remainder would never be loaded). No GPU needed."""
    if not hopper_bwd.AVAILABLE:
        pytest.skip("this Triton has no Gluon")

    def rows(d, s=384, atomic=False, **kw):
        q = torch.empty(1, s, 4, d, dtype=torch.bfloat16)
        k, lse = torch.empty(1, s, 2, d, dtype=torch.bfloat16), torch.empty(1, 4, s)
        dq = torch.empty(q.shape, dtype=torch.float32) if atomic else torch.empty_like(q)
        launches = hopper_bwd.launch_args(q, q, k, k, lse, lse, 0.1, True, dq, torch.empty_like(k),
                                          torch.empty_like(k), atomic, **kw)
        return launches[0][2][-13]                      # the dK/dV kernel's BLOCK_Q
    assert rows(64) == hopper_bwd.BLOCK_Q_D64 == 128 and rows(128) == rows(64, atomic=True) == hopper_bwd.BLOCK_Q == 64
    assert rows(64, block_q=64) == 64 and rows(128, block_q=128) == 128
    for bad in (dict(block_q=256), dict(block_q=32), dict(s=320, block_q=128), dict(atomic=True, block_q=128)):
        with pytest.raises(ValueError, match="block_q"):
            rows(64, **bad)


def _inputs(d, dtype, b=2, s=384, h=4, hk=2):
    q = torch.randn(b, s, h, d, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v, torch.randn(b, s, h, d, device="cuda", dtype=dtype)


def _spy(monkeypatch):
    """Record each Hopper backward call's (causal, dq_mode)."""
    calls = []
    real = hopper_bwd.bwd
    monkeypatch.setattr(hopper_bwd, "bwd", lambda *a, **kw: calls.append((kw["causal"], kw["dq_mode"])) or
                        real(*a, **kw))
    return calls


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("mode", hopper_bwd.DQ_MODES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hopper_backward_matches_reference(mode, d, causal, dtype, seed, monkeypatch):
    monkeypatch.setenv(hopper_bwd.ENV, "atomic" if mode == "atomic" else "1")
    calls = _spy(monkeypatch)
    q, k, v, dout = _inputs(d, dtype)                                   # GQA: 4 query heads on 2 KV heads
    out = flashring.flash_attn_func(q, k, v, causal=causal, deterministic=False)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert calls == [(causal, mode)]
    refs = reference_pair(q, k, v, dout, upper=0 if causal else None)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert_close(g, refs["ref"][name], refs["low"][name], GRAD_FACTOR, f"hopper bwd {mode} {name}", seed)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 2])
def test_atomic_dq_exchange_matches_reference(d, causal, group, seed):
    """The atomic dQ: the two warpgroups meet every step to sum their dS K before the atomics; causal programs
    start each query head with a tile that only warpgroup 0 works on (1 stores nothing and drops its slot's
    product). Without GQA and with it."""
    q, k, v, dout = _inputs(d, torch.bfloat16, s=512, h=4, hk=4 // group)
    out, lse = (t.detach() for t in flash.fwd(q.detach(), k.detach(), v.detach(), d ** -0.5,
                                                            upper=0 if causal else None))
    grads = hopper_bwd.bwd(dout, q.detach(), k.detach(), v.detach(), out, lse, d ** -0.5, causal,
                           dq_mode="atomic")
    refs = reference_pair(q, k, v, dout, upper=0 if causal else None)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert_close(g, refs["ref"][name], refs["low"][name], GRAD_FACTOR, f"atomic dq {name}", seed)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("mode", hopper_bwd.DQ_MODES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mask", ["none", "causal", "strict"])
def test_dq_hold_matches_reference_and_default(mode, d, mask, seed):
    """``dq_hold``: the wait for dP in the kernel that computes dQ (the dQ kernel; with the atomic dQ, the dK/dV
    kernel) behind a predicated wait on the step's row sums of P (the exponentials stay ahead of it in the SASS).
    The same gradients as the reference, and bitwise those without it (only the instruction order moves; the
    atomic dQ's fp32 sums arrive in any order, so its dq only within the rule); GQA. On by default for the
    separate dQ at D=128 (``hopper_bwd.DQ_HOLD_D``)."""
    q, k, v, dout = _inputs(d, torch.bfloat16, s=512)
    upper = {"none": None, "causal": 0, "strict": -1}[mask]
    out, lse = (t.detach() for t in flash.fwd(q.detach(), k.detach(), v.detach(), d ** -0.5, upper=upper))
    args = (dout, q.detach(), k.detach(), v.detach(), out, lse, d ** -0.5, mask != "none")
    held = hopper_bwd.bwd(*args, strict=mask == "strict", dq_mode=mode, dq_hold=True)
    default = hopper_bwd.bwd(*args, strict=mask == "strict", dq_mode=mode, dq_hold=False)
    want = {}
    for name, dt in (("ref", torch.float64), ("low", None)):
        leaves = [t.detach().to(dt or t.dtype).requires_grad_() for t in (q, k, v)]
        o, _ = attention_ref(*leaves, upper=upper, dtype=dt)
        want[name] = torch.autograd.grad(o, leaves, dout.to(o.dtype))
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(held[i], want["ref"][i], want["low"][i], GRAD_FACTOR, f"dq_hold {mode} {name}", seed)
        assert torch.equal(held[i], default[i]) or (mode, name) == ("atomic", "dq"), name


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("mode", hopper_bwd.DQ_MODES)
def test_hopper_backward_with_lse_gradient(mode, seed, monkeypatch):
    """A gradient on the returned LSE folds into delta (the portable preprocess kernel's ``dlse``)."""
    monkeypatch.setenv(hopper_bwd.ENV, "atomic" if mode == "atomic" else "1")
    calls = _spy(monkeypatch)
    q, k, v, dout = _inputs(128, torch.bfloat16)
    out, lse, _ = flashring.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    dlse = torch.randn_like(lse)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    assert calls == [(True, mode)]
    refs = {}
    for name, dtype in (("ref", torch.float64), ("low", None)):
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
        o, lo = attention_ref(*leaves, upper=0, dtype=dtype)
        refs[name] = torch.autograd.grad((o, lo), leaves, (dout.to(o.dtype), dlse))
    for i, name in enumerate(("dq", "dk", "dv")):
        assert_close(grads[i], refs["ref"][i], refs["low"][i], GRAD_FACTOR, f"hopper bwd dlse {mode} {name}", seed)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_never_takes_the_atomic_variant(causal, monkeypatch):
    """``deterministic=True`` under ``FLASHRING_HOPPER_BWD=atomic`` runs the separate dQ kernel, and a repeat
    (through ops.launch's fast path, descriptors rebuilt per call) gives bitwise-equal gradients."""
    monkeypatch.setenv(hopper_bwd.ENV, "atomic")
    calls = _spy(monkeypatch)
    q, k, v, dout = _inputs(128, torch.bfloat16, s=512)
    launcher = hopper_bwd.LAUNCH[hopper_bwd._bwd_dq_hopper]
    runs, fast = [], []
    for _ in range(2):
        fast.append(launcher.fast_calls)
        out = flashring.flash_attn_func(q, k, v, causal=causal, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    assert calls == [(causal, "separate")] * 2
    if launcher.fast:
        assert launcher.fast_calls == fast[1] + 1
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_sparse_kernels_compile_for_sm90():
    """The Gluon kernels' sparse launches (``hopper.sparse_fwd``, :func:`hopper_bwd.sparse_bwd`; hash-sparse:
    positions and buckets) at D=64, the head dim the sparse front ends are timed at: within shared memory, no
    stack."""
    out = probe("--hopper-bwd", "--headdims", "64", "--seqlen", "1024", "--sparse", "hash")
    if "not available" in out:
        pytest.skip("this Triton has no Gluon")
    out += probe("--hopper", "--headdims", "64", "--seqlen", "1024", "--sparse", "hash")
    found = re.findall(r"D=64\s+hash-sparse (\w+)\n\s+regs\s+(\d+) stack\s+(\d+) B\s+smem\s+(\d+) B", out)
    assert sorted(k for k, *_ in found) == ["HOPPER_DKDV", "HOPPER_DQ", "HOPPER_FWD"], out
    for kernel, regs, stack, smem in found:
        assert int(stack) == 0 and int(smem) <= SMEM_MAX, (kernel, regs, stack, smem)
    # reading rows through the row tables (cp.async in a 4-warp producer) and storing results to the rows
    out = probe("--hopper", "--headdims", "64", "--seqlen", "1024", "--sparse", "hash", "--variant", "gather=True")
    out += probe("--hopper-bwd", "--headdims", "64", "--seqlen", "1024", "--sparse", "hash", "--variant",
                 "rows_out=True,gather=True")
    found = re.findall(r"D=64\s+hash-sparse (\w+)\n\s+regs\s+(\d+) stack\s+(\d+) B\s+smem\s+(\d+) B", out)
    assert sorted(k for k, *_ in found) == ["HOPPER_DKDV", "HOPPER_DQ", "HOPPER_FWD"], out
    for kernel, regs, stack, smem in found:
        # the backward's 4-warp producer keeps a few scalars on the stack with triton 3.6's ptxas (8 B), none with 3.8's
        assert int(stack) <= (0 if kernel == "HOPPER_FWD" else 8) and int(smem) <= SMEM_MAX, (kernel, stack, smem)
    # QK-sparse with tiles of dropped slots skipped (hopper.skip_dropped): the same budget, with copies and gathered
    for variant, bwd_variant in (("skip=True", "rows_out=True,skip=True"),
                                 ("gather=True,skip=True", "rows_out=True,gather=True,skip=True")):
        out = probe("--hopper", "--headdims", "64", "--seqlen", "1024", "--sparse", "qk", "--variant", variant)
        out += probe("--hopper-bwd", "--headdims", "64", "--seqlen", "1024", "--sparse", "qk", "--variant",
                     bwd_variant)
        found = re.findall(r"D=64\s+qk-sparse (\w+)\n\s+regs\s+(\d+) stack\s+(\d+) B\s+smem\s+(\d+) B", out)
        assert sorted(k for k, *_ in found) == ["HOPPER_DKDV", "HOPPER_DQ", "HOPPER_FWD"], out
        for kernel, regs, stack, smem in found:
            assert int(stack) <= (0 if kernel == "HOPPER_FWD" else 8) and int(smem) <= SMEM_MAX, (variant, kernel)


def test_skipping_dropped_tiles_is_off_until_a_gpu_run(monkeypatch):
    """``hopper.skip_dropped``: off by default (written and compiled in session 17, not yet run on a GPU);
    ``FLASHRING_HOPPER_SKIP_DROPPED=1`` turns it on for the forward's and the backward's sparse launches
    (``hopper.skips``: QK-sparse calls with row tables)."""
    from flashring.ops.sparse_ranges import SparseMeta
    pos = torch.arange(256, dtype=torch.int32).expand(1, 2, 256).contiguous()
    lens = torch.full((1, 2), 100, dtype=torch.int32)
    qk = SparseMeta(pos, pos, lens, lens, None, None, True, pos.long(), pos.long())
    monkeypatch.delenv(hopper.SKIP_DROPPED_ENV, raising=False)
    assert not hopper.skip_dropped() and not hopper.skips(qk) and hopper.skips(qk, True)
    monkeypatch.setenv(hopper.SKIP_DROPPED_ENV, "1")
    assert hopper.skip_dropped() and hopper.skips(qk) and not hopper.skips(qk, False) and not hopper.skips(None)
    # hash-sparse keeps every token; without row tables the slot-order results go back as they are, so the kernels
    # must write the dropped slots' zeros themselves (session 17's review)
    assert not hopper.skips(qk._replace(q_bkt=pos, k_bkt=pos))
    assert not hopper.skips(qk._replace(q_rows=None, k_rows=None))


def test_sparse_calls_take_only_what_they_can():
    """:func:`hopper.sparse_applies`: one length, a multiple of 128, D 64 / 128, bf16 / fp16, one query head per
    K/V head, no softcap; strided tensors are fine (they are gathered). The ``launch_args`` refuse a sparse call
    with a causal band, the atomic dQ or GQA."""
    from flashring.ops.sparse_ranges import SparseMeta
    b, s, h, d = 1, 256, 2, 64
    q = torch.empty(b, s, h, d, dtype=torch.bfloat16)
    pos = torch.zeros(b, h, s, dtype=torch.int32)
    lens = torch.full((b, h), s, dtype=torch.int32)
    meta = SparseMeta(pos, pos, lens, lens, None, None, True)
    assert hopper.sparse_applies(q, q, q, meta, 0.0)
    assert not hopper.sparse_applies(q, q, q, meta._replace(q_len=pos[..., 0]), 0.0)     # a strided view
    assert not hopper.sparse_applies(q, q, q, meta._replace(q_pos=pos.transpose(1, 2).contiguous().transpose(1, 2)),
                                     0.0)
    assert hopper.sparse_applies(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, meta, 0.0)
    assert not hopper.sparse_applies(q, q, q, meta, 20.0)
    assert not hopper.sparse_applies(q.float(), q.float(), q.float(), meta, 0.0)
    assert not hopper.sparse_applies(q[..., :32], q[..., :32], q[..., :32], meta, 0.0)
    short = q[:, :192]
    assert not hopper.sparse_applies(short, short, short, meta, 0.0)
    kv = torch.empty(b, s, 1, d, dtype=torch.bfloat16)
    assert not hopper.sparse_applies(q, kv, kv, meta, 0.0)
    if not hopper_bwd.AVAILABLE:
        return
    lse = torch.empty(b, h, s)
    for causal, atomic, k in ((True, False, q), (False, True, q), (False, False, kv)):
        dq = torch.empty(q.shape, dtype=torch.float32) if atomic else torch.empty_like(q)
        with pytest.raises(ValueError, match="sparse backward"):
            hopper_bwd.launch_args(q, q, k, k, lse, lse, 0.1, causal, dq, torch.empty_like(k), torch.empty_like(k),
                                   atomic, sparse=meta)
        if not atomic:
            with pytest.raises(ValueError, match="sparse forward"):
                hopper.launch_args(q, k, k, 0.1, causal, torch.empty_like(q), lse, sparse=meta)


def test_gather_is_the_default_at_d64(monkeypatch):
    """``hopper.gather_wanted``: the kernels read rows through the row tables by default at D=64 (measured faster
    there, session 16) and not at D=128; ``FLASHRING_HOPPER_SPARSE_GATHER`` forces either way; without row tables
    (tensors already in slot order) there is nothing to gather through. The Gluon sparse forward is on unless
    ``FLASHRING_HOPPER_SPARSE_FWD=0``."""
    from flashring.ops.sparse_ranges import SparseMeta
    pos = torch.zeros(1, 2, 128, dtype=torch.int32)
    lens = torch.full((1, 2), 128, dtype=torch.int32)
    rows = torch.zeros(1, 2, 128, dtype=torch.int64)
    meta = SparseMeta(pos, pos, lens, lens, None, None, True, rows, rows)
    monkeypatch.delenv(hopper.GATHER_ENV, raising=False)
    assert hopper.gather_wanted(meta, 64) and not hopper.gather_wanted(meta, 128)
    assert not hopper.gather_wanted(meta._replace(q_rows=None, k_rows=None), 64)
    monkeypatch.setenv(hopper.GATHER_ENV, "1")
    assert hopper.gather_wanted(meta, 128)
    monkeypatch.setenv(hopper.GATHER_ENV, "0")
    assert not hopper.gather_wanted(meta, 64)
    monkeypatch.delenv(hopper.SPARSE_ENV, raising=False)
    assert hopper.sparse_wanted()
    monkeypatch.setenv(hopper.SPARSE_ENV, "0")
    assert not hopper.sparse_wanted()


SPARSE_SHAPES = [(2, 512, 4, 64, torch.bfloat16), (1, 384, 2, 128, torch.float16)]


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("shape", SPARSE_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + str(s[4])[5:])
@pytest.mark.parametrize("kind, causal", [(kind, causal) for kind in ("qk", "hash", "qk-rare")
                                          for causal in (True, False)] + [("hash-strict", True)])  # strict is causal
@pytest.mark.parametrize("gather", [False, True], ids=["copies", "gather"])
@pytest.mark.parametrize("skip", [False, True], ids=["run-dropped", "skip-dropped"])
def test_sparse_on_the_hopper_kernels(shape, kind, causal, gather, skip, seed, monkeypatch):
    """``FLASHRING_HOPPER_SPARSE_FWD=1`` and ``FLASHRING_HOPPER_SPARSE_BWD=1``: the sparse front ends' output, LSE
    and gradients come from ``hopper.sparse_fwd`` and :func:`hopper_bwd.sparse_bwd` (slot order, tile ranges,
    tiles across the pattern masked by position and bucket) and match the float64 reference by the tolerance rule
    (test_sparse.run_sparse: dropped queries out 0 and the empty-row LSE): half the tokens dropped, 4 buckets, 95%
    dropped with one head keeping nothing (empty tiles, rows that see nothing, ragged counts), and strictly causal
    buckets (each bucket's first token sees nothing). ``gather``: the kernels read and write the rows through the
    row tables (``FLASHRING_HOPPER_SPARSE_GATHER=1``) instead of copies. ``skip``: tiles of dropped slots only are
    written without running (``FLASHRING_HOPPER_SKIP_DROPPED=1``)."""
    from test_sparse import run_sparse
    monkeypatch.setenv(hopper_bwd.SPARSE_ENV, "1")
    monkeypatch.setenv(hopper.SPARSE_ENV, "1")
    monkeypatch.setenv(hopper.GATHER_ENV, "1" if gather else "0")
    monkeypatch.setenv(hopper.SKIP_DROPPED_ENV, "1" if skip else "0")
    calls = []
    for mod, name in ((hopper_bwd, "sparse_bwd"), (hopper, "sparse_fwd")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, real=real, name=name, **kw: calls.append(name) or real(*a, **kw))
    b, s, h, d, dtype = shape
    extra = {}
    if kind == "qk-rare":
        keep = torch.rand(b, s, h, device="cuda") > 0.95
        keep[:, :, -1] = False
        extra = dict(qa=keep, ka=torch.rand(b, s, h, device="cuda") > 0.95)
    run_sparse(kind.split("-")[0], b, s, s, h, h, d, dtype, "cuda", causal, seed, strict=kind == "hash-strict",
               **extra)
    assert sorted(set(calls)) == ["sparse_bwd", "sparse_fwd"]


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
def test_sparse_slot_order_call_and_gqa(seed, monkeypatch):
    """Tensors already in slot order (``sparse_attn_compact_func``: no row tables) give bitwise the gradients of
    the front end that gathers them, on the Gluon forward and backward, and zero gradients in the dropped slots,
    also with ``FLASHRING_HOPPER_SKIP_DROPPED=1`` (which applies only where row tables take results back); a GQA
    call stays on the portable kernels (and is still right)."""
    from test_sparse import run_sparse
    monkeypatch.setenv(hopper_bwd.SPARSE_ENV, "1")
    monkeypatch.setenv(hopper.SPARSE_ENV, "1")
    monkeypatch.setenv(hopper.SKIP_DROPPED_ENV, "1")
    b, s, h, d = 1, 256, 2, 64
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    keep = torch.rand(b, s, h, device="cuda") > 0.4
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    flashring.qk_sparse_attn_func(*leaves, keep, keep, causal=True).backward(do)
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    lens = keep.sum(1).to(torch.int32)
    gather = lambda x: x.gather(1, idx.unsqueeze(-1).expand(*idx.shape, d))  # noqa: E731
    slots = [gather(t).requires_grad_() for t in (q, k, v)]
    out = flashring.sparse_attn_compact_func(*slots, idx, idx, lens, lens, causal=True)
    out.backward(gather(do))
    full = flashring.qk_sparse_attn_func(q, k, v, keep, keep, causal=True)
    for hh in range(h):
        n = int(lens[0, hh])
        assert torch.equal(out[0, :n, hh], gather(full)[0, :n, hh])
    for leaf, slot in zip(leaves, slots):
        for hh in range(h):
            n = int(lens[0, hh])
            assert torch.equal(slot.grad[0, :n, hh], gather(leaf.grad)[0, :n, hh])
            assert not slot.grad[0, n:, hh].any()
    calls = []
    monkeypatch.setattr(hopper_bwd, "sparse_bwd", lambda *a, **kw: calls.append(1))
    monkeypatch.setattr(hopper, "sparse_fwd", lambda *a, **kw: calls.append(1))
    run_sparse("hash", 1, 256, 256, 4, 2, 64, torch.bfloat16, "cuda", True, seed)
    assert not calls


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
def test_sparse_dropped_tokens_never_reach_kept_rows(seed, monkeypatch):
    """On the Gluon kernels, inf / NaN in dropped tokens' q, k, v and dout change nothing (their slots are copied
    as zeros, ``sparse_ranges.slot_copy``): bitwise the output, LSE and gradients of the same call with finite
    values there, as on the portable kernels, which never load those rows."""
    monkeypatch.setenv(hopper_bwd.SPARSE_ENV, "1")
    monkeypatch.setenv(hopper.SPARSE_ENV, "1")
    b, s, h, d = 1, 512, 2, 64
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    qa, ka = (torch.rand(b, s, h, device="cuda") > 0.5 for _ in range(2))
    res = []
    for poison in (False, True):
        ins = [t.clone() for t in (q, k, v, do)]
        if poison:
            for t, keep, bad in zip(ins, (qa, ka, ka, qa), (float("nan"), float("inf"), float("nan"), float("nan"))):
                t[~keep] = bad
        leaves = [t.requires_grad_() for t in ins[:3]]
        out, lse, _ = flashring.qk_sparse_attn_func(*leaves, qa, ka, causal=True, return_attn_probs=True)
        out.backward(ins[3])
        res.append((out, lse, *(t.grad for t in leaves)))
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), *res):
        keep = qa if name in ("out", "dq") else ka
        if name == "lse":
            keep = qa.transpose(1, 2)
        assert torch.equal(a[keep], w[keep]), name


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("kind", ["qk", "hash"])
@pytest.mark.parametrize("d", [64, 128])
def test_sparse_kernels_read_rows_in_place(kind, d, seed, monkeypatch):
    """``gather=True`` (``FLASHRING_HOPPER_SPARSE_GATHER=1``): the producers read q / k / v / dout rows (and LSE /
    delta) through the row tables by cp.async, dropped slots zero-filled, and the results go straight to their
    rows: bitwise the output, LSE and gradients of the copies into slot order and back (the same tiles, another
    load and store; a dropped query slot's LSE reads 0 instead of +inf in the dK/dV kernel, where its zero q and
    dout rows add exact zeros either way), also with inf / NaN in the dropped tokens' rows (QK-sparse), and
    through the front ends."""
    from test_sparse import _front_end
    b, s, h = 2, 384, 2
    scale = d ** -0.5
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    fn, side = _front_end(kind, (b, s, h), "cuda", drop=(0.5, 0.5), buckets=4)
    metas = []
    real = hopper.sparse_fwd
    monkeypatch.setenv(hopper.SPARSE_ENV, "1")
    monkeypatch.setattr(hopper, "sparse_fwd", lambda *a, **kw: metas.append(a[4]) or real(*a, **kw))
    fn(q, k, v, *side, causal=True)
    monkeypatch.setattr(hopper, "sparse_fwd", real)
    meta = metas[0]
    assert meta.q_rows is not None and meta.k_rows is not None
    out, lse = real(q, k, v, scale, meta, gather=False)
    want = (out, lse, *hopper_bwd.sparse_bwd(do, q, k, v, out, lse, scale, meta, gather=False, rows_out=False))
    names = ("out", "lse", "dq", "dk", "dv")
    inputs = [(q, k, v, do)]
    if kind == "qk":
        bad = [t.clone() for t in (q, k, v, do)]
        for t, keep, x in zip(bad, (side[0], side[1], side[1], side[0]), ("nan", "inf", "nan", "nan")):
            t[~keep] = float(x)
        inputs.append(bad)
    for qq, kk, vv, dd in inputs:
        o, ls = real(qq, kk, vv, scale, meta, gather=True)
        got = (o, ls, *hopper_bwd.sparse_bwd(dd, qq, kk, vv, o, ls, scale, meta, gather=True))
        for name, a, w in zip(names, got, want):
            assert torch.equal(a, w), name
    monkeypatch.setenv(hopper_bwd.SPARSE_ENV, "1")
    monkeypatch.setattr(hopper_bwd, "SPARSE_ROWS_OUT", False)
    res = []
    for gather in ("0", "1"):
        monkeypatch.setenv(hopper.GATHER_ENV, gather)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, ls, _ = fn(*leaves, *side, causal=True, return_attn_probs=True)
        o.backward(do)
        res.append((o, ls, *(t.grad for t in leaves)))
    for name, a, w in zip(names, *res):
        assert torch.equal(a, w), name


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("kind", ["qk", "hash"])
@pytest.mark.parametrize("d", [64, 128])
def test_sparse_gradients_straight_to_their_rows(kind, d, seed, monkeypatch):
    """``hopper_bwd.SPARSE_ROWS_OUT``: the kernels write each slot's dq / dk / dv straight to its row instead of in
    slot order followed by the copies back: bitwise the same gradients (the same arithmetic, another store), and
    zeros for the dropped tokens."""
    from test_sparse import _front_end
    monkeypatch.setenv(hopper_bwd.SPARSE_ENV, "1")
    monkeypatch.setenv(hopper.GATHER_ENV, "0")          # the copies in, the two ways out
    b, s, h = 2, 384, 2
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    fn, side = _front_end(kind, (b, s, h), "cuda", drop=(0.5, 0.5), buckets=4)
    grads = []
    for rows_out in (False, True):
        monkeypatch.setattr(hopper_bwd, "SPARSE_ROWS_OUT", rows_out)
        grads.append(torch.autograd.grad(fn(q, k, v, *side, causal=True), (q, k, v), dout))
    for name, a, w in zip(("dq", "dk", "dv"), *grads):
        assert torch.isfinite(a).all() and torch.equal(a, w), name
    if kind == "qk":
        assert (grads[1][0][~side[0]] == 0).all() and (grads[1][1][~side[1]] == 0).all()
        # an inf in a kept key: kept rows may turn NaN (the arithmetic), dropped rows' dq stays exactly 0
        bi, si, hi = side[1].nonzero()[0].tolist()
        with torch.no_grad():
            k[bi, si, hi] = float("inf")
        for rows_out in (False, True):
            monkeypatch.setattr(hopper_bwd, "SPARSE_ROWS_OUT", rows_out)
            dq, = torch.autograd.grad(fn(q, k, v, *side, causal=True), (q, ), dout)
            assert (dq[~side[0]] == 0).all(), rows_out


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="an sm_90 GPU")
@pytest.mark.parametrize("gather", ["0", "1"], ids=["copies", "gather"])
@pytest.mark.parametrize("d", [64, 128])
def test_skipping_dropped_tiles_changes_nothing(gather, d, seed, monkeypatch):
    """``FLASHRING_HOPPER_SKIP_DROPPED=1`` (the forward's producer writes a dropped tile's zero rows and empty-row
    LSE, the backward's programs of dropped blocks write zero gradients and exit): bitwise the output, LSE and
    gradients of running those tiles, through the front end, at QK drop 0.5, 0.9 and 0 with a head that keeps
    nothing, and with inf / NaN in the dropped tokens' rows (never read either way)."""
    monkeypatch.setenv(hopper_bwd.SPARSE_ENV, "1")
    monkeypatch.setenv(hopper.SPARSE_ENV, "1")
    monkeypatch.setenv(hopper.GATHER_ENV, gather)
    b, s, h = 2, 640, 4
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    rate = torch.tensor([0.5, 0.9, 0.0, 1.0], device="cuda")           # per head; the last keeps nothing
    qa, ka = (torch.rand(b, s, h, device="cuda") >= rate for _ in range(2))
    for t, keep in zip((q, k, v, do), (qa, ka, ka, qa)):
        t[~keep] = float("nan")
    res = []
    for skip in ("0", "1"):
        monkeypatch.setenv(hopper.SKIP_DROPPED_ENV, skip)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse, _ = flashring.qk_sparse_attn_func(*leaves, qa, ka, causal=True, return_attn_probs=True)
        out.backward(do)
        res.append((out, lse, *(t.grad for t in leaves)))
    for name, a, w in zip(("out", "lse", "dq", "dk", "dv"), *res):
        assert torch.equal(a, w), name
        assert not a.isnan().any(), name
