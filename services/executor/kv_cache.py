"""The paged KV cache: how many blocks fit, and the per-layer K/V tensors.

Each layer gets a (k_cache, v_cache) pair of shape
(num_blocks, block_size, num_kv_heads_of_this_rank, head_dim). The block count is
  - config.num_gpu_blocks_override, when set (any device; tests use it);
  - on CPU: config.kv_cache_space GiB divided by the bytes of one block (all layers);
  - on CUDA: what is left of gpu_memory_utilization x total memory after the weights
    and the peak activations of a profiling forward pass of max_num_batched_tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from shared.config import EngineConfig

log = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    dtype: torch.dtype
    block_size: int

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block across all layers."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> KVCaches:
    # Zeros, not empty: attention reads whole blocks and masks the unused slots, and a
    # NaN bit pattern there would survive the mask (0 * NaN = NaN).
    shape = (num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [
        (
            torch.zeros(shape, dtype=spec.dtype, device=device),
            torch.zeros(shape, dtype=spec.dtype, device=device),
        )
        for _ in range(spec.num_layers)
    ]


def determine_num_blocks(
    config: EngineConfig,
    spec: KVCacheSpec,
    device: torch.device,
    profile_run: Callable[[], int] | None = None,
    extra_bytes_per_block: int = 0,
) -> int:
    """Number of KV blocks to allocate. `profile_run` (CUDA only) runs a worst-case forward
    pass and returns the bytes of any temporary KV cache it allocated itself.
    `extra_bytes_per_block`: another cache indexed by the same block ids (a speculative
    draft model's) shares the budget."""
    per_block = spec.bytes_per_block + extra_bytes_per_block
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override
    if device.type == "cuda":
        if profile_run is None:
            raise ValueError("sizing the KV cache on CUDA needs a profiling run")
        num_blocks = _cuda_num_blocks(config.gpu_memory_utilization, per_block, device, profile_run)
        where = f"{config.gpu_memory_utilization:.0%} of GPU memory"
    else:
        num_blocks = int(config.kv_cache_space * GiB) // per_block
        where = f"kv_cache_space={config.kv_cache_space} GiB"
    if num_blocks < 2:
        raise ValueError(
            f"no room for the KV cache with {where}: one block of {spec.block_size} tokens needs "
            f"{per_block / 2**20:.1f} MiB; raise the limit or lower max_num_batched_tokens"
        )
    log.info("KV cache: %d blocks of %d tokens (%s)", num_blocks, spec.block_size, where)
    return num_blocks


def _cuda_num_blocks(
    utilization: float, bytes_per_block: int, device: torch.device, profile_run: Callable[[], int]
) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    free, total = torch.cuda.mem_get_info(device)
    # Memory in use that torch's allocator does not own: the CUDA context, other processes.
    outside_torch = (total - free) - torch.cuda.memory_reserved(device)
    temp_kv_bytes = profile_run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - temp_kv_bytes
    torch.cuda.empty_cache()
    budget = int(total * utilization) - outside_torch - peak
    log.info(
        "GPU memory: total %.2f GiB, outside torch %.2f GiB, weights+activations peak %.2f GiB",
        total / GiB,
        outside_torch / GiB,
        peak / GiB,
    )
    return max(budget, 0) // bytes_per_block
