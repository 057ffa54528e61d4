"""How a sequence is split over the ranks of a ring, and which (query, key) blocks each ring step computes.

Two layouts, P = group size:

* ``"contiguous"``: rank r holds the r-th 1/P slice. Simple, but with a causal mask rank P-1 does P times the
  work of rank 0 (it sees every earlier slice), so the slowest rank sets the pace.
* ``"zigzag"``: the sequence is cut into 2P chunks; rank r holds chunks r and 2P-1-r, concatenated in that
  order. Every rank then has one "early" and one "late" chunk and, under a causal mask, the same amount of
  work at every ring step (half a block, apart from the local diagonal step). For P=2 and 8 tokens::

      chunks  [0 1][2 3][4 5][6 7]      rank 0: [0 1 6 7]      rank 1: [2 3 4 5]
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .comm import agree_padded, dtype_code, group_rank_world

LAYOUTS = ("zigzag", "contiguous")

# (query slice, key slice, lower, upper) on the local query block and the received key block, or None if no
# local query sees any of the received keys (the step computes nothing).
StepPlan = Optional[Tuple[slice, slice, Optional[int], Optional[int]]]


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_dim(x: torch.Tensor, dim, name: str) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim {dim} is out of range for {name} with {x.dim()} dims")
    return dim % x.dim()


def local_positions(seqlen_local: int, rank: int, world: int, layout: str) -> torch.Tensor:
    """Global sequence positions (int64, ``(seqlen_local,)``) of the tokens rank ``rank`` holds."""
    check_layout(layout)
    if layout == "contiguous":
        return torch.arange(rank * seqlen_local, (rank + 1) * seqlen_local)
    c = seqlen_local // 2                                     # zigzag chunk length
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])


def _chunks(n: int, world: int, layout: str, what: str) -> int:
    """Chunk length (zigzag: 2P chunks; contiguous: P chunks) of a full length ``n``; ValueError if it does not
    divide."""
    parts = 2 * world if layout == "zigzag" else world
    if n % parts != 0:
        raise ValueError(f"{what}: layout={layout!r} over {world} rank(s) needs the full sequence length to be "
                         f"divisible by {parts}{' (2 * world size)' if layout == 'zigzag' else ''}, got {n}")
    return n // parts


def shard_sequence(x: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (no communication; every rank passes the same
    ``x``). zigzag: full length divisible by 2P; contiguous: divisible by P. Differentiable (a slice/cat)."""
    check_layout(layout)
    dim = _check_dim(x, dim, "x")
    rank, world = group_rank_world(group)
    c = _chunks(x.shape[dim], world, layout, "shard_sequence")
    if layout == "contiguous":
        return x.narrow(dim, rank * c, c).contiguous()
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * world - 1 - rank) * c, c)], dim=dim)


def unshard_sequence(x_local: torch.Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: all_gather the shards of ``group`` and put the chunks back in sequence
    order. Every rank gets the full tensor. Not differentiable (``torch.distributed.all_gather`` has no autograd);
    meant for evaluation, checkpoints and tests. zigzag needs an even local length (two chunks per rank)."""
    err = None
    try:
        check_layout(layout)
        dim = _check_dim(x_local, dim, "x_local")
        if layout == "zigzag" and x_local.shape[dim] % 2 != 0:
            raise ValueError(f"unshard_sequence: layout='zigzag' needs an even local length (two chunks per rank), "
                             f"got {x_local.shape[dim]} along dim {dim}")
    except (TypeError, ValueError) as e:
        err = e
    rank, world = group_rank_world(group)
    if world == 1:
        if err is not None:
            raise err
        return x_local
    fields = [] if err is not None else (
        [("ndim", x_local.dim()), ("dim", dim), ("dtype", dtype_code(x_local.dtype)),
         ("layout", LAYOUTS.index(layout))] + [(f"shape[{i}]", s) for i, s in enumerate(x_local.shape)])
    agree_padded("unshard_sequence", fields, err, group, getattr(x_local, "device", None))
    x_local = x_local.contiguous()
    parts = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(parts, x_local, group=group)
    if layout == "contiguous":
        return torch.cat(parts, dim=dim)
    c = x_local.shape[dim] // 2
    firsts = [p.narrow(dim, 0, c) for p in parts]              # chunks 0 .. P-1
    seconds = [p.narrow(dim, c, c) for p in reversed(parts)]   # chunks P .. 2P-1 (rank r holds chunk 2P-1-r)
    return torch.cat(firsts + seconds, dim=dim)


def step_plan(rank: int, source: int, causal: bool, layout: str, seqlen_local: int) -> StepPlan:
    """What rank ``rank`` computes against the K/V block that started on rank ``source``.

    Derivation (the tests check it against the dense mask on global positions):

    * not causal: everything sees everything.
    * source == rank: the local block against itself. Both layouts keep global order inside the block (zigzag
      concatenates chunk r before chunk 2P-1-r, and r < 2P-1-r), so the plain causal diagonal (None, 0) is exact.
    * contiguous, source < rank: every key is earlier than every query -> full block; source > rank: every key
      is later -> nothing.
    * zigzag, source < rank: keys are chunks s and 2P-1-s. Chunk s < r precedes both query chunks; chunk
      2P-1-s > 2P-1-r follows both. -> all queries against the first half of the keys, no mask.
    * zigzag, source > rank: chunk s > r and chunk 2P-1-s >= P > r both follow query chunk r; both precede query
      chunk 2P-1-r (s <= P-1 < 2P-1-r and 2P-1-s < 2P-1-r). -> second half of the queries against all keys.
    """
    every = slice(None)
    if not causal:
        return every, every, None, None
    if source == rank:
        return every, every, None, 0
    if layout == "contiguous":
        return (every, every, None, None) if source < rank else None
    half = seqlen_local // 2
    if source < rank:
        return every, slice(0, half), None, None
    return slice(half, None), every, None, None
