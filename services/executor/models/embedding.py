"""Vocab-parallel token embedding and LM head.

Each rank holds a contiguous slice of ceil(vocab / tp) rows (the last slice is padded
with zero rows). Lookups of ids outside a rank's slice yield zeros and the ranks' results
are summed; logits are computed per slice and concatenated on rank 0, the rank that samples.

Packed (GGUF) weights: the embedding keeps the GroupAffine codes and dequantizes only the
looked-up rows (exactly, in float32, then the compute dtype); the LM head runs its rows on
the packed kernels (PackedLinear), tied or not. With QuantSpec.keep_dense both also keep a
dense copy (lookups and big batches use it). Load-time int8/int4 quantize the LM head
only: an embedding lookup reads a few rows, so packing it saves memory but no time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.executor.models.parallel import TPInfo, all_reduce, gather_last_dim_to_first
from services.executor.quant.group_affine import GroupAffine, cat_rows
from services.executor.quant.load_time import quantize_int4
from services.executor.quant.packed_linear import PackedLinear
from services.executor.quant.spec import QuantSpec


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
        self.dtype = dtype
        self.qweight: GroupAffine | None = None  # packed rows of this rank (padding: zeros)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
        if loaded.shape[0] != self.vocab_size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"embedding: checkpoint has shape {tuple(loaded.shape)}, expected "
                f"({self.vocab_size}, {param.shape[1]})"
            )
        n = self.vocab_end - self.vocab_start
        if isinstance(loaded, GroupAffine):
            rows = loaded.narrow(0, self.vocab_start, n)
            pad = self.rows_per_partition - n
            if pad:  # codes 0, scale 0, min 0: zero rows, like the dense padding
                z = rows.narrow(0, 0, 1).map_rows(lambda t: torch.zeros((pad, *t.shape[1:]), dtype=t.dtype))
                rows = cat_rows([rows, z])
            self.qweight = rows
            return
        param.data[:n].copy_(loaded.narrow(0, self.vocab_start, n))

    def finalize_weights(self, spec: QuantSpec) -> None:
        if self.qweight is None or self.weight is None:
            return
        if spec.keep_dense:
            self.weight.data.copy_(self.qweight.dequantize())
        else:
            self.weight = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._lookup(input_ids)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = self._lookup(local_ids) * in_range.unsqueeze(-1).to(self.dtype)
        return all_reduce(out, self.tp)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.embedding(ids, self.weight)
        assert self.qweight is not None
        flat = ids.reshape(-1)
        return self.qweight.dequantize(flat).to(self.dtype).reshape(*ids.shape, -1)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary. With tied embeddings the model shares the
    embedding's parameter instead of loading its own."""

    packed: PackedLinear | None = None
    _tied: VocabParallelEmbedding | None = None

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        self.weight = embedding.weight
        self.__dict__["_tied"] = embedding  # not a sub-module: the model owns it

    def finalize_weights(self, spec: QuantSpec) -> None:
        """Runs after the embedding's (modules() order), so a tied source is final."""
        source = self._tied or self
        if source.qweight is not None:
            self.packed = PackedLinear.from_blocks([source.qweight], spec.dtype, dense_above=spec.dense_above)
            if spec.keep_dense:  # a tied embedding already holds the dense rows: share them
                self.packed.dense = (
                    source.weight.data
                    if source.weight is not None and source is not self
                    else source.qweight.dequantize().to(spec.dtype)
                )
                source.qweight = None  # lookups use the dense rows
            self.qweight = None
        elif spec.method in ("int8", "int4") and self.weight is not None:
            w = self.weight.data
            self.packed = (
                PackedLinear.int8(w, spec.dtype)
                if spec.method == "int8"
                else PackedLinear.from_blocks([quantize_int4(w)], spec.dtype)
            )
        else:
            return
        self.weight = None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on rank 0; None on the other ranks (at tp_size > 1)."""
        logits = F.linear(hidden, self.weight) if self.packed is None else self.packed(hidden)
        if self.tp.size > 1:
            logits = gather_last_dim_to_first(logits, self.tp)
            return None if logits is None else logits[..., : self.vocab_size]
        return logits
