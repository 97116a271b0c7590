"""Paged decode attention: one query token per sequence over its KV blocks.

GQA-aware: one program serves the `group = num_heads // num_kv_heads` query heads that share a
KV head, so each KV tile is read from memory once per KV head, not once per query head. The
group is padded to a power of two >= 16 (the smallest `tl.dot` tile); padded rows are masked.

Split-K ("flash decoding"): with few sequences the grid (seqs x kv_heads) would leave most
SMs idle, so each sequence's context is cut into `num_splits` segments, each program writes an
unnormalised partial (acc, running max m, running sum l), and a reduce kernel merges them:

    out = sum_s 2^(m_s - M) * acc_s / sum_s 2^(m_s - M) * l_s,   M = max_s m_s

Segments are sized per sequence inside the kernel (ceil(len / num_splits), rounded up to the
key tile), so the grid depends only on (num_seqs, num_kv_heads, num_splits), never on lengths.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl

from services.executor.kernels.launch import dual_kernel, next_pow2, use_interpreter

LOG2E = 1.4426950408889634
MIN_SEGMENT = 256  # tokens: shorter segments cost more in the reduce than they win in parallelism
MAX_SPLITS = 64
SPLIT_QUANTUM = 16  # split counts are multiples of this; see choose_num_splits


@dual_kernel
def _paged_decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_acc_ptr,  # (num_seqs, num_heads, num_splits, HEAD_DIM_PAD) fp32, SPLIT only
    part_ml_ptr,  # (num_seqs, num_heads, num_splits, 2) fp32, SPLIT only
    qk_scale,  # softmax scale * log2(e): softmax runs in base 2
    num_splits,
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
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: its dot cannot multiply bf16, so widen operands
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    seg = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * seg
    end = tl.minimum(start + seg, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    ).to(k_cache_ptr.dtype.element_ty)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    k_base = k_cache_ptr + kvh * stride_kc_head + offs_d[None, :]
    v_base = v_cache_ptr + kvh * stride_vc_head + offs_d[None, :]
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = offs_n % BLOCK_SIZE
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            k_base + blk[:, None] * stride_kc_blk + slot[:, None] * stride_kc_off, mask=kv_mask, other=0.0
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
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

    if SPLIT:
        row = (seq.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * num_splits + split
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=mask_g[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=mask_g)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=mask_g)
    else:
        # A zero-length row (padding in a captured batch) yields zeros instead of NaN.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        o = out_ptr + seq.to(tl.int64) * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :]
        tl.store(o, out.to(o.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


@dual_kernel
def _reduce_splits_kernel(
    part_acc_ptr,
    part_ml_ptr,
    seq_lens_ptr,
    out_ptr,
    num_splits,
    stride_o_tok,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    # Same segment size as the decode kernel; segments past the end of the sequence are empty.
    seg = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
    n_valid = tl.cdiv(seq_len, seg)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_s = offs_s < n_valid
    row = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + offs_s
    m = tl.load(part_ml_ptr + row * 2, mask=mask_s, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + row * 2 + 1, mask=mask_s, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(mask_s, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(w * l_s, 0)
    acc = tl.load(
        part_acc_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=mask_s[:, None], other=0.0
    )
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0.0, denom, 1.0)
    o = out_ptr + seq.to(tl.int64) * stride_o_tok + head * stride_o_head + offs_d
    tl.store(o, out.to(o.dtype.element_ty), mask=offs_d < HEAD_DIM)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split the context only when (seqs x kv_heads) programs cannot fill the GPU.

    NOTE: on an H200 (Llama-3-8B shapes) 32 splits of 256 tokens ran at the expected speed
    (B=1, ctx 8192: 35 us), but 4 and 5 splits cost ~60 us more than their work (B=1 and B=8
    at ctx 1024: 94 us, where the unsplit kernel does 32 x 1024 tokens in 50 us). Triton
    compiles a different kernel when an int argument is a multiple of 16, so split counts are
    kept to multiples of 16 (the measured-good case), and contexts too short for 16 segments
    of MIN_SEGMENT tokens are not split.
    """
    programs = num_seqs * num_kv_heads
    if programs >= num_sms:
        return 1
    most = min(MAX_SPLITS, max_seq_len // MIN_SEGMENT) // SPLIT_QUANTUM * SPLIT_QUANTUM
    if most < SPLIT_QUANTUM:
        return 1
    want = math.ceil(2 * num_sms / programs)  # ~2 waves of programs hide the tail
    return min(most, math.ceil(want / SPLIT_QUANTUM) * SPLIT_QUANTUM)


def decode_workspace_numel(num_seqs: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of scratch the split-K path needs (0 without splits)."""
    if num_splits <= 1:
        return 0
    return num_seqs * num_heads * num_splits * (next_pow2(max(head_dim, 16)) + 2)


def default_block_n(device: torch.device, head_dim: int) -> int:
    if use_interpreter(device):
        return 16  # the interpreter pays per tile op, but tests want several tiles per context
    return 64 if head_dim <= 128 else 32


def paged_decode(
    q: torch.Tensor,  # (num_seqs, num_heads, head_dim): one query token per sequence
    k_cache: torch.Tensor,  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (num_seqs, max_blocks) int32
    seq_lens: torch.Tensor,  # (num_seqs,) int32, including the query token
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int = 1,
    workspace: torch.Tensor | None = None,  # fp32, >= decode_workspace_numel(...) elements
    block_n: int | None = None,
    num_warps: int | None = None,  # launch-config overrides, for tuning sweeps
    num_stages: int | None = None,
) -> torch.Tensor:
    """Decode attention over the paged cache; returns out (num_seqs, num_heads, head_dim)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous head_dim")
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    head_dim_pad = next_pow2(max(head_dim, 16))
    block_n = block_n or default_block_n(q.device, head_dim)
    num_splits = max(1, int(num_splits))
    split = num_splits > 1
    if split:
        need = decode_workspace_numel(num_seqs, num_heads, head_dim, num_splits)
        if workspace is None or workspace.numel() < need:
            workspace = torch.empty(need, dtype=torch.float32, device=q.device)
        n_acc = num_seqs * num_heads * num_splits * head_dim_pad
        part_acc, part_ml = workspace[:n_acc], workspace[n_acc:need]
    else:
        part_acc = part_ml = out  # unused: SPLIT is a constexpr, the stores are compiled out
    on_gpu = not use_interpreter(q.device)
    upcast = not on_gpu and k_cache.dtype == torch.bfloat16
    _paged_decode_kernel.launch(
        (num_seqs, num_kv_heads, num_splits),
        q.device,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_acc,
        part_ml,
        scale * LOG2E,
        num_splits,
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
        GROUP_PAD=max(16, next_pow2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_N=block_n,
        SPLIT=split,
        DOT_PRECISION="ieee" if k_cache.dtype == torch.float32 or upcast else "tf32",
        UPCAST=upcast,
        num_warps=num_warps or 4,
        num_stages=num_stages or (3 if on_gpu else 1),
    )
    if split:
        _reduce_splits_kernel.launch(
            (num_seqs, num_heads),
            q.device,
            part_acc,
            part_ml,
            seq_lens,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            SPLITS_PAD=next_pow2(num_splits),
            BLOCK_N=block_n,
            num_warps=4 if head_dim_pad >= 128 else 1,
        )
    return out
