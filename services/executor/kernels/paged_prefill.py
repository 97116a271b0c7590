"""Prefill / extend attention: ragged query chunks whose earlier context is in the paged cache.

Sequence s has `query_len` new tokens (already written to the cache) after `ctx = seq_len -
query_len` computed ones, so fresh prefill (ctx = 0), a chunk of a chunked prefill, an extend
after a prefix-cache hit and a plain decode row (query_len = 1) are all the same case: query i
sits at position ctx + i and sees keys 0 ..= ctx + i.

GQA packing: a program owns one KV head and a tile of BLOCK_Q query tokens x GROUP_PAD query
heads = BLOCK_M rows (row r = token r // GROUP_PAD, head r % GROUP_PAD), so every KV tile it
reads serves all heads of the group.

    grid = (num_tokens // BLOCK_Q + num_seqs, num_kv_heads)

Tile t belongs to the last sequence s with qsl[s] // BLOCK_Q + s <= t (binary search; the
"+ s" gives every sequence room for its partial last tile). Tiles past a sequence's queries
exit at once. The grid needs no host-side tile map, so a step copies nothing to the device.

The key loop has two phases: keys below the tile's first position are visible to every row
(no masks), then the diagonal tiles, masked causally.
"""

from __future__ import annotations

import torch
import triton.language as tl

from services.executor.kernels.launch import dual_kernel, next_pow2, use_interpreter

LOG2E = 1.4426950408889634


@dual_kernel
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    out_ptr,
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_kc_blk,
    stride_kc_off,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_off,
    stride_vc_head,
    stride_bt_seq,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # BLOCK_M // GROUP_PAD query tokens per tile
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its dot cannot multiply bf16, so widen operands
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)

    # Loop-carried values must keep one type: start them as int32 tensors, not Python ints.
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1

    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q0 = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if q0 < query_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        ctx = seq_len - query_len

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        qi = q0 + offs_m // GROUP_PAD
        g = offs_m % GROUP_PAD
        mask_m = (qi < query_len) & (g < GROUP)
        mask_d = offs_d < HEAD_DIM
        heads = kvh * GROUP + g
        tok = (q_start + qi).to(tl.int64)
        q = tl.load(
            q_ptr + tok[:, None] * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        ).to(k_cache_ptr.dtype.element_ty)
        if UPCAST:
            q = q.to(tl.float32)
        pos = ctx + qi

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
        k_base = k_cache_ptr + kvh * stride_kc_head + offs_d[None, :]
        v_base = v_cache_ptr + kvh * stride_vc_head + offs_d[None, :]

        # Phase 1: whole key tiles before the tile's first query position (ctx + q0).
        full_end = ((ctx + q0) // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
            slot = offs_n % BLOCK_SIZE
            k = tl.load(
                k_base + blk[:, None] * stride_kc_blk + slot[:, None] * stride_kc_off,
                mask=mask_d[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + blk[:, None] * stride_vc_blk + slot[:, None] * stride_vc_off,
                mask=mask_d[None, :],
                other=0.0,
            )
            if UPCAST:
                v = v.to(tl.float32)
            p_op = p.to(v_cache_ptr.dtype.element_ty)  # P@V runs at the cache precision
            if UPCAST:
                p_op = p_op.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_op, v, input_precision=DOT_PRECISION)
            m_i = m_new

        # Phase 2: the diagonal, up to the tile's last query position.
        kv_end = tl.minimum(seq_len, ctx + q0 + BLOCK_Q)
        for n0 in range(full_end, kv_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_end
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
            slot = offs_n % BLOCK_SIZE
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(
                k_base + blk[:, None] * stride_kc_blk + slot[:, None] * stride_kc_off, mask=kv_mask, other=0.0
            )
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            # Key 0 is visible to every row, so no row's max stays -inf past the first tile.
            visible = mask_n[None, :] & (offs_n[None, :] <= pos[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + blk[:, None] * stride_vc_blk + slot[:, None] * stride_vc_off, mask=kv_mask, other=0.0
            )
            if UPCAST:
                v = v.to(tl.float32)
            p_op = p.to(v_cache_ptr.dtype.element_ty)  # P@V runs at the cache precision
            if UPCAST:
                p_op = p_op.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p_op, v, input_precision=DOT_PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o = out_ptr + tok[:, None] * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :]
        tl.store(o, out.to(o.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def prefill_tiling(
    device: torch.device, group: int, head_dim: int, max_query_len: int
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this step's shape."""
    group_pad = next_pow2(group)
    if use_interpreter(device):
        # The interpreter's cost is per program and per tile op, nearly flat in tile size.
        return max(32, group_pad), 32, 1, 1
    # Measured on an H200 (bf16, head_dim 128, GQA 4; benchmarks/kernels.py --sweep): 64x64 tiles,
    # 4 warps, 2 stages beat 128-row tiles with 8 warps for both a 4096-token prefill (324 vs
    # 297 TFLOP/s) and 8 x 512-token extends over 1024 cached tokens (300 vs 265 TFLOP/s).
    # max_query_len stays an input: on other GPUs the best tile may depend on it.
    block_n = 64 if head_dim <= 128 else 32
    return max(64, group_pad), block_n, 4, 2


def paged_prefill(
    q: torch.Tensor,  # (num_tokens, num_heads, head_dim)
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (num_seqs, max_blocks) int32
    query_start_loc: torch.Tensor,  # (num_seqs + 1,) int32
    seq_lens: torch.Tensor,  # (num_seqs,) int32: context + query tokens
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,  # launch-config overrides, for tuning sweeps
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's query chunk over its whole paged context."""
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous head_dim")
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = next_pow2(group)
    bm, bn, warps, stages = prefill_tiling(q.device, group, head_dim, max_query_len)
    block_m = max(block_m or bm, group_pad, 16)
    block_n = block_n or bn
    block_q = block_m // group_pad
    upcast = use_interpreter(q.device) and k_cache.dtype == torch.bfloat16
    _paged_prefill_kernel.launch(
        (num_tokens // block_q + num_seqs, num_kv_heads),
        q.device,
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        scale * LOG2E,
        num_seqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        BLOCK_SIZE=block_size,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_pow2(max(head_dim, 16)),
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 or upcast else "tf32",
        UPCAST=upcast,
        num_warps=num_warps or warps,
        num_stages=num_stages or stages,
    )
    return out
