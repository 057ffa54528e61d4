"""Run metadata (device, versions, git sha, date) recorded by every benchmark and training run."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch


def git_sha() -> Optional[str]:
    """HEAD of the checkout this package runs from, ``-dirty`` if tracked files differ; None without git.
    A checkout copied without .git (e.g. onto a GPU machine) passes its sha in FLASHRING_GIT_SHA."""
    if os.environ.get("FLASHRING_GIT_SHA"):
        return os.environ["FLASHRING_GIT_SHA"]
    here = str(Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """Short file-name form of the device: ``h100``, ``h200``, ``a100``, else ``cuda`` / ``cpu``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((tag for tag in ("h100", "h200", "a100", "l40s", "b200", "gh200") if tag in name), "cuda")


def run_metadata(device: torch.device, argv: Sequence[str] = (), **extra) -> Dict[str, object]:
    """One dict (``"type": "meta"``) describing where and with what a run happened; ``extra`` is merged in."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import __version__
    from .ops import dispatch
    meta = {
        "type": "meta",
        "device": device_name(device),
        "device_type": device.type,
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 1,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "flashring": __version__,
        "flashring_cpu_backend": dispatch.CPU_BACKEND,
        "python": platform.python_version(),
        "host": platform.node(),
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv),
        # the switches that pick kernels (FLASHRING_HOPPER_FWD / _BWD / _SPARSE_BWD, ...), as the run saw them
        "flashring_env": {k: v for k, v in sorted(os.environ.items())
                          if k.startswith("FLASHRING_") and k != "FLASHRING_GIT_SHA"},
    }
    meta.update(extra)
    return meta
