"""flashring: exact, IO-aware attention kernels (FlashAttention-2 in Triton) from one GPU to many."""
from .interface import flash_attn_func, scaled_dot_product_attention
from .ring import ring_flash_attn_func, shard_sequence, unshard_sequence
from .sparse import (hash_sparse_attn_func, lsh_buckets, lsh_rotations, qk_sparse_attn_func,
                     sparse_attn_compact_func)

__version__ = "0.1.0"
__all__ = ["flash_attn_func", "scaled_dot_product_attention", "qk_sparse_attn_func", "hash_sparse_attn_func",
           "sparse_attn_compact_func", "lsh_buckets", "lsh_rotations", "ring_flash_attn_func", "shard_sequence",
           "unshard_sequence", "__version__"]
