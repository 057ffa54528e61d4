"""flash_attn_with_kvcache (decode / speculative / chunked prefill over a KV cache; split-KV, GQA packing, paged
caches, rotary, in-place append) against the float64 reference on the keys each row may see."""
import math

import pytest
import torch

import flashring
from flashring.masks import flash_bounds
from flashring.testing import assert_close, max_err, reference_pair, rounding_floor

from conftest import gpu_only


def _rotate_ref(x, cos, sin, positions, interleaved):
    """Rotary by complex multiplication, written independently of flashring's: pairs (2i, 2i+1) or (i, i+r/2)."""
    half = cos.shape[1]
    xr = x[..., :2 * half].double().cpu()
    if interleaved:
        z = torch.complex(xr[..., 0::2], xr[..., 1::2])
    else:
        z = torch.complex(xr[..., :half], xr[..., half:])
    w = torch.complex(cos.double(), sin.double())[positions].unsqueeze(2)     # the tables as given (not renormalised)
    z = z * w
    parts = torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1)
    return torch.cat((parts.to(x.device, x.dtype), x[..., 2 * half:]), -1)


def _case(device, b=3, sq=1, h=8, hk=2, d=64, cap=80, s_new=0, dtype=torch.float32, page=None, rotary=None,
          leftpad=False, batch_idx=False, garbage=True, holes=False):
    g = torch.Generator(device="cpu").manual_seed(int(torch.randint(0, 2**31, ())))
    rnd = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    rows = b + 2 if batch_idx else b
    k_cache, v_cache = rnd(rows, cap, hk, d), rnd(rows, cap, hk, d)
    seqlens = torch.randint(0, cap - s_new + 1, (b,), generator=g)
    seqlens[0] = cap - s_new                                   # one row full to capacity
    if garbage:                                               # past the valid length: NaN that must never leak
        for i in range(b):
            r = (i + 2) if batch_idx else i
            k_cache[r, int(seqlens[i]) + s_new:] = float("nan")
            v_cache[r, int(seqlens[i]) + s_new:] = float("nan")
    kw = dict(cache_seqlens=seqlens.to(device, torch.int32))
    if batch_idx:
        kw["cache_batch_idx"] = (torch.arange(b) + 2).to(device, torch.int32)
    if leftpad:
        kw["cache_leftpad"] = torch.minimum(torch.randint(0, 10, (b,), generator=g), seqlens).to(device, torch.int32)
    if holes:       # key_padding_mask: a quarter of the keys are padding, NaN in the cache, never to be read
        keep = torch.rand(b, cap, generator=g) > 0.25
        for i in range(b):
            r = (i + 2) if batch_idx else i
            k_cache[r, ~keep[i]] = float("nan")
            v_cache[r, ~keep[i]] = float("nan")
        kw["key_padding_mask"] = keep.to(device)
    q = rnd(b, sq, h, d)
    k = v = None
    if s_new:
        k, v = rnd(b, s_new, hk, d), rnd(b, s_new, hk, d)
    if rotary:
        r = rotary
        # positions up to cap - s_new + sq - 1 (queries past the new keys rotate at their own positions)
        ang = torch.rand(cap + max(0, sq - s_new), r // 2, generator=g, dtype=torch.float64) * 6.3
        kw.update(rotary_cos=ang.cos().to(device, dtype), rotary_sin=ang.sin().to(device, dtype))
    return q, k_cache, v_cache, k, v, kw


def _reference(q, k_cache, v_cache, k, v, kw, causal, window, softcap, interleaved, seed):
    """Per batch row: append (and rotate) on a copy, gather the valid keys, float64 attention."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    b, sq = q.shape[:2]
    seqlens = kw["cache_seqlens"].long().cpu()
    rows = kw.get("cache_batch_idx", torch.arange(b)).long().cpu()
    s_new = 0 if k is None else k.shape[1]
    cos, sin = kw.get("rotary_cos"), kw.get("rotary_sin")
    pos_new = seqlens[:, None] + torch.arange(s_new)
    if k is not None:
        if cos is not None:
            k = _rotate_ref(k, cos.cpu(), sin.cpu(), pos_new, interleaved).to(q.device)
        for i in range(b):
            k_cache[rows[i], seqlens[i]:seqlens[i] + s_new] = k[i]
            v_cache[rows[i], seqlens[i]:seqlens[i] + s_new] = v[i]
    if cos is not None:
        per_token = causal or window != (-1, -1)
        qpos = seqlens[:, None] + (torch.arange(sq) if per_token else torch.zeros(sq, dtype=torch.long))
        q = _rotate_ref(q, cos.cpu(), sin.cpu(), qpos, interleaved).to(q.device)
    start = kw.get("cache_leftpad", torch.zeros(b, dtype=torch.int32)).long().cpu()
    keep = kw.get("key_padding_mask")
    results = []
    for i in range(b):
        kk = k_cache[rows[i], start[i]:seqlens[i] + s_new].unsqueeze(0)
        vv = v_cache[rows[i], start[i]:seqlens[i] + s_new].unsqueeze(0)
        extra = {}
        if keep is not None:        # masked keys: invisible (and zeroed here: the reference would spread NaN)
            row = keep[i, start[i]:seqlens[i] + s_new].view(1, 1, 1, 1, -1)
            kk, vv = (t.masked_fill(~row.view(1, -1, 1, 1), 0.0) for t in (kk, vv))
            extra["mask"] = row
        lower, upper = flash_bounds(sq, kk.shape[1], causal, window)
        results.append(reference_pair(q[i:i + 1], kk, vv, None, softmax_scale=1 / math.sqrt(q.shape[-1]),
                                      lower=lower, upper=upper, softcap=softcap, **extra))
    return k_cache, v_cache, results


CASES = [dict(sq=1), dict(sq=1, s_new=1, rotary=32), dict(sq=4, s_new=4, rotary=64, dtype=torch.bfloat16),
         dict(sq=3, leftpad=True, batch_idx=True, dtype=torch.float16), dict(sq=17, s_new=17, h=4, hk=4, d=40),
         dict(sq=2, h=6, hk=1, d=128, cap=200), dict(sq=1, holes=True),
         dict(sq=5, s_new=5, leftpad=True, holes=True, dtype=torch.bfloat16), dict(sq=1, s_new=4, rotary=32),
         dict(sq=3, s_new=1, h=6, hk=3, d=40, rotary=16, batch_idx=True)] + \
    gpu_only([dict(b=4, sq=1, h=32, hk=8, d=128, cap=8192, holes=True, dtype=torch.bfloat16),
              dict(b=4, sq=1, h=32, hk=8, d=128, cap=8192, s_new=1, dtype=torch.bfloat16, rotary=128),
              dict(b=2, sq=64, h=16, hk=4, d=64, cap=4096, s_new=64, dtype=torch.bfloat16)])
MASKS = [(True, (-1, -1), 0.0), (False, (-1, -1), 0.0), (True, (20, -1), 4.0)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: f"c{int(m[0])}-w{m[1][0]}-cap{m[2]:g}")
def test_kvcache_matches_reference(case, mask, device, seed):
    for interleaved in (True, False) if "rotary" in case else (True,):   # the layout matters with tables only
        check_kvcache(case, mask, interleaved, device, seed)


def check_kvcache(case, mask, interleaved, device, seed):
    causal, window, softcap = mask
    q, k_cache, v_cache, k, v, kw = _case(device, **case)
    ref_k, ref_v, refs = _reference(q, k_cache, v_cache, k, v, kw, causal, window, softcap, interleaved, seed)
    for splits in (0, 1, 3):
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = flashring.flash_attn_with_kvcache(q, kc, vc, k, v, causal=causal, window_size=window,
                                                     softcap=softcap, rotary_interleaved=interleaved,
                                                     num_splits=splits, return_softmax_lse=True, **kw)
        tag = f"{case} causal={causal} window={window} softcap={softcap} splits={splits}"
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        for i, r in enumerate(refs):
            assert_close(out[i:i + 1], r["ref"]["out"], r["low"]["out"], 2, f"out row {i} {tag}", seed)
            assert_close(lse[i:i + 1], r["ref"]["lse"], r["low"]["lse"], 2, f"lse row {i} {tag}", seed)
        if k is not None:              # appended in place (rotated: within one rounding step), nothing else touched
            for got, want in ((kc, ref_k), (vc, ref_v)):
                assert torch.equal(got.isnan(), want.isnan()), tag
                ok = ~want.isnan()
                assert max_err(got[ok], want[ok]) <= rounding_floor(want[ok].double(), want.dtype), tag


@pytest.mark.parametrize("page", [16, 48])
def test_paged_cache_equals_contiguous(page, device, seed):
    b, h, hk, d, pages_per_seq = 3, 8, 2, 32, 4
    cap = page * pages_per_seq
    q, k_cache, v_cache, k, v, kw = _case(device, b=b, sq=2, h=h, hk=hk, d=d, cap=cap, s_new=2, rotary=16,
                                          garbage=False)
    perm = torch.randperm(b * pages_per_seq + 3)[:b * pages_per_seq]     # scattered pages, some unused
    table = perm.view(b, pages_per_seq).to(device, torch.int32)
    paged_k = torch.randn(b * pages_per_seq + 3, page, hk, d, device=device)
    paged_v = torch.randn_like(paged_k)
    for i in range(b):
        for j in range(pages_per_seq):
            paged_k[table[i, j]] = k_cache[i, j * page:(j + 1) * page]
            paged_v[table[i, j]] = v_cache[i, j * page:(j + 1) * page]
    want = flashring.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, causal=True, **kw)
    got = flashring.flash_attn_with_kvcache(q, paged_k, paged_v, k, v, causal=True, block_table=table, **kw)
    assert_close(got, want.double(), want, 0, "paged vs contiguous", seed)
    for i in range(b):                                       # the append went to the right pages
        for j in range(pages_per_seq):
            assert torch.equal(paged_k[table[i, j]], k_cache[i, j * page:(j + 1) * page])


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a wider buffer; a 2-D table column-major)."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    return torch.stack((t, torch.full_like(t, -7)), dim=1)[:, 0]


def test_strided_index_tensors_append_where_contiguous_ones_do(device, seed):
    """cache_seqlens, cache_batch_idx and block_table as non-contiguous views: the append (rotated) and the
    attention must equal the contiguous call's."""
    q, k_cache, v_cache, k, v, kw = _case(device, b=3, sq=2, s_new=2, rotary=16, batch_idx=True, garbage=False)
    results = []
    for view in (lambda t: t, _strided):
        kc, vc = k_cache.clone(), v_cache.clone()
        args = dict(kw, cache_seqlens=view(kw["cache_seqlens"]), cache_batch_idx=view(kw["cache_batch_idx"]))
        assert view is not _strided or not args["cache_seqlens"].is_contiguous()
        results.append((flashring.flash_attn_with_kvcache(q, kc, vc, k, v, causal=True, **args), kc, vc))
    for want, got in zip(results[0], results[1]):
        assert torch.equal(want, got)
    page, pages_per_seq = 16, k_cache.shape[1] // 16
    table = torch.randperm(3 * pages_per_seq).view(3, pages_per_seq).to(device, torch.int32)
    paged = [torch.randn(3 * pages_per_seq, page, *k_cache.shape[2:], device=device, dtype=k_cache.dtype)
             for _ in range(2)]
    kw.pop("cache_batch_idx")
    results = []
    for view in (lambda t: t, _strided):
        pk, pv = (t.clone() for t in paged)
        results.append((flashring.flash_attn_with_kvcache(q, pk, pv, k, v, causal=True, block_table=view(table),
                                                          **kw), pk, pv))
    for want, got in zip(results[0], results[1]):
        assert torch.equal(want, got)


def test_empty_rows_and_int_seqlens(device, seed):
    q, k_cache, v_cache, _, _, _ = _case(device, b=2, cap=32, garbage=False)
    out, lse = flashring.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, return_softmax_lse=True)
    assert (out == 0).all() and (lse == -1e30).all()
    full = flashring.flash_attn_with_kvcache(q, k_cache, v_cache)                    # default: whole cache
    assert torch.equal(full, flashring.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=32))


def _args(**change):
    q = torch.randn(2, 1, 4, 16)
    kc = torch.randn(2, 32, 2, 16)
    args = dict(q=q, k_cache=kc, v_cache=kc.clone(), cache_seqlens=torch.tensor([3, 5], dtype=torch.int32))
    args.update(change)
    return args


@pytest.mark.parametrize("change, exc, match", [
    (dict(cache_seqlens=torch.tensor([3, 5])), TypeError, "cache_seqlens must have dtype torch.int32"),
    (dict(cache_seqlens=torch.tensor([3, 40], dtype=torch.int32)), ValueError, "cache capacity"),
    (dict(cache_seqlens=33), ValueError, "exceeds the cache capacity"),
    (dict(k=torch.randn(2, 1, 2, 16)), ValueError, "k and v must be given together"),
    (dict(k=torch.randn(2, 2, 2, 16), v=torch.randn(2, 2, 2, 16), cache_seqlens=31), ValueError, "capacity"),
    (dict(block_table=torch.zeros(2, 2, dtype=torch.int64)), TypeError, "block_table must have dtype"),
    (dict(block_table=torch.tensor([[0, 5], [1, 2]], dtype=torch.int32)), ValueError, "block_table entries"),
    (dict(k_cache=torch.randn(4, 24, 2, 16), v_cache=torch.randn(4, 24, 2, 16),
          block_table=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "multiple of 16"),
    (dict(rotary_cos=torch.ones(32, 4), rotary_sin=torch.zeros(32, 4)), ValueError, "need the new k and v"),
    (dict(q=torch.randn(2, 3, 4, 16), k=torch.randn(2, 1, 2, 16), v=torch.randn(2, 1, 2, 16), causal=True,
          rotary_cos=torch.ones(32, 4), rotary_sin=torch.zeros(32, 4)), ValueError, "queries reach position 33"),
    (dict(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "cache_batch_idx entries"),
    (dict(alibi_slopes=torch.ones(4)), NotImplementedError, "alibi_slopes"),
    (dict(num_splits=-1), ValueError, "num_splits"),
])
def test_kvcache_bad_input(change, exc, match):
    with pytest.raises(exc, match=match):
        flashring.flash_attn_with_kvcache(**_args(**change))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_split_kv_decode_in_cuda_graphs(seed):
    """Split-KV decode captured in two CUDA graphs: each capture zeroes its own counters on every replay, and an
    eager call with many more tiles afterwards does not disturb the graphs' replays."""
    q = torch.randn(2, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4096, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    want = flashring.flash_attn_with_kvcache(q, k, v, num_splits=8)
    graphs, outs = [], []
    for splits in (8, 5):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            flashring.flash_attn_with_kvcache(q, k, v, num_splits=splits)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(flashring.flash_attn_with_kvcache(q, k, v, num_splits=splits))
        graphs.append(g)
    big_q = torch.randn(64, 1, 32, 64, device="cuda", dtype=torch.bfloat16)      # many tiles
    big_k = torch.randn(64, 256, 32, 64, device="cuda", dtype=torch.bfloat16)
    flashring.flash_attn_with_kvcache(big_q, big_k, big_k, num_splits=4)
    for _ in range(3):
        for g in reversed(graphs):
            g.replay()
    torch.cuda.synchronize()
    refs = reference_pair(q, k, v, None)
    for out in outs:
        assert_close(out, refs["ref"]["out"], refs["low"]["out"], 2, "split-KV decode replayed from a graph", seed)
    assert_close(want, refs["ref"]["out"], refs["low"]["out"], 2, "split-KV decode, eager", seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_split_kv_decode_under_cudagraph_trees(seed):
    """torch.compile(mode="reduce-overhead"), what transformers' compiled static-cache generation runs: nothing
    the split-KV launch allocates may stay alive in the cudagraph trees' pool (a cached counter buffer did, and
    the H100 run of hf_generate.py --cache static failed on it), and warm-up, recording and replays all match the
    reference."""
    b, h, s, d = 2, 8, 4096, 64
    k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    step = torch.compile(lambda q: flashring.flash_attn_with_kvcache(q, k, v, num_splits=8), mode="reduce-overhead",
                         fullgraph=True)
    for i in range(4):                      # warm-up, record, then replays
        q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
        got = step(q).clone()
        refs = reference_pair(q, k, v, None)
        assert_close(got, refs["ref"]["out"], refs["low"]["out"], 2, f"reduce-overhead decode, call {i}", seed)


CHECK_SCRIPT = r"""
import sys, torch, flashring
case = sys.argv[1]
q = torch.randn(2, 1, 4, 64, device="cuda", dtype=torch.bfloat16)
kc, vc = (torch.randn(6, 16, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device="cuda")
# (in range, out of range) with the same arguments present: the good calls compile the check and then take the
# cached fast launch (ops.launch.Launcher), which the bad call goes through too
good, bad = {
    "ok": (dict(cache_seqlens=i32(16, 3), cache_batch_idx=i32(5, 0), cache_leftpad=i32(0, 2)), None),
    "cache_seqlens": (dict(cache_seqlens=i32(3, 16), cache_batch_idx=i32(0, 1)),
                      dict(cache_seqlens=i32(3, 17), cache_batch_idx=i32(0, 1))),
    "cache_leftpad": (dict(cache_seqlens=i32(3, 4), cache_leftpad=i32(0, 4), cache_batch_idx=i32(0, 1)),
                      dict(cache_seqlens=i32(3, 4), cache_leftpad=i32(0, -1), cache_batch_idx=i32(0, 1))),
    "cache_batch_idx": (dict(cache_seqlens=i32(3, 4), cache_batch_idx=i32(5, 0)),
                        dict(cache_seqlens=i32(3, 4), cache_batch_idx=i32(6, 0))),
    "block_table": (dict(cache_seqlens=i32(20, 4), block_table=i32(0, 1, 5, 2).view(2, 2)),
                    dict(cache_seqlens=i32(20, 4), block_table=i32(0, 1, 5, 6).view(2, 2)))}[case]
for _ in range(2):
    out = flashring.flash_attn_with_kvcache(q, kc, vc, causal=True, **good)
torch.cuda.synchronize()
print("good calls finished", float(out.float().abs().sum()), flush=True)
if bad is not None:
    out = flashring.flash_attn_with_kvcache(q, kc, vc, causal=True, **bad)
    torch.cuda.synchronize()
    print("bad call finished", float(out.float().abs().sum()), flush=True)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA GPU")
@pytest.mark.parametrize("case", ["ok", "cache_seqlens", "cache_leftpad", "cache_batch_idx", "block_table"])
def test_index_tensors_out_of_range_trip_a_device_assert(case, tmp_path):
    """On a GPU the index tensors of flash_attn_with_kvcache are checked on the device (one launch for all of
    them, no host sync): an entry out of range stops the process with a device-side assert whose message names
    the argument, instead of reading or writing out of bounds, also through the cached fast launch; entries in
    range run through (a fresh process per case: a device assert leaves the CUDA context unusable)."""
    import os
    import subprocess
    import sys
    script = tmp_path / "check.py"
    script.write_text(CHECK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, env=env, timeout=300)
    assert "good calls finished" in res.stdout, res.stderr[-2000:]
    if case == "ok":
        assert res.returncode == 0, res.stderr[-2000:]
    else:
        assert res.returncode != 0 and "bad call finished" not in res.stdout, res.stdout
        said = res.stdout + res.stderr          # the device's assert message comes through its printf buffer
        assert "device-side assert" in said and f"{case} entries" in said, said[-2000:]


@pytest.mark.parametrize("entry", [0, 1, 299, 1023, 1024, 1500])
def test_check_indices_kernel_under_the_interpreter(entry, monkeypatch):
    """ops.kvcache's one-launch index check, its kernel run by the Triton interpreter with asserts on (on a GPU the
    same checks are the device-side asserts of the subprocess test above): entries in range pass; one entry out of
    range, low or high, in any program's block (1,024 entries each) of the per-row tensors or the block table,
    raises naming the argument."""
    import dataclasses
    from triton.runtime import interpreter
    from flashring.ops import kvcache
    if not (kvcache.INTERPRET and hasattr(interpreter, "interpreter_builder")):
        pytest.skip("needs TRITON_INTERPRET=1 and this Triton's interpreter builder")
    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, debug=True))
    monkeypatch.setattr(kvcache, "CHECK_KERNEL", True)
    n = 1501
    bounds = {"cache_seqlens": 17, "cache_leftpad": 18, "cache_batch_idx": 6, "block_table": 9}
    rows = {name: torch.randint(0, bounds[name], (n,), dtype=torch.int32) for name in
            ("cache_seqlens", "cache_leftpad", "cache_batch_idx")}
    table = torch.randint(0, 9, (n, 2), dtype=torch.int32)

    def check(**over):
        args = {**rows, "block_table": table, **over}
        kvcache.check_indices(n, {name: (args[name], hi) for name, hi in bounds.items()})
    check()
    for name, hi in bounds.items():
        for value in (-1, hi):
            t = (table if name == "block_table" else rows[name]).clone()
            t.view(-1)[entry if name != "block_table" else 2 * entry + 1] = value
            with pytest.raises(Exception, match=f"{name} entries"):     # the interpreter wraps the assert
                check(**{name: t})
