"""The fused elementwise kernels (rms_norm.py, rotary.py, activation.py) against the torch
ops the model runs on CPU (CPU: Triton interpreter; CUDA: compiled).

Tolerances: these ops round once per output element where torch rounds after each
intermediate op in bf16/fp16, and the norm's mean sums in another order, so results may
differ by an ulp or two of the output dtype: fp32 1e-5 (summation order only), bf16 2e-2
(ulp 2^-7 at |x| ~ 1), fp16 5e-3 (ulp 2^-10); the same table as the attention kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.executor.kernels.activation import silu_and_mul
from services.executor.kernels.rms_norm import rms_norm
from services.executor.kernels.rotary import apply_rotary_
from services.executor.models.norm import RMSNorm
from services.executor.models.rotary import RotaryEmbedding
from tests.services.executor.kernels.paged_reference import TOLERANCE, devices_under_test

DEVICES = devices_under_test()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu().float(), expected.float(), rtol=tol, atol=tol)


def torch_norm(hidden: int, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5, dtype=dtype, device=torch.device("cpu"))
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.5 * torch.randn(hidden, generator=gen))
    return norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576])  # 576 (SmolLM2): not a power of two
def test_rms_norm(device: str, dtype: torch.dtype, hidden: int) -> None:
    gen = torch.Generator().manual_seed(0)
    norm = torch_norm(hidden, dtype, gen)
    x = (3 * torch.randn(5, hidden, generator=gen)).to(dtype)
    out = rms_norm(x.to(device), norm.weight.to(device), norm.eps)
    assert out.dtype == dtype and out.shape == x.shape
    close(out, norm._norm(x), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_residual(device: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    hidden = 96
    norm = torch_norm(hidden, dtype, gen)
    x = torch.randn(7, hidden, generator=gen).to(dtype)
    residual = (4 * torch.randn(7, hidden, generator=gen)).to(dtype)
    expected_out, expected_residual = norm.add_and_norm(x, residual)

    res = residual.to(device, copy=True)
    out = rms_norm(x.to(device), norm.weight.to(device), norm.eps, residual=res)
    if dtype == torch.bfloat16 and device == "cpu":
        # The interpreter's fp32 -> bf16 cast truncates (compiled Triton rounds to nearest).
        close(res, expected_residual, dtype)
    else:
        # The sum is one rounding of an exact fp32 add, as torch's: bit-exact.
        assert torch.equal(res.cpu(), expected_residual)
    close(out, expected_out, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_rejects_what_it_cannot_address(device: str) -> None:
    w = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="2-D"):
        rms_norm(torch.ones(2, 3, 8, device=device), w, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rms_norm(torch.ones(2, 8, device=device), w, 1e-6, residual=torch.ones(3, 8, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (9, 3, 64), (4, 4, 32)])
def test_rotary_in_place_on_qkv_views(device, dtype, heads, kv_heads, head_dim) -> None:
    gen = torch.Generator().manual_seed(2)
    rope = RotaryEmbedding(head_dim, 512, 10000.0, None, dtype=dtype, device=torch.device("cpu"))
    tokens = 6
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    positions = torch.tensor([0, 1, 7, 200, 511, 3])

    def split(t: torch.Tensor):  # q and k as strided views of the fused projection
        q = t[:, :q_size].view(tokens, heads, head_dim)
        k = t[:, q_size : q_size + kv_size].view(tokens, kv_heads, head_dim)
        return q, k

    rope.prepare(positions)
    expected_q, expected_k = rope(positions, *split(qkv))
    dev_qkv = qkv.to(device, copy=True)
    q, k = split(dev_qkv)
    apply_rotary_(q, k, rope.cos.to(device), rope.sin.to(device), positions.to(device))
    close(q, expected_q, dtype)
    close(k, expected_k, dtype)
    assert torch.equal(dev_qkv[:, q_size + kv_size :].cpu(), qkv[:, q_size + kv_size :])  # v untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("inter", "block"), [(128, 1024), (1536, 1024), (40, 16)])
def test_silu_and_mul(device: str, dtype: torch.dtype, inter: int, block: int) -> None:
    """(1536, 1024) and (40, 16): several column blocks per row, the last one partial."""
    gen = torch.Generator().manual_seed(3)
    gate_up = (2 * torch.randn(5, 2 * inter, generator=gen)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    out = silu_and_mul(gate_up.to(device), block=block)
    assert out.shape == (5, inter)
    close(out, F.silu(gate) * up, dtype)
