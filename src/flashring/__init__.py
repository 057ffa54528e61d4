"""flashring: exact, IO-aware attention kernels (FlashAttention-2 in Triton) from one GPU to many."""
from .interface import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                        flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache,
                        scaled_dot_product_attention, sdpa_fallback_counts)
from .ring import ring_flash_attn_func, shard_sequence, unshard_sequence
from .sparse import (hash_sparse_attn_func, lsh_buckets, lsh_rotations, qk_sparse_attn_func,
                     sparse_attn_compact_func)

__version__ = "0.2.0"
__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache", "scaled_dot_product_attention",
           "sdpa_fallback_counts", "qk_sparse_attn_func", "hash_sparse_attn_func", "sparse_attn_compact_func",
           "lsh_buckets", "lsh_rotations", "ring_flash_attn_func", "shard_sequence", "unshard_sequence",
           "__version__"]
