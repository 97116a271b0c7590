"""Attention backends behind one interface (backend.py); pick one by name."""

from __future__ import annotations

import torch

from services.executor.attention.backend import AttentionBackend, AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend called `name`: torch, triton, or auto (triton on CUDA, torch elsewhere)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from services.executor.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        # On CPU tensors the kernels run in Triton's interpreter (slow: for tests and
        # checks, not serving). Imported lazily so the torch path never needs triton.
        from services.executor.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; expected auto, torch or triton")
