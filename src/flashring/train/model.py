"""The GPT of ``flashring train``: pre-LayerNorm blocks, rotary positions, tied embeddings, and the attention core
chosen by ``--attn`` (every mode calls its flashring function directly; ``sdpa`` is PyTorch's).

Long-context memory (Blockwise Parallel Transformer, Liu & Abbeel 2023): the feed-forward and the vocabulary
projection + cross-entropy run over chunks of tokens, each chunk under activation checkpointing, so the
``4 * d_model`` hidden activations and the ``vocab``-wide logits exist for one chunk at a time; what is stored per
layer is ``O(tokens * d_model)``. With an IO-aware attention kernel (no ``S x S`` matrix) every activation then
grows linearly in the sequence length. ``checkpoint=True`` additionally recomputes whole blocks in the backward.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..interface import attention, flash_attn_func
from ..ring import ring_flash_attn_func
from ..sparse import hash_sparse_attn_func, lsh_buckets, qk_sparse_attn_func
from .config import ARCH_DEFAULTS, ATTN_MODES, MODEL_FIELDS, POSITIONS


@dataclass
class GPTConfig:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 64
    ffn_mult: int = 4
    rope_base: float = 10000.0
    shared_qk: bool = False           # k = normalize(q) per head; the projection makes q and v only
    positions: str = "rope"           # "rope" or "learned" (absolute embeddings for positions < n_positions)
    n_positions: int = 0
    # attention core (CausalAttention)
    attn: str = "sdpa"
    drop: float = 0.0
    buckets: int = 0
    lsh_unit_norm: bool = False
    strict_causal: bool = False
    # memory: tokens per feed-forward / cross-entropy chunk (0 = unchunked); whole-block recomputation
    ffn_chunk: int = 0
    ce_chunk: int = 0
    checkpoint: bool = False

    def __post_init__(self):
        if self.attn not in ATTN_MODES:
            raise ValueError(f"attn must be one of {', '.join(ATTN_MODES)}; got {self.attn!r}")
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "ffn_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}; got {self.positions!r}")
        if self.positions == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(f"head dim d_model / n_head = {self.d_model // self.n_head} must be even for rotary "
                             "positions")
        if self.positions == "learned" and self.n_positions < 1:
            raise ValueError(f"learned positions need n_positions >= 1, got {self.n_positions}")
        for name in ("ffn_chunk", "ce_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = unchunked), got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def arch(self) -> dict:
        """The fields that shape the weights (what a checkpoint must match)."""
        return {k: getattr(self, k) for k in MODEL_FIELDS + tuple(ARCH_DEFAULTS)}


# ------------------------------------------------------------------------------------------------------ attention
class CausalAttention(nn.Module):
    """Causal attention core (no projections): ``forward(q, k, v) -> out``, all ``(B, S, H, D)``.

    ``drop``: qk-sparse; each call draws fresh keep masks, per layer and per head, keeping a query (key) with
    probability ``1 - drop`` (the random Q/K dropping of Pagliardini et al. 2023's language-model runs).
    ``n_buckets``: hash-sparse; queries and keys are bucketed by one random rotation per call and head, drawn on
    the device (``unit_norm``: unit-length directions); ``shared_qk``: keys are normalised queries, so the queries'
    buckets serve both; ``strict``: j < i (inside a bucket for hash-sparse; dense for sdpa / flash).
    ``group``: ring; the process group whose ranks each hold one zigzag shard of the sequence (``data.Batches``).
    ``measure``: when set, the next call stores the fraction of causal (query, key) pairs it kept in ``kept``
    (a 0-dim device tensor; read at logging steps only, so training never waits for it).
    """

    def __init__(self, mode: str, drop: float = 0.0, n_buckets: int = 0, group=None, shared_qk: bool = False,
                 unit_norm: bool = False, strict: bool = False):
        super().__init__()
        self.mode, self.drop, self.n_buckets, self.group = mode, float(drop), int(n_buckets), group
        self.shared_qk, self.unit_norm, self.strict = shared_qk, unit_norm, strict
        self.measure, self.kept = False, None

    def extra_repr(self) -> str:
        extra = {"qk-sparse": f", drop={self.drop}",
                 "hash-sparse": f", buckets={self.n_buckets}, unit_norm={self.unit_norm}, strict={self.strict}"}
        return f"mode={self.mode}" + extra.get(self.mode, "") + (", shared_qk" if self.shared_qk else "") + \
            (", strict" if self.strict and self.mode in ("sdpa", "flash") else "")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.strict and self.mode == "flash":
            # Strictly causal dense (j < i) is the kernels' band upper = -1: one call on the whole tensors, query 0
            # (no key) outputs 0. The sliced form below (S - 1 rows, strided views, a padded copy) ran the paper-8k
            # model at 156.4 ms/step on the H100 against 142.8 for plain causal.
            out, _ = attention(q, k, v, q.shape[-1] ** -0.5, None, -1, 0.0)
            return out
        if self.strict and self.mode == "sdpa":
            # Strictly causal dense (j < i): query i over keys 0..i-1 is a causal call of queries 1.. over keys
            # ..S-2 (bottom-right aligned, equal lengths); query 0 sees nothing and outputs 0. With shared-QK the
            # diagonal would otherwise always hold a row's highest score (q . q/|q| = |q| >= q . k_j).
            if q.shape[1] == 1:
                return q.new_zeros(*q.shape[:-1], v.shape[-1])
            inner = CausalAttention(self.mode)(q[:, 1:], k[:, :-1], v[:, :-1])
            return F.pad(inner, (0, 0, 0, 0, 1, 0))
        if self.mode == "sdpa":                           # torch wants (B, H, S, D)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True)
            return out.transpose(1, 2)
        if self.mode == "flash":
            return flash_attn_func(q, k, v, causal=True)
        if self.mode == "qk-sparse":
            q_keep = torch.rand(q.shape[:3], device=q.device) >= self.drop     # (B, S, H): one coin per token, head
            k_keep = torch.rand(k.shape[:3], device=q.device) >= self.drop
            if self.measure:
                self.kept = kept_pair_fraction(q_keep.long(), k_keep.long())
            return qk_sparse_attn_func(q, k, v, q_keep, k_keep, causal=True)
        if self.mode == "hash-sparse":
            if self.shared_qk:        # k = normalize(q): the same bucket (argmax of xR is scale-invariant)
                q_b = k_b = lsh_buckets(q, self.n_buckets, unit_norm=self.unit_norm)
            else:                     # one call on queries and keys together: both see the same rotation
                both = lsh_buckets(torch.cat([q, k], dim=1), self.n_buckets, unit_norm=self.unit_norm)
                q_b, k_b = both[:, :q.shape[1]], both[:, q.shape[1]:]
            if self.measure:
                self.kept = kept_pair_fraction(q_b, k_b, self.n_buckets, self.strict)
            return hash_sparse_attn_func(q, k, v, q_b, k_b, causal=True, strict_causal=self.strict,
                                         num_buckets=self.n_buckets)
        return ring_flash_attn_func(q, k, v, causal=True, group=self.group, layout="zigzag")


def kept_pair_fraction(q_side: torch.Tensor, k_side: torch.Tensor, n_buckets: int = 0,
                       strict: bool = False) -> torch.Tensor:
    """Fraction of the causal (query, key) pairs (j <= i, the dense causal count) a sparse call attends, as a
    0-dim device tensor (no host sync). ``n_buckets == 0``: 0/1 keep flags ``(B, S, H)``; else bucket ids in
    ``[0, n_buckets)`` (pairs in one bucket; ``strict``: j < i). Trained buckets are skewed, so this is measured,
    not assumed."""
    b, s, h = q_side.shape
    if not n_buckets:
        pairs = (q_side * k_side.cumsum(1)).sum()
    elif q_side is k_side:
        # shared buckets (shared-QK): a bucket of n tokens holds n (n + 1) / 2 causal pairs (n (n - 1) / 2
        # strict). Per-bucket counts instead of a (B, H, S, buckets) running count: measured on every replay
        # under --cuda-graph, that one-hot cumsum cost hash16 ~8% of its step (BENCHMARKS.md, session 6).
        n = torch.zeros(b, h, n_buckets, device=q_side.device, dtype=torch.float64)
        n.scatter_add_(-1, q_side.transpose(1, 2).long(), torch.ones(b, h, s, device=q_side.device,
                                                                      dtype=torch.float64))
        pairs = (n * (n - 1 if strict else n + 1) / 2).sum()
    else:
        seen = F.one_hot(k_side.transpose(1, 2), n_buckets).cumsum(2)         # (B, H, S, buckets): keys <= i
        pairs = seen.gather(-1, q_side.transpose(1, 2).unsqueeze(-1)).sum()
        if strict:
            pairs = pairs - (q_side == k_side).sum()                            # drop j == i
    return pairs.double() / (b * h * s * (s + 1) / 2)


# ------------------------------------------------------------------------------------------------------ rotary
def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape ``(B or 1, S, 1, head_dim // 2)`` in float32 for integer ``positions`` ``(B or 1, S)``.

    Positions are explicit (not ``arange(S)``) because a ring shard holds two non-contiguous pieces of the
    sequence; each token must be rotated by its global position.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, S, head_dim / 2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) by the position's angle; math in fp32 (or x's dtype if wider),
    result in x's dtype."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


# ------------------------------------------------------------------------------------------ chunked computations
def _chunks(n: int, chunk: int):
    return [n] if chunk <= 0 or chunk >= n else [min(chunk, n - s) for s in range(0, n, chunk)]


class ChunkedMLP(nn.Module):
    """``fc2(gelu(fc1(norm(x))))`` applied ``chunk`` tokens at a time; each chunk is recomputed in the backward.

    ``norm`` (optional, e.g. the block's pre-MLP LayerNorm) runs inside the chunk so its output is recomputed too:
    under bf16 autocast a LayerNorm output is fp32, 4 bytes x d per token and layer kept for the backward otherwise
    (~14% of a block's saved activations, measured with saved-tensor hooks: 28 -> 24 bytes x d per token).
    """

    def __init__(self, d_model: int, hidden: int, chunk: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)
        self.chunk = chunk

    def _mlp(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        if norm is not None:
            x = norm(x)
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (B * S, d): chunk over all tokens, whatever the batch size
        sizes = _chunks(tokens.shape[0], self.chunk)
        if len(sizes) == 1:
            return self._mlp(x, norm)
        grad = torch.is_grad_enabled()
        # no RNG inside the MLP, so the recomputation needs no RNG state saved (preserve_rng_state=False)
        outs = [checkpoint(self._mlp, c, norm, use_reentrant=False, preserve_rng_state=False) if grad
                else self._mlp(c, norm) for c in tokens.split(sizes)]
        return torch.cat(outs).view_as(x)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 0) -> torch.Tensor:
    """Sum over tokens of ``cross_entropy(hidden @ weight.T, targets)``, ``chunk`` tokens of logits at a time.

    hidden ``(..., d)``, weight ``(V, d)``, targets ``(...)`` int64. Logits go to fp32 before the softmax (under
    bf16 autocast a 256..65536-way log-softmax in bf16 loses ~3 significant digits). Returns a 0-dim sum, fp32 for
    half-precision logits, else in the logits' dtype.
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
    t = targets.reshape(-1)  # (N,)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} tokens but targets has {t.shape[0]}")

    def piece(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hc, weight)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.cross_entropy(logits, tc, reduction="sum")

    sizes = _chunks(h.shape[0], chunk)
    if len(sizes) == 1:
        return piece(h, t)
    grad = torch.is_grad_enabled()
    pieces = [checkpoint(piece, hc, tc, use_reentrant=False, preserve_rng_state=False) if grad else piece(hc, tc)
              for hc, tc in zip(h.split(sizes), t.split(sizes))]
    return torch.stack(pieces).sum()


# ----------------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, group=None):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.d_model // cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.shared_qk, self.rope = cfg.shared_qk, cfg.positions == "rope"
        self.qkv = nn.Linear(cfg.d_model, (2 if cfg.shared_qk else 3) * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.attn = CausalAttention(cfg.attn, drop=cfg.drop, n_buckets=cfg.buckets, group=group,
                                    shared_qk=cfg.shared_qk, unit_norm=cfg.lsh_unit_norm, strict=cfg.strict_causal)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = ChunkedMLP(cfg.d_model, cfg.ffn_mult * cfg.d_model, cfg.ffn_chunk)

    def forward(self, x: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]) -> torch.Tensor:
        B, S, d = x.shape
        if self.shared_qk:            # Pagliardini et al.'s language models: k = normalize(q), per head
            q, v = self.qkv(self.ln1(x)).view(B, S, 2, self.n_head, self.head_dim).unbind(2)
            k = F.normalize(q, dim=-1).to(q.dtype)     # autocast computes normalize in fp32
        else:
            q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, self.n_head, self.head_dim).unbind(2)  # (B, S, H, D)
        if self.rope:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        x = x + self.proj(self.attn(q, k, v).reshape(B, S, d))
        return x + self.mlp(x, self.ln2)  # ln2 applied per chunk, recomputed in the backward


class GPT(nn.Module):
    """``forward(idx, targets=None, positions=None)``: logits ``(B, S, V)`` without targets, else the summed
    cross-entropy (fp32, 0-dim) over all ``B * S`` targets; the caller divides by the token count (which, for a
    ring shard, is the count over all ranks)."""

    def __init__(self, cfg: GPTConfig, group=None):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.d_model) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, group) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 init: N(0, 0.02); the two projections that write into the residual stream are scaled by
        # 1/sqrt(2 * n_layer) so the residual variance does not grow with depth
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, seqlen) token ids, got shape {tuple(idx.shape)}")
        if positions is None:
            if self.wpe is not None and idx.shape[1] > self.cfg.n_positions:
                raise ValueError(f"sequence of {idx.shape[1]} tokens, but the model learned {self.cfg.n_positions} "
                                 "positions")
            positions = torch.arange(idx.shape[1], device=idx.device)[None]  # (1, S)
        x = self.wte(idx)
        cos = sin = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            cos, sin = rotary_tables(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_base)
        for block in self.blocks:
            if self.cfg.checkpoint and torch.is_grad_enabled():
                # RNG state preserved: qk-sparse / hash-sparse must redraw the same masks / rotation on recompute
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        x = self.ln_f(x)
        if targets is None:
            return F.linear(x, self.wte.weight)  # tied weights
        return chunked_cross_entropy(x, self.wte.weight, targets, self.cfg.ce_chunk)


def train_flops_per_token(cfg: GPTConfig, seqlen: int, n_params: int) -> float:
    """Model FLOPs per trained token (PaLM appendix B, causal): ``6 N + 6 L d S``.

    ``6 N``: forward + backward of every weight matmul (tied embedding counted once, as the lm-head matmul).
    Attention scores and values: 2 matmuls x 2 flops x d x S/2 visible keys (causal) = 2 d S per token and layer
    in the forward, x3 with the backward. Recomputation (checkpointing) is not counted, as usual for MFU; for the
    sparse modes this is the dense-equivalent count.
    """
    return 6.0 * n_params + 6.0 * cfg.n_layer * cfg.d_model * seqlen
