"""Process-group helpers and the double-buffered ring transport used by ring attention.

Everything here goes through ``torch.distributed`` (``batch_isend_irecv`` for the ring, ``all_gather`` for the
up-front agreement check), so it runs on NCCL (GPU) and gloo (CPU) alike.
"""
from __future__ import annotations

import zlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def group_rank_world(group=None) -> Tuple[int, int]:
    """(rank within ``group``, size of ``group``). Without an initialised process group this is (0, 1), so the
    ring functions also work in a plain single process."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group``: P2P ops address peers by global rank even inside subgroups."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _meta_device(group, hint: Optional[torch.Device] = None) -> torch.device:
    # NCCL only moves CUDA tensors, gloo only needs CPU ones; prefer the inputs' device when it is CUDA.
    if hint is not None and hint.type == "cuda":
        return hint
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_ints(values: Sequence[int], group=None, device: Optional[torch.device] = None) -> List[List[int]]:
    """all_gather a short int64 vector (same length on every rank); returns one list per group rank."""
    _, world = group_rank_world(group)
    if world == 1:
        return [list(values)]
    t = torch.tensor(list(values), dtype=torch.int64, device=_meta_device(group, device))
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [o.tolist() for o in out]


def agree(fn_name: str, fields: Sequence[Tuple[str, int]], local_error: Optional[BaseException] = None,
          group=None, device: Optional[torch.device] = None) -> None:
    """Check that every rank of ``group`` passed local validation and sees the same ``fields`` (name, int).

    Raises the same kind of error on *every* rank (the local one where it failed, ValueError elsewhere) instead
    of letting one rank raise while its peers block forever in the next collective.
    """
    names = [n for n, _ in fields]
    mine = [1 if local_error is not None else 0] + [0 if local_error is not None else int(v) for _, v in fields]
    rows = gather_ints(mine, group, device)
    failed = [r for r, row in enumerate(rows) if row[0]]
    if local_error is not None:
        raise local_error
    if failed:
        raise ValueError(f"{fn_name}: input validation failed on group rank(s) {failed}; see the error raised "
                         "there. Every rank must pass the same kind of inputs.")
    for i, name in enumerate(names, start=1):
        vals = [row[i] for row in rows]
        if len(set(vals)) > 1:
            raise ValueError(f"{fn_name}: {name} differs across ranks (per group rank: {vals}); every rank must "
                             "pass shards of the same shape, dtype and options")


class RingComm:
    """One double-buffered ring stream: ``start(t)`` posts "send ``t`` to rank+1, receive from rank-1" as one
    ``batch_isend_irecv``, returns at once so the caller computes meanwhile, and ``wait()`` returns the received
    block. The sent tensor is recycled as the next receive buffer (ownership passes to the comm object at
    ``start``), so a ring of P steps allocates two buffers, not P.

    ``tag`` separates concurrent streams between the same pair of ranks (K/V and dK/dV in the backward); NCCL
    ignores tags and matches by posting order, which is the same on every rank.
    """

    def __init__(self, group=None, tag: int = 0):
        self.group = group
        self.tag = tag
        self.rank, self.world = group_rank_world(group)
        if self.world > 1:
            self.send_peer = global_rank(group, (self.rank + 1) % self.world)
            self.recv_peer = global_rank(group, (self.rank - 1) % self.world)
        self._spare: Optional[torch.Tensor] = None
        self._sending: Optional[torch.Tensor] = None
        self._incoming: Optional[torch.Tensor] = None
        self._reqs: list = []

    def start(self, tensor: torch.Tensor) -> None:
        if self.world == 1:
            raise RuntimeError("RingComm.start on a group of size 1: there is nobody to exchange with")
        if self._reqs:
            raise RuntimeError("RingComm.start called while the previous transfer is still in flight; wait() first")
        if not tensor.is_contiguous():
            raise ValueError("RingComm sends contiguous tensors only")
        spare = self._spare
        if spare is None or spare.shape != tensor.shape or spare.dtype != tensor.dtype:
            spare = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, peer=self.send_peer, group=self.group, tag=self.tag),
               dist.P2POp(dist.irecv, spare, peer=self.recv_peer, group=self.group, tag=self.tag)]
        self._reqs = dist.batch_isend_irecv(ops)
        self._sending, self._incoming, self._spare = tensor, spare, None

    def wait(self) -> torch.Tensor:
        if not self._reqs:
            raise RuntimeError("RingComm.wait called without a transfer in flight")
        for req in self._reqs:
            req.wait()
        self._reqs = []
        received, self._spare = self._incoming, self._sending
        self._sending = self._incoming = None
        return received


_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64,
          torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def dtype_code(dtype: torch.dtype) -> int:
    # Same number on every process (str hashes are salted per process, crc32 is not).
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES) + zlib.crc32(str(dtype).encode())


_MAX_FIELDS = 16


def agree_padded(fn_name, fields, err, group, device) -> None:
    """``agree`` with ``fields`` padded to a fixed count: all_gather needs the same length everywhere, also on a
    rank whose local checks failed."""
    if len(fields) > _MAX_FIELDS:
        raise ValueError(f"{fn_name}: tensors with more than {_MAX_FIELDS - 4} dims are not supported")
    fields = list(fields) + [(f"pad{i}", 0) for i in range(_MAX_FIELDS - len(fields))]
    agree(fn_name, fields, err, group, device)


class LoopbackComm(RingComm):
    """Same interface and ring bookkeeping as :class:`RingComm`, no traffic: ``wait()`` hands back the tensor
    given to ``start()``. Ring attention with it runs exactly the same steps and kernel calls on the local K/V,
    which is how the benchmark measures compute alone (results are then *not* the attention of the sequence)."""

    def start(self, tensor: torch.Tensor) -> None:
        self._incoming = tensor

    def wait(self) -> torch.Tensor:
        received, self._incoming = self._incoming, None
        return received
