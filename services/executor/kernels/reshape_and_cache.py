"""Write a step's new keys and values into the paged KV cache through `slot_mapping`.

    k, v:            (num_tokens, num_kv_heads, head_dim), rows may be strided (a view of a
                     fused qkv projection), heads and dims contiguous
    k_cache/v_cache: (num_blocks, block_size, num_kv_heads, head_dim)
    slot_mapping[i] = block * block_size + offset, or -1 to skip token i (padding)

One program per token copies that token's whole (num_kv_heads * head_dim) row for K and V.
"""

from __future__ import annotations

import torch
import triton.language as tl

from services.executor.kernels.launch import dual_kernel, next_pow2


@dual_kernel
def _reshape_and_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_tok,
    stride_v_tok,
    stride_kc_blk,
    stride_kc_off,
    stride_vc_blk,
    stride_vc_off,
    block_size,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    ROW_PAD: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot >= 0:
        blk = slot // block_size
        off = slot % block_size
        cols = tl.arange(0, ROW_PAD)
        mask = cols < ROW
        k = tl.load(k_ptr + tok.to(tl.int64) * stride_k_tok + cols, mask=mask)
        v = tl.load(v_ptr + tok.to(tl.int64) * stride_v_tok + cols, mask=mask)
        kc = k_cache_ptr + blk * stride_kc_blk + off * stride_kc_off + cols
        vc = v_cache_ptr + blk * stride_vc_blk + off * stride_vc_off + cols
        tl.store(kc, k.to(kc.dtype.element_ty), mask=mask)
        tl.store(vc, v.to(vc.dtype.element_ty), mask=mask)


def _check_cache(c: torch.Tensor, name: str) -> None:
    # The kernel addresses a slot as one packed (num_kv_heads * head_dim) row; blocks may be
    # strided (a view into a larger allocation).
    _, _, h, d = c.shape
    if c.stride(3) != 1 or c.stride(2) != d or c.stride(1) != h * d:
        raise ValueError(f"{name}: each slot must be a packed (heads, head_dim) row, strides {c.stride()}")


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter k[i], v[i] into the caches at slot_mapping[i]; rows with slot -1 are skipped."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if k.stride(-1) != 1 or k.stride(-2) != k.shape[-1]:
        k = k.contiguous()
    if v.stride(-1) != 1 or v.stride(-2) != v.shape[-1]:
        v = v.contiguous()
    _check_cache(k_cache, "k_cache")
    _check_cache(v_cache, "v_cache")
    row = k.shape[1] * k.shape[2]
    _reshape_and_cache_kernel.launch(
        (num_tokens,),
        k.device,
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        k_cache.shape[1],
        ROW=row,
        ROW_PAD=next_pow2(row),
        num_warps=4 if row >= 1024 else 1,
    )
