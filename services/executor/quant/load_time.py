"""Weight-only quantization of float checkpoints at load time (`--quantization int8|int4`).

    int8  one symmetric scale per output row: q = round(w / s), s = max|w| / 127, on
          torch._weight_int8pack_mm (which takes exactly that: int8 rows, one scale each)
    int4  groups of 32 inputs, asymmetric like GGUF's Q4_1: s = (max - min) / 15,
          q = round((w - min) / s), on the int4 kernel through GroupAffine

Both round to nearest, so each weight moves by at most half a step (s / 2).
"""

from __future__ import annotations

import torch

from .group_affine import GroupAffine

INT4_GROUP = 32


def quantize_int4(w: torch.Tensor) -> GroupAffine:
    rows, cols = w.shape
    if cols % INT4_GROUP:
        raise ValueError(f"int4 weights need input sizes in multiples of {INT4_GROUP}, got {cols}")
    g = w.float().reshape(rows, cols // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = torch.round((g - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    return GroupAffine(codes.reshape(rows, cols), scale, -lo, 4, INT4_GROUP, "int4")


class Int8Matmul:
    """x @ w.T with int8 rows and one scale per row."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype) -> None:
        w = w.float()
        scale = w.abs().amax(dim=1) / 127
        inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        self.q = torch.round(w * inv.unsqueeze(1)).clamp_(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(dtype)
        self.rows = w.shape[0]

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale.float().unsqueeze(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # the kernels need contiguous rows
        return torch._weight_int8pack_mm(flat, self.q, self.scale).reshape(*x.shape[:-1], self.rows)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()
