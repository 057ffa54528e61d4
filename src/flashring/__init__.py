"""flashring: exact, IO-aware attention kernels (FlashAttention-2 in Triton) from one GPU to many."""
from .interface import flash_attn_func, scaled_dot_product_attention

__version__ = "0.1.0"
__all__ = ["flash_attn_func", "scaled_dot_product_attention", "__version__"]
