"""The one place where the GPT example picks its attention kernel (``--attn``).

Every mode takes and returns ``(batch, seqlen, nheads, headdim)`` tensors and is causal. Kernels other than
PyTorch's SDPA are looked up lazily on the top-level ``flashring`` package when the module is built, so a mode
whose kernel is missing from this build fails at model construction with a message naming the missing export,
never halfway through a training run.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTN_MODES = ("sdpa", "flash", "qk-sparse", "hash-sparse", "ring")

# mode -> flashring exports it calls
_NEEDS = {
    "sdpa": (),
    "flash": ("flash_attn_func",),
    "qk-sparse": ("qk_sparse_attn_func",),
    "hash-sparse": ("hash_sparse_attn_func", "lsh_buckets"),
    "ring": ("ring_flash_attn_func", "shard_sequence"),
}


def resolve_kernels(mode: str) -> Dict[str, Callable]:
    """The flashring functions ``mode`` needs, by name; NotImplementedError naming the first one missing."""
    if mode not in _NEEDS:
        raise ValueError(f"attn must be one of {', '.join(ATTN_MODES)}; got {mode!r}")
    import flashring  # lazy: flashring imports nothing from models/, and sdpa needs no kernel at all

    found = {}
    for name in _NEEDS[mode]:
        fn = getattr(flashring, name, None)
        if fn is None:
            raise NotImplementedError(f"--attn {mode} needs flashring.{name}, which this flashring build does not "
                                      "export")
        found[name] = fn
    return found


class CausalAttention(nn.Module):
    """Causal attention core (no projections): ``forward(q, k, v) -> out``, all ``(B, S, H, D)``.

    ``drop``: qk-sparse only; each step draws fresh keep masks, per layer and per head, keeping a query (key) with
    probability ``1 - drop`` (the random Q/K dropping of Pagliardini et al. 2023's language-model runs).
    ``n_buckets``: hash-sparse only; queries and keys are bucketed by one shared random rotation per call.
    ``group``: ring only; the process group whose ranks each hold one zigzag shard of the sequence.
    """

    def __init__(self, mode: str, drop: float = 0.0, n_buckets: int = 0, group=None):
        super().__init__()
        self.kernels = resolve_kernels(mode)
        if mode == "qk-sparse" and not 0.0 <= drop < 1.0:
            raise ValueError(f"drop must be in [0, 1) for --attn qk-sparse, got {drop}")
        if mode == "hash-sparse" and (n_buckets < 2 or n_buckets % 2):
            # angular LSH takes the argmax over [xR, -xR], so a bucket count is 2 x (rotated dims)
            raise ValueError(f"buckets must be an even number >= 2 for --attn hash-sparse, got {n_buckets}")
        self.mode, self.drop, self.n_buckets, self.group = mode, float(drop), int(n_buckets), group

    def extra_repr(self) -> str:
        extra = {"qk-sparse": f", drop={self.drop}", "hash-sparse": f", buckets={self.n_buckets}"}
        return f"mode={self.mode}" + extra.get(self.mode, "")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "sdpa":
            # torch wants (B, H, S, D)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
            return out.transpose(1, 2)
        if self.mode == "flash":
            return self.kernels["flash_attn_func"](q, k, v, causal=True)
        if self.mode == "qk-sparse":
            keep_shape = q.shape[:3]  # (B, S, H): one coin per token and head
            q_keep = torch.rand(keep_shape, device=q.device) >= self.drop
            k_keep = torch.rand(keep_shape, device=q.device) >= self.drop
            return self.kernels["qk_sparse_attn_func"](q, k, v, q_keep, k_keep, causal=True)
        if self.mode == "hash-sparse":
            # one lsh_buckets call on queries and keys together, so both see the same random rotation
            seqlen = q.shape[1]
            buckets = self.kernels["lsh_buckets"](torch.cat([q, k], dim=1), self.n_buckets)  # (B, 2S, H)
            q_buckets, k_buckets = buckets[:, :seqlen], buckets[:, seqlen:]
            return self.kernels["hash_sparse_attn_func"](q, k, v, q_buckets, k_buckets, causal=True)
        # ring: q, k, v are this rank's zigzag shard of the sequence
        return self.kernels["ring_flash_attn_func"](q, k, v, causal=True, group=self.group, layout="zigzag")


def shard_for_ring(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag shard of ``x`` along ``dim`` (tokens, targets or positions), via flashring."""
    return resolve_kernels("ring")["shard_sequence"](x, group=group, layout="zigzag", dim=dim)


def ring_world_size(group=None) -> int:
    import torch.distributed as dist
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


__all__ = ["ATTN_MODES", "CausalAttention", "resolve_kernels", "shard_for_ring", "ring_world_size"]
