"""Test set-up. On a machine without CUDA the Triton kernels run under the Triton interpreter, which must be
switched on before triton/flashring are imported; on a GPU they run for real."""
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def seed(request):
    """A fresh seed per test (replay: FLASHRING_SEED=<n>), printed in the failure report."""
    s = int(os.environ.get("FLASHRING_SEED", random.randrange(2**31)))
    torch.manual_seed(s)
    request.node.user_properties.append(("seed", s))
    return s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for k, v in item.user_properties:
            if k == "seed":
                rep.sections.append(("seed", f"replay with FLASHRING_SEED={v}"))


@pytest.fixture(params=["cuda"] if torch.cuda.is_available() else ["interp", "torch"])
def device(request, monkeypatch):
    """Where the kernels run: CUDA on a GPU machine; otherwise both CPU paths, the Triton kernels under the
    interpreter ("interp") and the chunked PyTorch implementation ("torch")."""
    if request.param == "cuda":
        return "cuda"
    from flashring.ops import flash
    monkeypatch.setattr(flash, "CPU_BACKEND", "triton" if request.param == "interp" else "torch")
    return "cpu"
