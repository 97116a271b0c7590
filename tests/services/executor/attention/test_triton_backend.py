"""TritonAttentionBackend against the naive reference and the torch backend, whole steps.

CPU runs the kernels through Triton's interpreter; with CUDA (or FOLIO_TEST_DEVICE=cuda) they
run compiled. Tolerances: see tests/services/executor/kernels/paged_reference.py.
"""

from __future__ import annotations

import pytest
import torch

from services.executor.attention.triton_backend import TritonAttentionBackend
from tests.services.executor.kernels.paged_reference import (
    PagedBatch,
    assert_close,
    devices_under_test,
    make_batch,
    reference_attention,
    reference_write,
)

DEVICES = devices_under_test()
HEAD_DIM = 16
KV_HEADS = 2
SCALE = HEAD_DIM**-0.5

# (dtype, block_size, GQA group): every dtype, block size and group appears at least once.
CONFIGS = [
    (torch.float32, 16, 3),
    (torch.float32, 1, 1),
    (torch.bfloat16, 16, 4),
    (torch.float16, 1, 3),
]


def _expected(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    reference_write(batch.k, batch.v, k_cache, v_cache, batch.meta.slot_mapping)
    return reference_attention(batch.q, k_cache, v_cache, batch.meta, SCALE), k_cache, v_cache


def _run(backend, batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    backend.prepare(batch.meta)
    out = backend.forward(batch.q, batch.k, batch.v, k_cache, v_cache, batch.meta, SCALE)
    return out, k_cache, v_cache


def _check_against_torch_backend(batch: PagedBatch, out: torch.Tensor, dtype: torch.dtype) -> None:
    torch_backend = pytest.importorskip("services.executor.attention.torch_backend")
    expected, _, _ = _run(torch_backend.TorchAttentionBackend(), batch)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "block_size", "group"), CONFIGS)
def test_mixed_step_writes_cache_and_attends(
    device: str, dtype: torch.dtype, block_size: int, group: int
) -> None:
    # A fresh prefill, an extend after a prefix-cache hit, a decode row and a mid-block chunk.
    batch = make_batch(
        [0, 16, 20, 5],
        [9, 7, 1, 12],
        KV_HEADS * group,
        KV_HEADS,
        HEAD_DIM,
        block_size,
        dtype,
        device,
        write_new=False,
    )
    expected, k_expected, v_expected = _expected(batch)
    out, k_cache, v_cache = _run(TritonAttentionBackend(), batch)
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert torch.equal(k_cache, k_expected.to(device)) and torch.equal(v_cache, v_expected.to(device))
    assert_close(out, expected, dtype)
    _check_against_torch_backend(batch, out, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "block_size", "group"), CONFIGS)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_step(
    device: str, dtype: torch.dtype, block_size: int, group: int, num_splits: int | None
) -> None:
    # Lengths after the new token: 1, exactly two blocks (a block boundary), ragged.
    seq_lens = [1, 32, 45]
    batch = make_batch(
        [n - 1 for n in seq_lens],
        [1, 1, 1],
        KV_HEADS * group,
        KV_HEADS,
        HEAD_DIM,
        block_size,
        dtype,
        device,
        seed=2,
        write_new=False,
    )
    expected, k_expected, _ = _expected(batch)
    out, k_cache, _ = _run(TritonAttentionBackend(num_splits=num_splits), batch)
    assert torch.equal(k_cache, k_expected.to(device))
    assert_close(out, expected, dtype)
    _check_against_torch_backend(batch, out, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_is_made_once_per_step_and_reused_by_layers(device: str) -> None:
    backend = TritonAttentionBackend(num_splits=2)
    batch = make_batch([9, 30], [1, 1], 4, 2, HEAD_DIM, 4, torch.float32, device, write_new=False)
    backend.prepare(batch.meta)
    layers = [(batch.k_cache.clone(), batch.v_cache.clone()) for _ in range(2)]
    outs, plans = [], []
    for i, (k_cache, v_cache) in enumerate(layers):
        q, k, v = batch.q * (i + 1), batch.k - i, batch.v + i  # different inputs per layer
        outs.append(backend.forward(q, k, v, k_cache, v_cache, batch.meta, SCALE))
        plans.append(backend._plan)
    assert plans[0] is plans[1]
    for i, (k_cache, v_cache) in enumerate(layers):
        expected = reference_attention(batch.q * (i + 1), k_cache, v_cache, batch.meta, SCALE)
        assert_close(outs[i], expected, torch.float32)
    # The next step's prepare drops the plan; the scratch buffer is kept and reused.
    workspace = plans[0].workspace
    backend.prepare(batch.meta)
    assert backend._plan is None
    backend.forward(batch.q, batch.k, batch.v, *layers[0], batch.meta, SCALE)
    assert backend._plan is not plans[0] and backend._plan.workspace is workspace
