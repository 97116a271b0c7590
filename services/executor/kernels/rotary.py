"""Rotary position embedding applied to q and k in place, one program per token.

GPT-NeoX "rotate half" layout, as models/rotary.py: with x = [x1, x2] split at head_dim/2,

    x1' = x1 * cos - x2 * sin        x2' = x2 * cos + x1 * sin

cos/sin rows are looked up by each token's position in the half-width tables. The torch
version builds the rotated copies with about ten elementwise kernels for q and k; here one
kernel reads each q/k element once and writes it back. Arithmetic runs in fp32 and rounds
once, where torch rounds after each product in bf16/fp16 (so results differ by an ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.executor.kernels.launch import dual_kernel, next_pow2


@triton.jit
def _rotate_heads(
    base,  # this token's first head
    stride_head,
    cos,  # (1, HALF_PAD) fp32
    sin,
    offs_d,
    mask_d,
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
):
    offs_h = tl.arange(0, HEADS_PAD)
    mask = (offs_h < NUM_HEADS)[:, None] & mask_d[None, :]
    p1 = base + offs_h[:, None] * stride_head + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(base.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos + x1 * sin).to(base.dtype.element_ty), mask=mask)


@dual_kernel
def _rotary_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    mask_d = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cs + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cs + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    q = q_ptr + tok * stride_q_tok
    _rotate_heads(q, stride_q_head, cos, sin, offs_d, mask_d, NUM_Q_HEADS, Q_HEADS_PAD, HALF)
    k = k_ptr + tok * stride_k_tok
    _rotate_heads(k, stride_k_head, cos, sin, offs_d, mask_d, NUM_K_HEADS, K_HEADS_PAD, HALF)


def apply_rotary_(
    q: torch.Tensor,  # (tokens, heads, head_dim), may be a strided view of a fused qkv row
    k: torch.Tensor,  # (tokens, kv_heads, head_dim)
    cos: torch.Tensor,  # (max_positions, head_dim // 2)
    sin: torch.Tensor,
    positions: torch.Tensor,  # (tokens,)
) -> None:
    """Rotate q and k in place."""
    tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    half = head_dim // 2
    if head_dim % 2 or cos.shape[-1] != half or sin.shape != cos.shape:
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not fit head_dim {head_dim}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("q, k, cos and sin need a contiguous last dim (and cos, sin the same strides)")
    if tokens == 0:
        return
    _rotary_kernel.launch(
        (tokens,),
        q.device,
        q,
        k,
        cos,
        sin,
        positions,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_k_heads,
        Q_HEADS_PAD=next_pow2(num_q_heads),
        K_HEADS_PAD=next_pow2(num_k_heads),
        HALF=half,
        HALF_PAD=next_pow2(half),
        num_warps=4,
    )
