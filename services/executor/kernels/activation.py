"""SwiGLU's activation in one kernel: silu(gate) * up over the fused gate_up projection.

    gate_up: (rows, 2 * inter) = [gate | up]   ->   out: (rows, inter)

torch needs a chunk, a silu and a multiply (two kernels and an intermediate tensor).
Rounding mirrors torch's: silu is computed in fp32 and rounded to the model dtype, then
multiplied by `up` and rounded again.
"""

from __future__ import annotations

import torch
import triton.language as tl

from services.executor.kernels.launch import dual_kernel

BLOCK = 1024


@dual_kernel
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(rows, 2 * inter) -> (rows, inter): silu of the first half times the second half."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(-1) != 1:
        shape = tuple(gate_up.shape)
        raise ValueError(f"silu_and_mul needs (rows, 2 * inter), last dim contiguous; got {shape}")
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    _silu_and_mul_kernel.launch(
        (rows, -(-inter // block)),
        gate_up.device,
        gate_up,
        out,
        gate_up.stride(0),
        out.stride(0),
        inter,
        BLOCK=block,
        num_warps=4,
    )
    return out
