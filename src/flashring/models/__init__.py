"""Models for the ``flashring train`` example."""
from .attention import ATTN_MODES, CausalAttention, resolve_kernels
from .gpt import GPT, GPTConfig, chunked_cross_entropy, ChunkedMLP, train_flops_per_token

__all__ = ["ATTN_MODES", "CausalAttention", "resolve_kernels", "GPT", "GPTConfig", "chunked_cross_entropy",
           "ChunkedMLP", "train_flops_per_token"]
