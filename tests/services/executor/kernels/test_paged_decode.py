"""paged_decode (with and without split-K) against the naive float32 reference."""

from __future__ import annotations

import pytest
import torch

from services.executor.kernels.paged_decode import choose_num_splits, decode_workspace_numel, paged_decode
from tests.services.executor.kernels.paged_reference import (
    assert_close,
    devices_under_test,
    make_batch,
    reference_attention,
)

DEVICES = devices_under_test()
HEAD_DIM = 16
KV_HEADS = 2


def _boundary_lens(block_size: int) -> list[int]:
    # 1 token; a context ending exactly on a block boundary; one block plus one; a ragged one.
    # The key tile under the interpreter is 16 wide, so 40 spans three tiles.
    return [1, 2 * block_size if block_size > 1 else 16, block_size + 1, 40]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_decode_matches_reference(device: str, dtype: torch.dtype, block_size: int, group: int) -> None:
    seq_lens = _boundary_lens(block_size)
    batch = make_batch(
        [n - 1 for n in seq_lens],
        [1] * len(seq_lens),
        KV_HEADS * group,
        KV_HEADS,
        HEAD_DIM,
        block_size,
        dtype,
        device,
    )
    scale = HEAD_DIM**-0.5
    expected = reference_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale)
    m = batch.meta
    out = paged_decode(batch.q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, scale)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_k_matches_reference(device: str, dtype: torch.dtype, num_splits: int) -> None:
    # 5 splits of a 40-token context leave 2 empty segments (segments round up to the 16-wide
    # key tile), and the 1-token sequence has only one non-empty segment: the reduce must
    # ignore the rest.
    seq_lens = [1, 40, 33]
    batch = make_batch([n - 1 for n in seq_lens], [1, 1, 1], 2 * 3, 2, HEAD_DIM, 16, dtype, device, seed=3)
    scale = 0.3
    expected = reference_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale)
    m = batch.meta
    workspace = torch.full(
        (decode_workspace_numel(3, 6, HEAD_DIM, num_splits),), float("nan"), device=device
    )  # stale NaNs in scratch must not leak into the result
    out = paged_decode(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        m.block_tables,
        m.seq_lens,
        scale,
        num_splits=num_splits,
        workspace=workspace,
    )
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_head_dim_not_power_of_two(device: str) -> None:
    batch = make_batch([20, 5], [1, 1], 4, 2, 24, 4, torch.float32, device, seed=5)
    m = batch.meta
    expected = reference_attention(batch.q, batch.k_cache, batch.v_cache, m, 0.2)
    out = paged_decode(batch.q, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, 0.2)
    assert_close(out, expected, torch.float32)


def test_choose_num_splits() -> None:
    # A full GPU (seqs x kv heads >= SMs) or contexts too short for 16 segments: no split.
    assert choose_num_splits(num_seqs=32, num_kv_heads=8, max_seq_len=8192, num_sms=132) == 1
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=256, num_sms=132) == 1
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=1024, num_sms=132) == 1
    # One long sequence: enough splits for ~2 waves, bounded by 256-token segments.
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=8192, num_sms=132) == 32
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_seq_len=4096, num_sms=132) == 16
    # Split counts are multiples of 16: 8 x 8 programs want 5 splits, get 16.
    assert choose_num_splits(num_seqs=8, num_kv_heads=8, max_seq_len=8192, num_sms=132) == 16
