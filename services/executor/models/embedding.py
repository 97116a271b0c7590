"""Vocab-parallel token embedding and LM head.

Each rank holds a contiguous slice of ceil(vocab / tp) rows (the last slice is padded
with zero rows). Lookups of ids outside a rank's slice yield zeros and the ranks' results
are summed; logits are computed per slice and concatenated on rank 0, the rank that samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.executor.models.parallel import TPInfo, all_reduce, gather_last_dim_to_first


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, vocab_size: int, hidden_size: int, *, tp: TPInfo, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_partition = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.rows_per_partition
        self.vocab_end = min(self.vocab_start + self.rows_per_partition, vocab_size)
        self.weight = nn.Parameter(
            torch.zeros(self.rows_per_partition, hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"embedding: checkpoint has shape {tuple(loaded.shape)}, expected "
                f"({self.vocab_size}, {param.shape[1]})"
            )
        n = self.vocab_end - self.vocab_start
        param.data[:n].copy_(loaded.narrow(0, self.vocab_start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out, self.tp)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary. With tied embeddings the model shares the
    embedding's parameter instead of loading its own."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on rank 0; None on the other ranks (at tp_size > 1)."""
        logits = F.linear(hidden, self.weight)
        if self.tp.size > 1:
            logits = gather_last_dim_to_first(logits, self.tp)
            return None if logits is None else logits[..., : self.vocab_size]
        return logits
