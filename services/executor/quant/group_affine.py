"""A weight stored as small integer codes with one (scale, min) pair per group of inputs.

    w[n, k] = scale[n, k // group] * codes[n, k] - min[n, k // group]      (float32)

Every GGUF type folio keeps packed decodes into this form exactly (ggml_blocks.py): the
products are exact in float32 and the one subtraction rounds the way the `gguf` package's
own dequantization does, so `dequantize()` is bit-for-bit what gguf gives. The kernel
forms (int4_kernel.py) are derived from it.

It behaves like a (rows, cols) tensor for the tensor-parallel weight loaders: `shape`,
`dim()` and `narrow()`; a column slice must start and end on a group boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupAffine:
    codes: torch.Tensor  # uint8 (rows, cols), values < 2**bits
    scale: torch.Tensor  # float32 (rows, cols // group)
    min: torch.Tensor  # float32 (rows, cols // group)
    bits: int  # code width: 4, 5, 6 or 8
    group: int  # inputs per (scale, min) pair: 16 or 32
    qtype: str  # where it came from, for messages: "Q4_1", "int4", ...

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> GroupAffine:
        if dim == 0:
            return self._map(lambda t: t.narrow(0, start, length))
        if start % self.group or length % self.group:
            raise ValueError(
                f"a {self.qtype} weight splits its input dimension only at multiples of {self.group}; "
                f"this tensor-parallel size needs columns {start}..{start + length}"
            )
        g0, gn = start // self.group, length // self.group
        return GroupAffine(
            self.codes.narrow(1, start, length),
            self.scale.narrow(1, g0, gn),
            self.min.narrow(1, g0, gn),
            self.bits,
            self.group,
            self.qtype,
        )

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> GroupAffine:
        """Apply a row permutation or row slice (same on codes, scale and min)."""
        return self._map(fn)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> GroupAffine:
        return GroupAffine(fn(self.codes), fn(self.scale), fn(self.min), self.bits, self.group, self.qtype)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 weights (of the given rows only, e.g. looked-up embedding rows)."""
        codes, scale, mn = (
            (self.codes, self.scale, self.min)
            if rows is None
            else (self.codes[rows], self.scale[rows], self.min[rows])
        )
        g = self.group
        w = codes.view(*codes.shape[:-1], -1, g).float() * scale.unsqueeze(-1) - mn.unsqueeze(-1)
        return w.reshape(codes.shape)


def cat_rows(parts: list[GroupAffine]) -> GroupAffine:
    """Stack row blocks (e.g. q, k and v) that share bits and group size."""
    first = parts[0]
    if any((p.bits, p.group) != (first.bits, first.group) for p in parts):
        raise ValueError(f"cannot fuse weights of types {sorted({p.qtype for p in parts})} into one layer")
    return GroupAffine(
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scale for p in parts]),
        torch.cat([p.min for p in parts]),
        first.bits,
        first.group,
        first.qtype if len({p.qtype for p in parts}) == 1 else "mixed",
    )
