"""GroupAffine on torch's int4 kernel: its own dequantization, and its matmuls."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from services.executor.quant.ggml_blocks import decode
from services.executor.quant.int4_kernel import Int4Matmul, int4_parts, mappable, zero_rounding

from .blocks import ALL_TYPES, make_raw

ROWS, COLS = 40, 512  # 40 rows: not a multiple of 16, so the row padding is exercised
MAPPABLE = [t for t in ALL_TYPES if t != T.Q6_K]


def weight(qtype: T, seed: int = 0):
    return decode(make_raw(qtype, ROWS, COLS, seed), qtype, ROWS, COLS)


@pytest.mark.parametrize("qtype", MAPPABLE, ids=lambda t: t.name)
def test_kernel_dequantizes_like_gguf(qtype):
    """x = identity makes the kernel return its weights (times 1, plus exact zeros)."""
    w = weight(qtype)
    got = Int4Matmul(w, torch.float32)(torch.eye(COLS)).T
    if zero_rounding(w) == 0:
        assert torch.equal(got, w.dequantize())
    else:
        # Hand-made K-quant blocks pair a large sub-scale with a tiny min now and then, so
        # 8*scale - min needs more than float32's 24 bits (1 group in 768 here; none of
        # SmolLM2's 4.2M groups): there the weight is off by rounding that zero once.
        assert qtype in (T.Q4_K, T.Q5_K)
        bound = torch.finfo(torch.float32).eps * (8 * w.scale - w.min).abs().amax() * 2
        torch.testing.assert_close(got, w.dequantize(), atol=bound.item(), rtol=0)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_llama_cpp_style_blocks_map_exactly(qtype):
    assert zero_rounding(weight(qtype)) == 0


def test_q6k_has_no_int4_form():
    w = weight(T.Q6_K)
    assert not mappable(w) and w.group == 16
    with pytest.raises(ValueError, match="no int4 form"):
        int4_parts(w)


@pytest.mark.parametrize("qtype", MAPPABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_matmul_float32(qtype, rows):
    """Against the dense matmul of the same weights: only summation order differs, so
    float32 agrees to a few ulps of the sum of |products| (K = 512 terms)."""
    w = weight(qtype)
    x = torch.randn(rows, COLS, generator=torch.Generator().manual_seed(1))
    dense = w.dequantize()
    got = Int4Matmul(w, torch.float32)(x)
    bound = 64 * torch.finfo(torch.float32).eps * (x.abs() @ dense.abs().T)
    assert got.shape == (rows, ROWS)
    assert ((got - x @ dense.T).abs() <= bound).all()


@pytest.mark.parametrize("qtype", MAPPABLE, ids=lambda t: t.name)
def test_matmul_bfloat16(qtype):
    """bfloat16 activations: the kernel takes scale and zero in bfloat16, so each weight
    (c-8)*scale + zero moves by up to 2**-9 * (|(c-8)*scale| + |zero|) per part, and the
    output is rounded to bfloat16 (2**-9 relative). Bound: twice that, summed over |x|."""
    w = weight(qtype)
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = Int4Matmul(w, torch.bfloat16)(x).float()
    ref = x.float() @ w.dequantize().T
    magnitude = sum(
        ((c.float() - 8).view(ROWS, -1, 32).abs() * s.unsqueeze(-1).abs() + z.unsqueeze(-1).abs()).view(
            ROWS, COLS
        )
        for c, s, z in int4_parts(w)
    )
    bound = 2 * 2**-9 * (x.float().abs() @ magnitude.T) + 2 * 2**-9 * ref.abs()
    assert ((got - ref).abs() <= bound).all()
