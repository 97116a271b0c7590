"""RMSNorm in one kernel, with the decoder's residual add fused in.

    rms_norm(x, w, eps)                -> norm(x) * w
    rms_norm(x, w, eps, residual=r)    -> norm(x + r) * w, and r <- x + r in place

The torch version is seven or eight elementwise kernels per norm; a decode step runs two
norms per layer, so on a GPU their launches and round trips through memory add up to a
large share of a step, even inside a CUDA graph. The arithmetic mirrors the torch path
(models/norm.py): the sum is rounded to the model dtype (the residual stream is stored in
it), statistics run in fp32, and the normalized row is rounded before the weight multiply.
Only the order of the mean's summation differs.
"""

from __future__ import annotations

import torch
import triton.language as tl

from services.executor.kernels.launch import dual_kernel, next_pow2


@dual_kernel
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, s, mask=mask)
        x = s.to(tl.float32)
    mean_sq = tl.sum(x * x, 0) / n_cols
    y = (x * tl.rsqrt(mean_sq + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # (rows, hidden), last dim contiguous
    weight: torch.Tensor,  # (hidden,)
    eps: float,
    residual: torch.Tensor | None = None,  # (rows, hidden): updated in place to x + residual
) -> torch.Tensor:
    """The normalized rows, a new tensor of x's shape and dtype."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"rms_norm needs a 2-D tensor with a contiguous last dim, got {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError("residual must have x's shape and a contiguous last dim")
    rows, hidden = x.shape
    out = torch.empty_like(x)
    if rows == 0:
        return out
    block = next_pow2(hidden)
    res = residual if residual is not None else x
    _rms_norm_kernel.launch(
        (rows,),
        x.device,
        x,
        res,
        weight,
        out,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out
