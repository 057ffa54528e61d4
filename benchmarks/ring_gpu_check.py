"""Ring attention correctness on GPUs (NCCL): every rank compares its shard of out, lse, dq, dk, dv with the
single-GPU kernel on the full sequence, against a float32 reference on the same inputs.

    torchrun --nproc-per-node 2 benchmarks/ring_gpu_check.py

Rule (as the tests): ring error <= 2x (out, lse) / 3x (grads) the single-GPU kernel's error + a bf16 rounding floor.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import flashring  # noqa: E402
from flashring._masks import flash_bounds  # noqa: E402
from flashring.reference import attention_ref  # noqa: E402


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    failures = 0
    cases = [(2048, 8, 8, 128, True, "zigzag"), (2048, 8, 2, 128, True, "contiguous"),
             (3000, 4, 4, 64, False, "zigzag"), (8192, 4, 1, 128, True, "zigzag"), (1020, 4, 4, 96, True, "zigzag")]
    for seq, h, hk, d, causal, layout in cases:
        g = torch.Generator(device="cuda").manual_seed(1234 + seq)         # same full tensors on every rank
        q, do = (torch.randn(1, seq, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        k, v = (torch.randn(1, seq, hk, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        # Single GPU, full sequence.
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        out_s, lse_s, _ = flashring.flash_attn_func(qs, ks, vs, causal=causal, return_attn_probs=True)
        out_s.backward(do)
        # fp32 reference (autograd).
        qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
        lo, up = flash_bounds(seq, seq, causal, (-1, -1))
        out_r, lse_r = attention_ref(qr, kr, vr, d ** -0.5, lo, up, dtype=torch.float32)
        out_r.backward(do.float())
        # Ring on local shards.
        shard = lambda x: flashring.shard_sequence(x, layout=layout, dim=1)  # noqa: E731
        ql, kl, vl = (shard(t).detach().clone().requires_grad_() for t in (q, k, v))
        out_l, lse_l, _ = flashring.ring_flash_attn_func(ql, kl, vl, causal=causal, layout=layout,
                                                         return_attn_probs=True)
        out_l.backward(shard(do))
        checks = [("out", out_l, shard(out_s), shard(out_r), 2),
                  ("lse", lse_l, shard(lse_s.transpose(1, 2)).transpose(1, 2),
                   shard(lse_r.transpose(1, 2)).transpose(1, 2), 2),
                  ("dq", ql.grad, shard(qs.grad), shard(qr.grad), 3),
                  ("dk", kl.grad, shard(ks.grad), shard(kr.grad), 3),
                  ("dv", vl.grad, shard(vs.grad), shard(vr.grad), 3)]
        line = []
        for name, ring, single, ref, factor in checks:
            e_ring = (ring.float() - ref).abs().max().item()
            e_single = (single.float() - ref).abs().max().item()
            floor = 2 ** -8 * 0.3 + 1e-6
            ok = e_ring <= factor * e_single + floor
            failures += not ok
            line.append(f"{name} {e_ring:.2e}/{e_single:.2e}{'' if ok else ' FAIL'}")
        print(f"rank {rank} seq={seq} h={h}/{hk} d={d} causal={causal} {layout}: ring/single err " + ", ".join(line),
              flush=True)
    t = torch.tensor([failures], device="cuda")
    dist.all_reduce(t)
    if rank == 0:
        print(f"RING GPU CHECK: {'PASS' if t.item() == 0 else f'{t.item()} FAILURES'} (world {world})", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if t.item() else 0)


if __name__ == "__main__":
    main()
