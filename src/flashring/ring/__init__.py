"""Ring attention: exact attention over a sequence sharded across the ranks of a torch.distributed group."""
from .attention import merge_partial, ring_flash_attn_func
from .comm import RingComm
from .layout import LAYOUTS, local_positions, shard_sequence, step_plan, unshard_sequence

__all__ = ["ring_flash_attn_func", "shard_sequence", "unshard_sequence", "RingComm", "merge_partial",
           "local_positions", "step_plan", "LAYOUTS"]
