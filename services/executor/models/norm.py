"""RMSNorm, with the residual add fused in (the decoder layers' pre-norm pattern).

On CUDA both run as one Triton kernel (kernels/rms_norm.py), which updates the residual in
place; elsewhere as torch ops, in transformers' order.
"""

from __future__ import annotations

import torch
from torch import nn

from services.executor.models.fused_ops import fused_ops_enabled


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self._kernel = None
        if fused_ops_enabled(device):
            from services.executor.kernels.rms_norm import rms_norm

            self._kernel = rms_norm

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers (fp32 statistics, cast back before the weight) so
        # fp32 results match it bit for bit.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is not None and x.dim() == 2:  # per-head norms (3-D) stay in torch
            return self._kernel(x, self.weight, self.eps)
        return self._norm(x)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the new residual stream comes back too.
        The fused kernel writes it into `residual` (the caller's old residual is dead)."""
        if self._kernel is not None and x.dim() == 2:
            return self._kernel(x, self.weight, self.eps, residual=residual), residual
        x = x + residual
        return self._norm(x), x
