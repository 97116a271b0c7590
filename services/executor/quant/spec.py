"""What build_model decided about a model's weights, handed to every layer's finalize."""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("none", "gguf", "int8", "int4")


@dataclass(frozen=True)
class QuantSpec:
    method: str  # one of METHODS
    dtype: torch.dtype  # compute dtype: activations, kernel scales, dense copies
    keep_dense: bool = False  # also keep a dense copy of packed weights (for big batches)
    dense_above: int = 0  # rows per matmul above which the dense copy is used

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"quantization method must be one of {METHODS}, got {self.method!r}")


NONE = QuantSpec("none", torch.float32)
