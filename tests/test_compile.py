"""The kernels compiled for Hopper (sm_90) without a GPU: a register-budget guard that runs in CPU-only CI.

A kernel change can pass every interpreter test and still cost 10-50% on an H100 through registers alone (session
4's non-finite masking: 179 registers at D=64, spills at D=128). ``benchmarks/compile_probe.py`` compiles the
kernels for sm_90 with the ptxas that Triton bundles; this checks its report for the default configurations: the
forward and dQ kernels never spill, and the D <= 64 forward keeps its 128-register cap (two 256-thread programs
per SM). Triton versions differ (the GPU image runs 3.6, CI whatever the constraints pin), so the limits are the
structural ones, not exact counts. The D=128 dK/dV kernel already spills on 3.6 (benchmarks/NOTES.md): not checked.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_default_kernels_compile_for_sm90_without_spills():
    triton = pytest.importorskip("triton")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "cuobjdump").exists() or not (bin_dir / "ptxas").exists():
        pytest.skip("this Triton build ships no NVIDIA ptxas / cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # compile, not interpret
    env["PYTHONPATH"] = str(ROOT / "src")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_probe.py"), "--headdims", "64,128"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.findall(r"D=(\d+)\s+causal=(\w+)\s+(\w+).*\n\s+regs\s+(\d+) stack\s+(\d+) B", proc.stdout)
    assert len(found) == 12, proc.stdout                        # 2 head dims x 2 masks x 3 kernels
    for d, causal, kernel, regs, stack in found:
        if kernel in ("FWD", "BWD_DQ"):
            assert int(stack) == 0, (d, causal, kernel, regs, stack)
    # the D <= 64 forward keeps two 256-thread programs per SM through its config's register cap (ptxas then
    # spills rather than exceed it, which the check above catches)
    from flashring.ops import flash
    cfg = flash.default_config(64, torch.bfloat16, torch.device("cuda"), backward=False, seqlen_q=8192, causal=True)
    assert cfg.get("maxnreg") == 128 and cfg["num_warps"] == 8, cfg
