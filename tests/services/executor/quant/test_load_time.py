"""Load-time int8 (per row) and int4 (groups of 32) quantization of float weights."""

from __future__ import annotations

import pytest
import torch

from services.executor.quant.int4_kernel import Int4Matmul
from services.executor.quant.load_time import Int8Matmul, quantize_int4


def test_int4_rounds_to_nearest_step():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    q = quantize_int4(w)
    assert q.bits == 4 and int(q.codes.max()) <= 15
    step = q.scale.repeat_interleave(32, dim=1)
    # half a step, plus float32 rounding of (w - min) / scale
    assert ((q.dequantize() - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()


def test_int4_constant_group_is_exact():
    w = torch.full((16, 32), 0.25)
    assert torch.equal(quantize_int4(w).dequantize(), w)


def test_int8_rounds_to_nearest_step_and_matmuls():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    k = Int8Matmul(w, torch.float32)
    assert ((k.dequantize() - w).abs() <= k.scale.unsqueeze(1) / 2 * (1 + 1e-5)).all()
    x = torch.randn(3, 96)
    dense = k.dequantize()
    bound = 64 * torch.finfo(torch.float32).eps * (x.abs() @ dense.abs().T)
    assert ((k(x) - x @ dense.T).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_on_the_kernel(dtype):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_int4(w)
    x = torch.randn(2, 64)
    got = Int4Matmul(q, dtype)(x.to(dtype)).float()
    tol = 1e-5 if dtype == torch.float32 else 0.1  # bf16: 2**-8 of sums of |x||w| ~ 10
    torch.testing.assert_close(got, x.to(dtype).float() @ q.dequantize().T, atol=tol, rtol=0.02)


def test_int4_needs_whole_groups():
    with pytest.raises(ValueError, match="multiples of 32"):
        quantize_int4(torch.zeros(4, 48))
