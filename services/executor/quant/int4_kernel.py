"""GroupAffine weights on torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`).

The kernel dequantizes w = (c - 8) * scale + zero per group of 32 inputs, c in 0..15.
From w = S * c - D:

    4-bit codes (Q4_0, Q4_1, Q4_K, int4)   one part:  c,            scale S,   zero 8S - D
    5- and 8-bit codes (Q5_K, Q8_0)        two parts: c >> 4 (hi),  scale 16S, zero 128S
                                                      c & 15 (lo),  scale S,   zero 8S - D
    6-bit codes in groups of 16 (Q6_K)     no part: a 32-group has one scale (`mappable`)

(c-8)*S and the hi part are exact in float32 (S has at most 18 significant bits, times a
small integer); `zero_rounding` counts the groups where 8S - D is not (it is exact whenever
S and D are within a factor of ~2**7, which the llama.cpp quantizers' blocks always were in
our measurements). Float32 scales reproduce GroupAffine.dequantize() then; the kernel wants
its scales in the activation dtype, so bfloat16 activations round scale and zero to
bfloat16, an error of the same size as rounding the dense weight itself to bfloat16.

NOTE the kernel is fast only for bfloat16 activations on this CPU (measured in
docs/benchmarks.md: float32 is ~10x slower than a dense float32 matmul).
"""

from __future__ import annotations

import torch

from .group_affine import GroupAffine

GROUP = 32
_ROW_ALIGN = 16  # _convert_weight_to_int4pack_for_cpu needs rows in multiples of 16


def mappable(w: GroupAffine) -> bool:
    return w.group == GROUP and w.bits in (4, 5, 8)


def int4_parts(w: GroupAffine) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """[(codes 0..15 uint8, scale f32, zero f32)] whose kernel dequantizations sum to w."""
    if not mappable(w):
        raise ValueError(f"{w.qtype} ({w.bits}-bit codes, groups of {w.group}) has no int4 form")
    lo_zero = 8 * w.scale - w.min
    if w.bits == 4:
        return [(w.codes, w.scale, lo_zero)]
    return [(w.codes >> 4, 16 * w.scale, 128 * w.scale), (w.codes & 15, w.scale, lo_zero)]


def zero_rounding(w: GroupAffine) -> int:
    """How many groups' zero (8S - D) float32 cannot hold exactly."""
    exact = 8 * w.scale.double() - w.min.double()
    return int(((8 * w.scale - w.min).double() != exact).sum())


class Int4Matmul:
    """x @ w.T on the int4 kernel, one call per part; rows padded to a multiple of 16."""

    def __init__(self, w: GroupAffine, dtype: torch.dtype) -> None:
        self.rows = w.shape[0]
        pad = -self.rows % _ROW_ALIGN
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for codes, scale, zero in int4_parts(w):
            if pad:  # padded rows: code 8, scale 0, zero 0 -> weight 0
                codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
                scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
                zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
            # (groups, rows, 2) as the kernel reads it
            scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
            self.parts.append((packed, scale_zero))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # the kernels need contiguous rows
        out = None
        for packed, scale_zero in self.parts:
            y = torch._weight_int4pack_mm_for_cpu(flat, packed, GROUP, scale_zero)
            out = y if out is None else out.add_(y)
        assert out is not None
        if out.shape[-1] != self.rows:
            out = out[:, : self.rows]
        return out.reshape(*x.shape[:-1], self.rows)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() + s.numel() * s.element_size() for p, s in self.parts)
