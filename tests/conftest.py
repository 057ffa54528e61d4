"""Test set-up. On a machine without CUDA the Triton kernels run under the Triton interpreter, which must be
switched on before triton/flashring are imported; on a GPU they run for real.

GPU suite: ``python -m pytest -m gpu`` on a CUDA machine runs every kernel test on the GPU (the ``device`` fixture's
"cuda" parameter carries the ``gpu`` marker), with the larger shapes that only make sense there.
"""
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()
# pytest-xdist workers (pyproject's -n auto) share the cores: one worker per core, not each with a thread per core
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs the kernels on a CUDA device (python -m pytest -m gpu)")


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


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu)] if CUDA else ["interp", "torch"])
def device(request, monkeypatch):
    """Where the kernels run: CUDA on a GPU machine; otherwise both CPU paths, the Triton kernels under the
    interpreter ("interp") and the chunked PyTorch implementation ("torch")."""
    if request.param == "cuda":
        return "cuda"
    from flashring.ops import dispatch
    monkeypatch.setattr(dispatch, "CPU_BACKEND", "triton" if request.param == "interp" else "torch")
    return "cpu"


def gpu_only(values):
    """Parametrize values that only run on CUDA (the larger shapes): marked ``gpu``, empty without CUDA."""
    return [pytest.param(v, marks=pytest.mark.gpu) for v in values] if CUDA else []


# ------------------------------------------------------------------------------------------------- training runs
TRAIN_SMALL = ["--preset", "tiny", "--seqlen", "64", "--batch-size", "4", "--val-every", "4", "--eval-iters", "1",
               "--log-every", "100"]


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory):
    """A dozen real stdlib modules (5-40 kB each): ~200 kB of Python, enough for seqlen-64 windows."""
    import shutil
    import sysconfig
    from pathlib import Path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    picked = [p for p in sorted(stdlib.glob("*.py")) if 5_000 <= p.stat().st_size <= 40_000][:12]
    assert len(picked) == 12
    root = tmp_path_factory.mktemp("pysrc")
    for i, p in enumerate(picked):
        sub = root / ("pkg" if i % 3 == 0 else "")  # some in a subdirectory: the walk is recursive
        sub.mkdir(exist_ok=True)
        shutil.copy(p, sub / p.name)
    return root


@pytest.fixture
def run_args(corpus_root, tmp_path):
    return TRAIN_SMALL + ["--corpus-root", str(corpus_root), "--cache-dir", str(tmp_path / "cache")]


def read_log(out):
    import json
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
