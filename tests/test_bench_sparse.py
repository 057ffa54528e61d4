"""``flashring bench sparse`` on CPU: the results file, the exact surviving-pair count, the flex mask encoding, the
correctness check catching a pattern mismatch, and bad arguments."""
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

import flashring.bench as bench
from flashring.bench import sparse as sb
from flashring.masks import sparse_pair_mask
from flashring.ops import dispatch

SEED = int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))
# Two tiny shapes, one sparsity per pattern, one timed call per row (plus the CPU minimum-time rule).
TINY = ["--seqlens", "64,96", "--headdims", "32", "--nheads", "2", "--batch", "2", "--qk-drop", "0.5",
        "--hash-buckets", "4", "--repeats", "1", "--threads", "1", "--seed", str(SEED)]


def _read(out_dir: Path):
    files = list(out_dir.glob("cpu-sparse-*.jsonl"))
    assert len(files) == 1, files
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    return lines[0], lines[1:]


def test_cpu_run_writes_metadata_and_passing_rows(tmp_path, capsys, monkeypatch):
    # The chunked PyTorch path, as `flashring bench --sparse` runs on CPU (conftest switches the Triton interpreter
    # on, which test_sparse.py covers); through the dense bench's dispatch, as `flashring bench --sparse ...`.
    monkeypatch.setattr(dispatch, "CPU_BACKEND", "torch")
    rc = bench.main(["sparse"] + TINY + ["--out", str(tmp_path), "--no-plot"])
    captured = capsys.readouterr()
    assert rc == 0, f"seed {SEED}\n{captured.out}\n{captured.err}"
    meta, rows = _read(tmp_path)
    assert meta["type"] == "meta" and meta["seed"] == SEED and meta["argv"][:3] == ["flashring", "bench", "sparse"]
    for key in ("device", "torch", "triton", "git_sha", "date", "flashring_cpu_backend"):
        assert key in meta
    assert meta["flashring_cpu_backend"] == "torch" and meta["providers"] == ["flashring"]
    # 2 seqlens x (dense, qk 0.5, hash 4) x (fwd, fwd+bwd), flashring only on CPU.
    assert len(rows) == 2 * 3 * 2
    assert {(r["config"]["seqlen_q"], r["pattern"], r["mode"]) for r in rows} == {
        (s, p, m) for s in (64, 96) for p in ("dense", "qk", "hash") for m in ("fwd", "fwd+bwd")}
    for r in rows:
        c = r["config"]
        assert r["type"] == "result" and r["error"] is None and r["provider"] == "flashring", r
        assert math.isfinite(r["ms"]) and r["ms"] > 0, r
        assert r["check"] == "PASS", f"seed {SEED}: {r}"
        assert set(r["check_detail"]) == ({"out"} if r["mode"] == "fwd" else {"out", "dq", "dk", "dv"})
        assert c["causal"] and c["dtype"] == "fp32" and (c["batch"], c["nheads"], c["headdim"]) == (2, 2, 32)
        dense = next(d for d in rows if d["pattern"] == "dense" and d["mode"] == r["mode"]
                     and d["config"] == c)
        assert r["dense_ms"] == dense["ms"]
        assert r["ideal_ms"] == pytest.approx(dense["ms"] * r["survive"])
        assert r["ratio_ideal"] == pytest.approx(r["ms"] / r["ideal_ms"])
        assert r["speedup"] == pytest.approx(dense["ms"] / r["ms"])
        if r["pattern"] == "dense":
            assert r["survive"] == 1.0 and r["param"] is None
        else:
            assert 0.0 < r["survive"] < 1.0
            assert r["param"] == (0.5 if r["pattern"] == "qk" else 4)
        if r["pattern"] == "hash":
            assert r["buckets"] == "lsh" and r["lsh_ms"] > 0
    # Table last on stdout (one section per mode), then the results path; progress on stderr.
    out = captured.out.rstrip().splitlines()
    assert out[-1].startswith("results: ")
    assert "== fwd+bwd  H=2 D=32 causal fp32" in captured.out and "flex" not in captured.out
    assert "hash nb=4 masks + reference" in captured.err


def _brute_force(kind, q_side, k_side):
    b, s, h = q_side.shape
    kept = 0
    for bi, hi in ((bi, hi) for bi in range(b) for hi in range(h)):
        for i in range(s):
            for j in range(i + 1):
                qa, ka = q_side[bi, i, hi].item(), k_side[bi, j, hi].item()
                kept += (qa and ka) if kind == "qk" else (qa == ka)
    return kept / (b * h * s * (s + 1) / 2)


@pytest.mark.parametrize("kind", ["qk", "hash"])
def test_surviving_fraction_equals_brute_force(kind):
    gen = torch.Generator().manual_seed(SEED)
    b, s, h = 2, 37, 3
    if kind == "qk":
        q_side, k_side = sb.qk_keep_masks(b, s, h, 0.4, gen, torch.device("cpu"))
    else:
        q_side, k_side = (torch.randint(0, 5, (b, s, h), generator=gen) for _ in range(2))
    frac = sb.surviving_fraction(kind, q_side, k_side)
    assert frac == pytest.approx(_brute_force(kind, q_side, k_side), rel=1e-12), f"seed {SEED}"
    # Same count via the (B, H, S, S) causal pattern mask of masks.sparse_pair_mask.
    assert frac == pytest.approx(sparse_pair_mask(kind, q_side, k_side, causal=True).sum().item()
                                 / (b * h * s * (s + 1) / 2), rel=1e-12)


def test_surviving_fraction_extremes():
    keep, drop = torch.ones(1, 9, 2, dtype=torch.bool), torch.zeros(1, 9, 2, dtype=torch.bool)
    assert sb.surviving_fraction("qk", keep, keep) == 1.0
    assert sb.surviving_fraction("qk", keep, drop) == 0.0
    one = torch.zeros(1, 9, 2, dtype=torch.long)
    assert sb.surviving_fraction("hash", one, one) == 1.0
    own = torch.arange(9).view(1, 9, 1).expand(1, 9, 2)       # every token its own bucket: the diagonal only
    assert sb.surviving_fraction("hash", own, own) == pytest.approx(9 / 45)


@pytest.mark.parametrize("kind", ["qk", "hash"])
def test_flex_tables_encode_the_same_pattern(kind):
    """FlexAttention's mask_mod sees i -> j iff bq[i] == bk[j] (and j <= i): must equal the pattern's mask."""
    gen = torch.Generator().manual_seed(SEED)
    b, s, h = 2, 29, 3
    if kind == "qk":
        q_side, k_side = sb.qk_keep_masks(b, s, h, 0.5, gen, torch.device("cpu"))
    else:
        q = torch.randn(b, s, h, 16, generator=gen)
        q_side, k_side = sb.hash_bucket_fn(q, torch.randn(b, s, h, 16, generator=gen), 4, False, SEED, gen)()
    bq, bk = sb.flex_tables(kind, q_side, k_side)                # (B, H, S) int32
    assert bq.shape == (b, h, s) and bq.dtype == torch.int32
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    assert torch.equal((bq[..., :, None] == bk[..., None, :]) & causal,
                       sparse_pair_mask(kind, q_side, k_side, causal=True))


def test_check_catches_a_kernel_that_ignores_the_pattern(tmp_path, capsys, monkeypatch):
    from flashring import flash_attn_func
    # Dense causal attention in place of the QK-sparse kernel: right shapes, wrong pairs; the check must FAIL.
    monkeypatch.setattr(dispatch, "CPU_BACKEND", "torch")
    monkeypatch.setattr(sb, "qk_sparse_attn_func", lambda q, k, v, qk, kk, causal: flash_attn_func(q, k, v,
                                                                                                  causal=causal))
    rc = sb.main(TINY + ["--seqlens", "64", "--patterns", "qk", "--modes", "fwd", "--out", str(tmp_path),
                         "--json-only"])
    assert rc == 1
    assert "!!! FAIL flashring qk drop=0.5 fwd" in capsys.readouterr().err
    _, rows = _read(tmp_path)
    assert [(r["pattern"], r["check"]) for r in rows] == [("dense", "PASS"), ("qk", "FAIL")]
    assert rows[1]["ms"] > 0                                       # still timed


@pytest.mark.parametrize("argv", [["--hash-buckets", "3"], ["--qk-drop", "1.0"], ["--qk-drop", "-0.1"],
                                  ["--patterns", "qk,bogus"], ["--seqlens", "0"], ["--modes", "back"],
                                  ["--headdims", "512"], ["--dtype", "fp8"]]
                         + ([["--device", "cuda"]] if not torch.cuda.is_available() else []))
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    assert sb.main(argv + ["--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.jsonl"))


def test_random_buckets_allow_odd_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(dispatch, "CPU_BACKEND", "torch")
    rc = sb.main(TINY + ["--seqlens", "64", "--patterns", "hash", "--hash-buckets", "3", "--random-buckets",
                         "--modes", "fwd", "--out", str(tmp_path), "--json-only"])
    assert rc == 0, f"seed {SEED}"
    _, rows = _read(tmp_path)
    hashed = [r for r in rows if r["pattern"] == "hash"]
    assert len(hashed) == 1 and hashed[0]["buckets"] == "random" and "lsh_ms" not in hashed[0]
    assert hashed[0]["check"] == "PASS"


def test_plots_when_matplotlib_is_installed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(dispatch, "CPU_BACKEND", "torch")
    assert sb.main(TINY + ["--modes", "fwd", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("cpu-sparse-*-speedup.png"))) == 1
    assert len(list(tmp_path.glob("cpu-sparse-*-ideal.png"))) == 1


def test_failed_pattern_gives_error_rows_and_the_sweep_goes_on(tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
    monkeypatch.setattr(dispatch, "CPU_BACKEND", "torch")
    monkeypatch.setattr(sb, "lsh_buckets", oom)
    rc = sb.main(TINY + ["--seqlens", "64", "--modes", "fwd", "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    _, rows = _read(tmp_path)
    by_pattern = {r["pattern"]: r for r in rows}
    assert by_pattern["hash"]["error"] == "OOM" and by_pattern["hash"]["ms"] is None
    assert by_pattern["hash"]["survive"] is None and by_pattern["hash"]["ratio_ideal"] is None
    assert by_pattern["qk"]["check"] == "PASS" and by_pattern["qk"]["ms"] > 0, f"seed {SEED}"
    assert "OOM" in capsys.readouterr().out                      # in the table's check column
