"""The attention-backend interface the model calls once per layer per step.

One step is one flattened, unpadded batch that may mix prefill chunks and decodes:

    tokens:   [ a0 a1 a2 a3 | b7 | c0 c1 | d12 ]      num_tokens = 8
    seqs:       a (prefill)   b    c (chunk) d       num_seqs   = 4
    query_start_loc = [0, 4, 5, 7, 8]
    seq_lens        = context + new tokens per sequence (keys each query may see, causal)

KV cache per layer: k_cache, v_cache of shape (num_blocks, block_size, num_kv_heads, head_dim).
Token t of a sequence lives in block block_tables[s, t // block_size], offset t % block_size;
`slot_mapping[i] = block * block_size + offset` for each new token i (-1: do not write).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int
    num_seqs: int
    slot_mapping: torch.Tensor  # (num_tokens,) int64
    block_tables: torch.Tensor  # (num_seqs, max_blocks_per_seq) int32, padded with 0
    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32
    seq_lens: torch.Tensor  # (num_seqs,) int32: context + query tokens
    max_query_len: int
    max_seq_len: int
    # Host copies, so backends can plan without device syncs.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and computes attention over it."""

    name: str = "abstract"
    # True when forward() of a pure-decode step can be captured in a CUDA graph: no host
    # syncs, no allocations whose lifetime outlasts the step, and per-step lengths read on
    # the device (see services/executor/cuda_graphs.py).
    supports_cuda_graphs: bool = False

    @abstractmethod
    def prepare(self, meta: AttentionMetadata) -> None:
        """Called once per step before the first layer: build per-step index tensors here."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # (num_tokens, num_heads, head_dim)
        k: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim) new keys
        v: torch.Tensor,  # (num_tokens, num_kv_heads, head_dim) new values
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # (num_tokens, num_heads, head_dim)
        """Write k/v at meta.slot_mapping, then causal attention of each query over its sequence."""
