"""KV cache sizing and allocation."""

from __future__ import annotations

import pytest
import torch

from services.executor.kv_cache import GiB, KVCacheSpec, allocate_kv_cache, determine_num_blocks
from shared.config import EngineConfig

CPU = torch.device("cpu")


def spec(dtype=torch.float32, block_size=16) -> KVCacheSpec:
    return KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype=dtype, block_size=block_size)


def test_bytes_per_block():
    # K and V, 30 layers, 16 tokens, 3 heads of 64: SmolLM2-135M's shape.
    assert spec().bytes_per_block == 2 * 30 * 16 * 3 * 64 * 4
    assert spec(torch.bfloat16).bytes_per_block == 2 * 30 * 16 * 3 * 64 * 2


def test_cpu_blocks_from_kv_cache_space():
    config = EngineConfig(kv_cache_space=0.5)
    assert determine_num_blocks(config, spec(), CPU) == int(0.5 * GiB) // spec().bytes_per_block
    assert determine_num_blocks(config, spec(torch.bfloat16), CPU) == 2 * determine_num_blocks(
        config, spec(), CPU
    )


def test_override_wins_on_any_device():
    config = EngineConfig(num_gpu_blocks_override=12, kv_cache_space=100.0)
    assert determine_num_blocks(config, spec(), CPU) == 12


def test_too_little_space_is_an_error():
    with pytest.raises(ValueError, match="KV cache"):
        determine_num_blocks(EngineConfig(kv_cache_space=1e-6), spec(), CPU)


def test_cuda_without_profile_is_an_error():
    with pytest.raises(ValueError, match="profiling"):
        determine_num_blocks(EngineConfig(), spec(), torch.device("cuda"))


def test_allocate_shapes_and_zeros():
    s = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4)
    caches = allocate_kv_cache(s, 10, CPU)
    assert len(caches) == 3
    for k, v in caches:
        assert k.shape == v.shape == (10, 4, 2, 8) and k.dtype == torch.bfloat16
        assert k.data_ptr() != v.data_ptr() and not k.any() and not v.any()
    assert caches[0][0].data_ptr() != caches[1][0].data_ptr()
