"""Whether a layer runs its elementwise ops as fused Triton kernels or as torch ops.

On CUDA, RMSNorm (+ residual add), rotary embedding and SwiGLU's silu-and-mul each run as
one kernel (services/executor/kernels/): a decode step is short enough that dozens of small
torch kernels per layer cost more GPU time than the matmuls around them. Elsewhere the
torch ops run: they match transformers bit for bit in fp32, and CPU has no compiled Triton.
FOLIO_FUSED_KERNELS=0 turns the kernels off (to measure what they save); =all turns them
on for every device, CPU included, where Triton's interpreter runs them (tests).
"""

from __future__ import annotations

import os

import torch


def fused_ops_enabled(device: torch.device | str) -> bool:
    setting = os.environ.get("FOLIO_FUSED_KERNELS", "1")
    if setting == "all":
        return True
    return setting != "0" and torch.device(device).type == "cuda"
