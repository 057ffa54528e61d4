"""``flashring train``: a small long-context GPT whose attention is chosen by ``--attn``.

    flashring train --preset tiny                      # CPU, well under a minute
    flashring train --preset gpt-8k --attn flash --out runs/flash-8k
    torchrun --nproc-per-node 2 -m flashring train --preset gpt-16k --attn ring --out runs/ring-16k
    flashring train plot runs/*/log.jsonl --out loss.png

Modules: ``config`` (TrainConfig, presets, command line), ``model`` (GPT and its attention core), ``data``
(corpora, samplers, the per-rank batch), ``loop`` (set-up and the training loop), ``plot``, ``progress``.
Exit codes: 0 done, 2 bad arguments or input (one line naming the flag or file), 3 out of GPU memory.
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch

from . import plot
from .config import PRESETS, TrainConfig, from_argv
from .loop import Env, train


def _oom_message(cfg: TrainConfig, env: Optional[Env]) -> str:
    where = ""
    if env is not None and env.device.type == "cuda":
        total = torch.cuda.get_device_properties(env.device).total_memory
        where = (f" on {env.device} (peak {torch.cuda.max_memory_allocated(env.device) / 2**30:.1f} GiB allocated "
                 f"of {total / 2**30:.1f} GiB)")
    return (f"out of GPU memory{where} at seqlen {cfg.seqlen} x batch {cfg.batch_size}, world size "
            f"{env.world if env else 1}. Options: --checkpoint (recompute blocks), a smaller --ffn-chunk / "
            "--ce-chunk, a smaller --batch-size with --grad-accum, or --attn ring over more GPUs (torchrun) so each "
            "holds seqlen / world tokens")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        return plot.main(argv[1:])
    cfg = from_argv(argv)                 # argparse errors exit with status 2
    env = None
    try:
        env = Env(cfg)
        train(cfg, env, argv)
    except (ValueError, NotImplementedError, TypeError) as e:
        print(f"flashring train: error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:
        print(f"flashring train: error: {_oom_message(cfg, env)}", file=sys.stderr)
        return 3
    finally:
        if env is not None:
            env.close()
    return 0


__all__ = ["main", "TrainConfig", "PRESETS", "from_argv", "train", "Env"]
