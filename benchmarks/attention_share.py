"""Time of the training model's attention core per step, per arm (issue 14: "measured attention share").

    PYTHONPATH=src python3 benchmarks/attention_share.py --preset paper-8k --out DIR [--arms dense,hash16,...]

For each arm, the `train.model.CausalAttention` core that `flashring train` builds for those options runs forward
+ backward on random bf16 (B, S, H, D) inputs of the preset's shape (shared-QK arms: k = normalize(q) per head,
as the model makes it, given as its own input so that normalize, which the model runs outside the core, is not
timed). The median time (bench.harness.time_ms, CUDA events, back-to-back calls so a host-bound
front end shows its host time) x n_layer is the attention time of one training step; `paper_report.py` sets it
against the measured ms/step of the training runs (attention share, Amdahl prediction). Writes
DIR/attention-share-<preset>.jsonl (meta line first) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from flashring.bench.harness import cuda_graph, time_ms
from flashring.metadata import run_metadata
from flashring.train.config import from_argv
from flashring.train.model import CausalAttention
from paper_experiments import ARMS



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper-8k")
    p.add_argument("--arms", default=",".join(a for a in ARMS if not a.startswith("ctrl-")))
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, help="default: the preset's")
    p.add_argument("--seqlen", type=int, help="default: the preset's (a small value checks the driver on a CPU)")
    args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attention-share-{args.preset}.jsonl"
    rows = [run_metadata(device, ["benchmarks/attention_share.py", *(argv or sys.argv[1:])], preset=args.preset)]
    print(f"{'arm':<12} {'ms/call':>8} {'ms/step':>8} {'graph/call':>9} {'graph/step':>9}  (fwd+bwd of the "
          "attention core; x n_layer per step; graph: replayed from a CUDA graph)")
    for arm in args.arms.split(","):
        cfg = from_argv(["--preset", args.preset, *ARMS[arm]] +
                        (["--batch-size", str(args.batch_size)] if args.batch_size else []) +
                        (["--seqlen", str(args.seqlen)] if args.seqlen else []))
        core = CausalAttention(cfg.attn, drop=cfg.drop, n_buckets=cfg.buckets, shared_qk=cfg.shared_qk,
                               unit_norm=cfg.lsh_unit_norm, strict=cfg.strict_causal)
        h, d = cfg.n_head, cfg.d_model // cfg.n_head
        shape = (cfg.batch_size * cfg.grad_accum, cfg.seqlen, h, d)
        q, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        # shared-QK arms: the keys the model would pass (normalised queries), as a leaf of their own, so the
        # normalize that the model runs outside the core is not timed
        k = (F.normalize(q.detach(), dim=-1) if cfg.shared_qk else torch.randn(shape, device=device, dtype=dtype))
        k.requires_grad_(True)
        grad = torch.randn(shape, device=device, dtype=dtype)

        def step():              # gradients returned, not accumulated into .grad (no extra add kernels)
            return torch.autograd.grad(core(q, k, v), (q, k, v), grad)
        ms = time_ms(step, device, rep_ms=300)
        # device time alone: the same call replayed from a CUDA graph (what `flashring train --cuda-graph` runs)
        graph_ms = time_ms(cuda_graph(step, device), device, rep_ms=300) if device.type == "cuda" else None
        row = {"type": "result", "preset": args.preset, "arm": arm, "shape": list(shape), "n_layer": cfg.n_layer,
               "ms_per_call": ms, "ms_per_step": ms * cfg.n_layer, "graph_ms_per_call": graph_ms,
               "graph_ms_per_step": None if graph_ms is None else graph_ms * cfg.n_layer, "options": ARMS[arm]}
        rows.append(row)
        print(f"{arm:<12} {ms:>8.3f} {ms * cfg.n_layer:>8.2f} {graph_ms or float('nan'):>9.3f} "
              f"{(graph_ms or float('nan')) * cfg.n_layer:>9.2f}", flush=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
