"""Tensor-parallel plumbing shared by the parallel layers.

Every layer takes its rank and the group size explicitly (size 1 today). Collectives go
through torch.distributed only when tp_size > 1, so a single-rank model never touches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # None: the default (world) group

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
    dist.all_reduce(x, group=tp.group)
    return x


def all_gather_last_dim(x: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """Concatenate per-rank shards along the last dimension (vocab-parallel logits)."""
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)


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
