"""``flashring bench`` on CPU: the harness (results file, FLOP convention, checks, error rows), the suite dispatch,
and the dense, ring and tune suites."""
import json
import math
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import flashring.bench as bench
from flashring.bench import dense, harness as H

SEED = int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))
SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC.parent
# Two tiny shapes per causal setting; one timed call per row (plus the CPU minimum-time rule).
TINY = ["--seqlens", "64,96", "--headdims", "32", "--batch", "1", "--nheads", "2", "--repeats", "1",
        "--threads", "1", "--seed", str(SEED)]


def _read(out_dir: Path, suite: str = "dense"):
    files = list(out_dir.glob(f"cpu-{suite}-*.jsonl"))
    assert len(files) == 1, files
    lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    return lines[0], lines[1:]


def _add_provider(monkeypatch, name, attn):
    """A test provider in flash-attn layout; ``attn(q, k, v, causal)``."""
    provider = H.Provider(name, "bshd", lambda shape, device: (lambda q, k, v: attn(q, k, v, shape.causal)))
    monkeypatch.setitem(dense.PROVIDERS, name, provider)


def test_flops_follow_flash_attn_convention():
    # batch 2, seqlen 1024, 16 heads, headdim 64: 4 * 2 * 16 * 1024^2 * 64 = 8_589_934_592 forward FLOPs.
    fwd = 8_589_934_592
    assert H.attention_flops(2, 1024, 1024, 16, 64, False, "fwd") == fwd
    assert H.attention_flops(2, 1024, 1024, 16, 64, True, "fwd") == fwd / 2
    assert H.attention_flops(2, 1024, 1024, 16, 64, False, "bwd") == 2.5 * fwd
    assert H.attention_flops(2, 1024, 1024, 16, 64, True, "fwd+bwd") == 3.5 * fwd / 2
    with pytest.raises(ValueError, match="mode"):
        H.attention_flops(1, 1, 1, 1, 1, False, "backward")


def test_cpu_run_writes_metadata_and_passing_rows(tmp_path, capsys):
    rc = bench.main(TINY + ["--out", str(tmp_path), "--no-plot"])
    captured = capsys.readouterr()
    assert rc == 0, f"seed {SEED}\n{captured.out}\n{captured.err}"
    meta, rows = _read(tmp_path)
    assert meta["type"] == "meta" and meta["seed"] == SEED and meta["suite"] == "dense"
    for key in ("device", "torch", "triton", "cuda", "cudnn", "git_sha", "date", "argv"):
        assert key in meta
    assert meta["torch"] == torch.__version__ and meta["argv"][:3] == ["flashring", "bench", "dense"]
    assert meta["timing"] == "per-call events"
    # CPU defaults: flashring, sdpa-math, naive; 2 seqlens x (full, causal) x 3 modes.
    assert meta["providers"] == ["flashring", "sdpa-math", "naive"]
    assert len(rows) == 2 * 2 * 3 * 3
    seen = {(r["provider"], r["mode"], r["config"]["seqlen_q"], r["config"]["causal"]) for r in rows}
    assert len(seen) == len(rows)
    for r in rows:
        c = r["config"]
        assert r["type"] == "result" and r["suite"] == "dense" and r["error"] is None, r
        assert math.isfinite(r["ms"]) and r["ms"] > 0, r
        assert r["check"] == "PASS", f"seed {SEED}: {r}"
        assert all(d["err"] <= d["tol"] for d in r["check_detail"].values())
        assert set(r["check_detail"]) == ({"out"} if r["mode"] == "fwd" else {"out", "dq", "dk", "dv"})
        flops = H.attention_flops(c["batch"], c["seqlen_q"], c["seqlen_k"], c["nheads"], c["headdim"],
                                      c["causal"], r["mode"])
        assert r["flops"] == flops
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12)
        assert r["mem_bytes"] is None                       # no allocator statistics on CPU
        assert c["dtype"] == "fp32" and c["batch"] == 1 and c["nheads"] == 2 and c["headdim"] == 32
    # The table comes last on stdout, one section per shape, then the results path.
    assert "== B=1 S=96 H=2 D=32 causal fp32" in captured.out
    assert captured.out.rstrip().splitlines()[-1].startswith("results: ")
    assert "naive" in captured.err                             # progress went to stderr


def test_bf16_check_passes_for_correct_providers(tmp_path):
    args = ["--seqlens", "80", "--headdims", "16", "--batch", "2", "--nheads", "2", "--dtype", "bf16",
            "--providers", "flashring,naive", "--modes", "fwd+bwd", "--causal", "yes", "--repeats", "1",
            "--seed", str(SEED), "--out", str(tmp_path), "--json-only"]
    assert bench.main(args) == 0, f"seed {SEED}"
    _, rows = _read(tmp_path)
    assert [r["check"] for r in rows] == ["PASS", "PASS"], f"seed {SEED}: {rows}"
    # The bf16 tolerance is derived from the bf16 reference's own error, far above the fp32 floor of 1e-5.
    assert all(r["check_detail"]["out"]["tol"] > 1e-4 for r in rows)


def test_wrong_provider_fails_loudly_but_timing_continues(tmp_path, capsys, monkeypatch):
    from flashring import flash_attn_func
    # A 1% output error: far outside the fp32 tolerance (about 1e-5), exactly what the check must catch.
    _add_provider(monkeypatch, "off-by-1pct", lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal) * 1.01)
    rc = bench.main(TINY + ["--providers", "flashring,off-by-1pct", "--seqlens", "64", "--causal", "no",
                            "--out", str(tmp_path), "--no-plot"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "!!! FAIL off-by-1pct" in captured.err and "FAIL <<<" in captured.out
    _, rows = _read(tmp_path)
    by_provider = {p: [r for r in rows if r["provider"] == p] for p in ("flashring", "off-by-1pct")}
    assert all(r["check"] == "PASS" for r in by_provider["flashring"]), f"seed {SEED}"
    for r in by_provider["off-by-1pct"]:
        assert r["check"] == "FAIL" and not r["check_detail"]["out"]["ok"]
        assert r["ms"] > 0                                      # still timed


def test_unavailable_and_oom_rows_do_not_crash(tmp_path, capsys, monkeypatch):
    def oom(q, k, v, causal):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
    _add_provider(monkeypatch, "oom", oom)
    rc = bench.main(TINY + ["--providers", "cudnn,oom,naive", "--seqlens", "64", "--causal", "no",
                            "--out", str(tmp_path), "--json-only"])
    assert rc == 0
    _, rows = _read(tmp_path)
    errors = {r["provider"]: r["error"] for r in rows}
    assert errors["sdpa-cudnn"].startswith("unavailable:") and errors["oom"] == "OOM" and errors["naive"] is None
    for r in rows:
        assert (r["ms"] is None) == (r["provider"] != "naive")
    assert "results: " in capsys.readouterr().out


def test_suites_dispatch_and_legacy_flags(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("flashring.bench.ring")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "flashring.bench.ring", fake)
    assert bench.main(["ring", "--seqlens", "1k"]) == 7
    assert bench.main(["--seqlens", "1k", "--ring", "--nproc", "2"]) == 7        # the old flag form
    assert seen == [["--seqlens", "1k"], ["--seqlens", "1k", "--nproc", "2"]]
    assert bench.main(["bogus"]) == 2 and "unknown suite 'bogus'" in capsys.readouterr().err
    assert bench.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in bench.SUITES)


@pytest.mark.parametrize("argv", [["--headdims", "300"], ["--providers", "bogus"], ["--modes", "fwd,back"],
                                  ["--seqlens", "0"], ["--cuda-graphs", "--device", "cpu"],
                                  ["--cuda-graphs", "--modes", "bwd"], ["sparse", "--cuda-graphs", "--device", "cpu"],
                                  ["sparse", "--cuda-graphs", "--modes", "bwd"]])
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    assert bench.main(argv + ["--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.jsonl"))


def test_launch_keyword_arguments():
    """The kernel benchmarks' --variant / --variants: Python literals only (no eval), bad items an argparse error."""
    assert H.keywords("programs=3, dynamic=False,block_q=128") == dict(programs=3, dynamic=False, block_q=128)
    assert H.keywords("") == {}
    assert H.variants("tile:programs=1000000000;s3:stages=3;") == dict(tile=dict(programs=1000000000),
                                                                       s3=dict(stages=3))
    for bad in ("programs", "3=programs", "x=__import__('os')", "x=1+"):
        with pytest.raises(H.argparse.ArgumentTypeError):
            H.keywords(bad)
    for bad in ("programs=3", ":programs=3"):
        with pytest.raises(H.argparse.ArgumentTypeError):
            H.variants(bad)


def test_format_table_aligns_columns_and_sections():
    text = H.format_table(["name", "ms"], ["== section", ["a", "1.5"], ["longer", "10"]])
    lines = text.splitlines()
    # widths 6 and 3, two spaces between columns; the section row spans the table as given.
    assert lines[0] == "name     ms" and lines[1] == "-" * 11 and lines[2] == "== section"
    assert lines[3] == "a       1.5" and lines[4] == "longer   10"


def test_plots_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    assert bench.main(TINY + ["--seqlens", "64,96", "--causal", "no", "--modes", "fwd",
                              "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("cpu-dense-*-tflops.png"))) == 1


def test_python_m_flashring_bench_quick(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "flashring", "bench", "--quick", "--out", str(tmp_path),
                          "--no-plot", "--seed", str(SEED)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"seed {SEED}\n{res.stdout}\n{res.stderr}"
    assert "PASS" in res.stdout and "FAIL" not in res.stdout
    meta, rows = _read(tmp_path)
    assert meta["device_type"] == "cpu" and len(rows) == 2 * 3 * 3  # seqlen 128, full/causal, 3 providers x modes


def test_git_sha_metadata(monkeypatch):
    """One implementation for every suite and for training: FLASHRING_GIT_SHA wins (a GPU machine gets a copy
    without .git), else HEAD with -dirty when tracked files differ, else None."""
    import re
    from flashring.metadata import git_sha
    monkeypatch.setenv("FLASHRING_GIT_SHA", "0123abc")
    assert git_sha() == "0123abc"
    monkeypatch.delenv("FLASHRING_GIT_SHA")
    sha = git_sha()
    assert sha is None or re.fullmatch(r"[0-9a-f]{40}(-dirty)?", sha), sha


def test_time_ms_median_and_fixed_call_count():
    calls = []
    ms = H.time_ms(lambda: calls.append(1), torch.device("cpu"), n_calls=7)
    assert len(calls) == 1 + 7 and ms >= 0                     # one warm-up call, then exactly 7 timed


def test_ring_suite_on_gloo(tmp_path, capsys):
    """The CPU (gloo) ring suite runs end to end: checked rows, per-rank times, efficiency, probe rows."""
    from flashring.bench import ring
    rc = ring.main(["--cpu", "--nproc", "2", "--seqlens", "64,128", "--iters", "1", "--probe", "--probe-max",
                    "256", "--out", str(tmp_path), "--seed", str(SEED)])
    assert rc == 0, capsys.readouterr()
    meta, rows = _read(tmp_path, "ring")
    assert meta["world"] == 2 and meta["backend"] == "gloo" and meta["suite"] == "ring"
    ring_rows = [r for r in rows if r["provider"] == "ring"]
    assert [r["config"]["seqlen_q"] for r in ring_rows] == [64, 128]
    for r in ring_rows:
        assert r["check"] == "PASS" and r["ms"] > 0 and len(r["ms_per_rank"]) == 2 and r["efficiency"] > 0, r
    assert {r["provider"] for r in rows} == {"ring", "ring-compute", "single", "ring-probe"}
    assert [r["config"]["seqlen_q"] for r in rows if r["provider"] == "ring-probe"] == [128, 256]


def test_tune_suite_under_the_interpreter(tmp_path, capsys):
    from flashring.bench import tune
    rc = tune.main(["--seqlens", "48", "--headdims", "16", "--causal", "yes", "--out", str(tmp_path),
                    "--seed", str(SEED), "--repeats", "1", "--no-plot"])
    out = capsys.readouterr().out
    assert rc == 0, out
    _, rows = _read(tmp_path, "tune")
    assert {r["mode"] for r in rows} == {"fwd", "bwd"} and all(r["check"] == "PASS" for r in rows), rows
    assert "*best*" in out and sum(r["default"] for r in rows) == 2       # the interpreter default, per pass


def test_every_benchmark_driver_starts():
    """Each ``benchmarks/*.py`` driver imports and answers ``--help`` (a driver that imported a removed module went
    unnoticed for sessions), in one process: runpy with the driver's own ``__main__``."""
    drivers = sorted(str(p) for p in (ROOT / "benchmarks").glob("*.py"))
    script = "\n".join([
        "import os, runpy, sys",
        "bad = []",
        "for path in sys.argv[1:]:",
        "    sys.argv, sys.path[0] = [path, '--help'], os.path.dirname(path)",
        "    try:",
        "        runpy.run_path(path, run_name='__main__')",
        "        bad.append((path, 'no exit'))",
        "    except SystemExit as e:",
        "        if e.code not in (0, None):",
        "            bad.append((path, e.code))",
        "    except BaseException as e:",
        "        bad.append((path, repr(e)))",
        "print(bad)",
        "sys.exit(1 if bad else 0)"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script, *drivers], env=env, capture_output=True, text=True,
                         timeout=300)
    assert len(drivers) >= 10 and res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


def test_sparse_front_end_counts():
    """benchmarks/sparse_frontend.py (kernels stubbed): a QK-sparse forward + backward on the kernels' path makes no
    host sync and no aten compute op around its launches; the hash form's syncs are the CPU-only id range check."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_frontend.py"), "--seqlen", "256",
                          "--nheads", "2", "--repeats", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    qk = next(line for line in res.stdout.splitlines() if line.startswith("qk-sparse"))
    assert " 0 aten compute ops" in qk and " 0 host syncs" in qk and "Triton launches" in qk, qk
