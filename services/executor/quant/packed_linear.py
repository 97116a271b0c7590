"""The matmul of a quantized linear layer: x @ W.T for W held packed.

A layer's weight may arrive in row blocks of different GGUF types (llama.cpp's Q4_K_M
files keep v_proj in Q6_K beside Q4_K q/k): each block gets its own kernel and the
outputs are concatenated. A block no int4 form fits (Q6_K) is held dense in the compute
dtype, dequantized exactly.

`dense_above`: with a dense copy of the whole weight kept, batches of more rows than this
use it instead: the int4 kernel wins for small batches (decode) and loses for large ones
(prefill, many streams); see docs/benchmarks.md for the crossover measured here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .group_affine import GroupAffine, cat_rows
from .int4_kernel import Int4Matmul, mappable
from .load_time import Int8Matmul


class _Dense:
    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()


Kernel = Int4Matmul | Int8Matmul | _Dense


class PackedLinear:
    def __init__(
        self, kernels: list[Kernel], dense: torch.Tensor | None = None, dense_above: int = 0
    ) -> None:
        self.kernels = kernels
        self.dense = dense
        self.dense_above = dense_above

    @classmethod
    def from_blocks(
        cls, blocks: list[GroupAffine], dtype: torch.dtype, *, keep_dense: bool = False, dense_above: int = 0
    ) -> PackedLinear:
        kernels: list[Kernel] = []
        for b in _merge_alike(blocks):
            kernels.append(Int4Matmul(b, dtype) if mappable(b) else _Dense(b.dequantize().to(dtype)))
        dense = torch.cat([b.dequantize() for b in blocks]).to(dtype) if keep_dense else None
        return cls(kernels, dense, dense_above)

    @classmethod
    def int8(cls, w: torch.Tensor, dtype: torch.dtype) -> PackedLinear:
        return cls([Int8Matmul(w, dtype)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > self.dense_above:
            return F.linear(x, self.dense)
        if len(self.kernels) == 1:
            return self.kernels[0](x)
        return torch.cat([k(x) for k in self.kernels], dim=-1)

    def nbytes(self) -> int:
        dense = 0 if self.dense is None else self.dense.numel() * self.dense.element_size()
        return sum(k.nbytes() for k in self.kernels) + dense


def _merge_alike(blocks: list[GroupAffine]) -> list[GroupAffine]:
    """Adjacent row blocks with the same code width and group size become one block."""
    runs: list[list[GroupAffine]] = []
    for b in blocks:
        if runs and (runs[-1][0].bits, runs[-1][0].group) == (b.bits, b.group):
            runs[-1].append(b)
        else:
            runs.append([b])
    return [r[0] if len(r) == 1 else cat_rows(r) for r in runs]
