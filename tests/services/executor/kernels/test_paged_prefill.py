"""paged_prefill (prefill, chunked prefill, prefix hit + extend, mixed decode rows) vs reference."""

from __future__ import annotations

import pytest
import torch

from services.executor.kernels.paged_prefill import paged_prefill
from tests.services.executor.kernels.paged_reference import (
    assert_close,
    devices_under_test,
    make_batch,
    reference_attention,
)

DEVICES = devices_under_test()
HEAD_DIM = 16
KV_HEADS = 2

# (cached context, new query tokens) per sequence:
#   (0, 7)   fresh prefill, ragged
#   (16, 9)  prefix-cache hit of whole blocks, then extend
#   (21, 1)  a decode row mixed into the batch
#   (5, 11)  a later chunk of a chunked prefill that starts and ends mid-block
#   (0, 16)  a prefill that ends exactly on a block boundary
#   (32, 20) long context: the unmasked first phase of the key loop runs
MIXED = [(0, 7), (16, 9), (21, 1), (5, 11), (0, 16), (32, 20)]


def _run(batch, scale: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    m = batch.meta
    return paged_prefill(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        m.block_tables,
        m.query_start_loc,
        m.seq_lens,
        scale,
        m.max_query_len,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_prefill_matches_reference(device: str, dtype: torch.dtype, block_size: int, group: int) -> None:
    ctx, qlen = zip(*MIXED, strict=True)
    batch = make_batch(list(ctx), list(qlen), KV_HEADS * group, KV_HEADS, HEAD_DIM, block_size, dtype, device)
    scale = HEAD_DIM**-0.5
    expected = reference_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale)
    out = _run(batch, scale)
    assert out.dtype == dtype
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_single_sequence_and_odd_head_dim(device: str) -> None:
    batch = make_batch([0], [23], 6, 2, 24, 4, torch.float32, device, seed=7)
    expected = reference_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.2)
    assert_close(_run(batch, 0.2), expected, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_causality(device: str) -> None:
    # Changing a later token's key/value must not change an earlier query's output.
    batch = make_batch([3], [12], 2, 1, HEAD_DIM, 4, torch.float32, device, seed=11)
    before = _run(batch, 0.25)
    batch.k_cache.view(-1, 1, HEAD_DIM)[batch.meta.slot_mapping[-1]] += 5.0
    batch.v_cache.view(-1, 1, HEAD_DIM)[batch.meta.slot_mapping[-1]] += 5.0
    after = _run(batch, 0.25)
    assert torch.equal(before[:-1], after[:-1])
    assert not torch.allclose(before[-1], after[-1])
