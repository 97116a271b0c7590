"""reshape_and_cache against a plain indexed write (CPU: Triton interpreter; CUDA: compiled)."""

from __future__ import annotations

import pytest
import torch

from services.executor.kernels.reshape_and_cache import reshape_and_cache
from tests.services.executor.kernels.paged_reference import devices_under_test, reference_write

DEVICES = devices_under_test()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_writes_slots_and_skips_minus_one(device: str, dtype: torch.dtype, block_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    num_blocks, kv_heads, head_dim = 40 // block_size + 2, 2, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    # K and V as strided views of one fused projection, the way a model produces them.
    qkv = torch.randn(6, (4 + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    k = qkv[:, 4 * head_dim : (4 + kv_heads) * head_dim].view(6, kv_heads, head_dim)
    v = qkv[:, (4 + kv_heads) * head_dim :].view(6, kv_heads, head_dim)
    last = num_blocks * block_size - 1
    slots = torch.tensor([3, -1, last, 0, -1, block_size], dtype=torch.int64)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference_write(k, v, expected_k, expected_v, slots)

    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    reshape_and_cache(k.to(device), v.to(device), k_cache, v_cache, slots.to(device))

    # A copy: bit-exact, and untouched slots (the -1 rows) keep their old contents.
    assert torch.equal(k_cache.cpu(), expected_k)
    assert torch.equal(v_cache.cpu(), expected_v)


@pytest.mark.parametrize("device", DEVICES)
def test_casts_to_cache_dtype(device: str) -> None:
    k_cache = torch.zeros(2, 4, 1, 16, dtype=torch.bfloat16, device=device)
    v_cache = torch.zeros_like(k_cache)
    k = torch.full((1, 1, 16), 1.0 / 3.0, device=device)  # fp32 in, bf16 cache
    reshape_and_cache(k, -k, k_cache, v_cache, torch.tensor([5], device=device))
    # Within one bf16 ulp (2^-8 relative): compiled Triton rounds to nearest, the interpreter
    # truncates.
    torch.testing.assert_close(
        k_cache[1, 1, 0].float().cpu(), torch.full((16,), 1.0 / 3.0), atol=0, rtol=2**-7
    )
    torch.testing.assert_close(
        v_cache[1, 1, 0].float().cpu(), torch.full((16,), -1.0 / 3.0), atol=0, rtol=2**-7
    )
    k_cache[1, 1, 0] = 0
    assert not k_cache.any()  # nothing else was written
