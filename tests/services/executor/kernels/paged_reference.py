"""Naive paged attention for tests: per-sequence loops, gathered K/V, float32 softmax.

Also builds random paged batches: blocks are handed out in a shuffled order so that block
tables are not the identity, and unused cache slots hold random garbage that a kernel must
never read.

Imports only torch and the attention interface, so the kernel tests run on a GPU image that
lacks the engine's other dependencies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from services.executor.attention.backend import AttentionMetadata

# Tolerances (atol = rtol) against the float32 reference computed from the same inputs.
# fp32: the kernels compute in fp32 with IEEE dots; only the summation order differs, so
#   errors are ~1e-6 at |values| ~ 1.
# bf16: probabilities are rounded to bf16 before the P@V dot (relative 2^-8) and the output is
#   rounded to bf16 (ulp 2^-7 ~ 0.008 at |values| ~ 1): 2e-2 is ~2.5 ulp.
# fp16: the same with 3 more mantissa bits (ulp 2^-10 ~ 1e-3): 5e-3.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def devices_under_test() -> list[str]:
    """CUDA when asked for (FOLIO_TEST_DEVICE) or present and not told to interpret, else CPU."""
    forced = os.environ.get("FOLIO_TEST_DEVICE")
    if forced:
        return [forced]
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return ["cuda"] if torch.cuda.is_available() and not interpret else ["cpu"]


@dataclass
class PagedBatch:
    """One step: sequence s has ctx_lens[s] cached tokens, then query_lens[s] new ones."""

    ctx_lens: list[int]
    query_lens: list[int]
    q: torch.Tensor  # (num_tokens, num_heads, head_dim)
    k: torch.Tensor  # (num_tokens, num_kv_heads, head_dim): the new tokens' keys
    v: torch.Tensor
    k_cache: torch.Tensor  # (num_blocks, block_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor
    meta: AttentionMetadata


def make_batch(
    ctx_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    write_new: bool = True,
) -> PagedBatch:
    """A random batch; with write_new the new tokens' K/V are already in the cache."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(ctx_lens, query_lens, strict=True)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks: never referenced, full of garbage
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = order[used : used + n]
        used += n

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    num_tokens = sum(query_lens)
    q = randn(num_tokens, num_heads, head_dim)
    k = randn(num_tokens, num_kv_heads, head_dim)
    v = randn(num_tokens, num_kv_heads, head_dim)
    slots = []
    for s, (c, n) in enumerate(zip(ctx_lens, query_lens, strict=True)):
        pos = torch.arange(c, c + n)
        slots.append(tables[s, pos // block_size].long() * block_size + pos % block_size)
    slot_mapping = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)
    if write_new:
        reference_write(k, v, k_cache, v_cache, slot_mapping)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        num_tokens=num_tokens,
        num_seqs=len(seq_lens),
        slot_mapping=slot_mapping.to(device),
        block_tables=tables.to(device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
        block_size=block_size,
    )
    return PagedBatch(
        list(ctx_lens),
        list(query_lens),
        q.to(device),
        k.to(device),
        v.to(device),
        k_cache.to(device),
        v_cache.to(device),
        meta,
    )


def reference_write(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(k_cache.device)
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep.to(k.device)].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep.to(v.device)].to(v_cache.dtype)


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's queries over its cached keys, in float32."""
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[2]
    block_size = k_cache.shape[1]
    tables = meta.block_tables.cpu()
    out = torch.empty(q.shape, dtype=torch.float32)
    start = 0
    for s, (n, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu, strict=True)):
        pos = torch.arange(seq_len)
        blk = tables[s, pos // block_size].long()
        keys = k_cache.cpu()[blk, pos % block_size].float().repeat_interleave(group, dim=1)
        vals = v_cache.cpu()[blk, pos % block_size].float().repeat_interleave(group, dim=1)
        qs = q.cpu()[start : start + n].float()
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale
        q_pos = torch.arange(seq_len - n, seq_len)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[start : start + n] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals)
        start += n
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)
