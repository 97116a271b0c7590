"""Rotary position embedding (GPT-NeoX "rotate half" layout, as Llama/Qwen use in HF).

The cos/sin table is computed once for max_model_len positions; a step indexes it with
the flattened batch's positions. Supported `rope_type`s: default, linear, llama3.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from services.executor.models.fused_ops import fused_ops_enabled

ROPE_TYPES = ("default", "linear", "llama3")


def compute_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,), float32, computed exactly as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {ROPE_TYPES}")
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Low frequencies are divided by `factor`, high ones kept, the band between blended.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        inv_freq = compute_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        # Only half the table is kept: the "rotate half" layout repeats it for both halves.
        self.register_buffer("cos", freqs.cos().to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", freqs.sin().to(device=device, dtype=dtype), persistent=False)
        self.max_positions = max_positions
        self._kernel = None
        if fused_ops_enabled(device):
            from services.executor.kernels.rotary import apply_rotary_

            self._kernel = apply_rotary_
        self._step_cos = self._step_sin = None

    def prepare(self, positions: torch.Tensor) -> None:
        """Index the table once per forward (every layer rotates at the same positions)."""
        if self._kernel is None:
            self._step_cos = self.cos[positions].unsqueeze(1)
            self._step_sin = self.sin[positions].unsqueeze(1)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim) -> rotated.

        The fused kernel (CUDA) rotates q and k in place and returns them; torch returns copies
        (of the table rows `prepare` picked for this forward's positions)."""
        if self._kernel is not None:
            self._kernel(q, k, self.cos, self.sin, positions)
            return q, k
        return self.rotate(q), self.rotate(k)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, heads, head_dim) rotated at this forward's positions, torch ops (a copy)."""
        return _rotate(x, self._step_cos, self._step_sin)

    @property
    def in_place(self) -> bool:
        return self._kernel is not None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x*cos + rotate_half(x)*sin, written per half: the same roundings as transformers'
    # version (a + (-b) == a - b exactly) without building rotate_half(x).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
