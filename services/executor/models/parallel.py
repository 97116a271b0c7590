"""Tensor-parallel plumbing shared by the parallel layers.

Every layer takes its rank and the group size explicitly. Collectives go through
torch.distributed only when tp_size > 1, so a single-rank model never touches it.

All-reduces of CPU tensors go through shared memory (`shm_allreduce.py`) when the group's
ranks share one host and the tensor is within its size range (TPInfo.shm set); everything
else (small tensors, gather, broadcast, other hosts, CUDA) goes through torch.distributed.

Each collective adds its wall time to `tp.stats` (two perf_counter calls: cheap next to a
collective). On CPU (gloo) that is the time spent communicating plus waiting for the slowest
peer; on CUDA (nccl, asynchronous) it is only the launch time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from services.executor.shm_allreduce import ShmAllReduce


@dataclass
class CommStats:
    """Time spent inside collectives, accumulated since the last reset()."""

    seconds: float = 0.0
    calls: int = 0

    def add(self, start: float) -> None:
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # None: the default (world) group
    stats: CommStats = field(default_factory=CommStats, compare=False)
    shm: ShmAllReduce | None = field(default=None, compare=False)  # same-host all-reduce

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} out of range for size {self.size}")


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} {numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator


def all_reduce(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Sum partial results across ranks (row-parallel outputs, vocab-parallel lookups)."""
    if tp.size == 1:
        return x
    start = time.perf_counter()
    if tp.shm is not None and tp.shm.supports(x):
        tp.shm.all_reduce(x)
    else:
        dist.all_reduce(x, group=tp.group)
    tp.stats.add(start)
    return x


def gather_last_dim_to_first(x: torch.Tensor, tp: TPInfo) -> torch.Tensor | None:
    """Concatenate per-rank shards along the last dimension on rank 0 only (vocab-parallel
    logits: only rank 0 samples); other ranks get None."""
    if tp.size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp.size)] if tp.rank == 0 else None
    start = time.perf_counter()
    dist.gather(x, parts, dst=_global_rank(0, tp), group=tp.group)
    tp.stats.add(start)
    return torch.cat(parts, dim=-1) if parts is not None else None


def broadcast_from_first(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Rank 0's `x` on every rank (in place; others pass a buffer of the same shape)."""
    if tp.size == 1:
        return x
    start = time.perf_counter()
    dist.broadcast(x, src=_global_rank(0, tp), group=tp.group)
    tp.stats.add(start)
    return x


def _global_rank(group_rank: int, tp: TPInfo) -> int:
    return group_rank if tp.group is None else dist.get_global_rank(tp.group, group_rank)


def kv_head_range(total_kv_heads: int, tp: TPInfo) -> tuple[int, int]:
    """(first KV head, number of KV heads) held by this rank.

    With at least as many KV heads as ranks they are split evenly; with fewer, each KV
    head is replicated on tp.size // total_kv_heads consecutive ranks.
    """
    if total_kv_heads >= tp.size:
        n = divide(total_kv_heads, tp.size, "num_key_value_heads")
        return tp.rank * n, n
    if tp.size % total_kv_heads != 0:
        raise ValueError(
            f"tensor-parallel size {tp.size} is not a multiple of num_key_value_heads {total_kv_heads}"
        )
    replicas = tp.size // total_kv_heads
    return tp.rank // replicas, 1
