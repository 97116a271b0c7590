"""GGUF blocks decode to exactly what the gguf package's dequantization gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from services.executor.quant.ggml_blocks import decode

from .blocks import ALL_TYPES, make_raw

ROWS, COLS = 48, 512


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_is_gguf_bit_for_bit(qtype):
    raw = make_raw(qtype, ROWS, COLS)
    ref = torch.from_numpy(dequantize(raw, qtype).reshape(ROWS, COLS).copy())
    got = decode(raw, qtype, ROWS, COLS).dequantize()
    assert got.dtype == torch.float32
    # Bit for bit, with one exception that is not a value difference: where a Q4_0 or Q6_K
    # code sits at the zero point and the block scale is negative, gguf computes d * 0 =
    # -0.0 and we compute scale*c - min = +0.0. So: bits equal wherever the value is not 0.
    assert torch.equal(got, ref)
    nonzero = ref != 0
    assert torch.equal(got.view(torch.int32)[nonzero], ref.view(torch.int32)[nonzero])


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_slices_decode_like_the_whole(qtype):
    w = decode(make_raw(qtype, ROWS, COLS), qtype, ROWS, COLS)
    full = w.dequantize()
    assert torch.equal(w.narrow(0, 16, 16).dequantize(), full[16:32])
    assert torch.equal(w.narrow(1, 256, 256).dequantize(), full[:, 256:])
    rows = torch.tensor([3, 0, 47, 3])
    assert torch.equal(w.dequantize(rows), full[rows])


def test_column_slice_off_a_group_boundary_is_refused():
    w = decode(make_raw(T.Q4_1, 16, 64), T.Q4_1, 16, 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        w.narrow(1, 16, 48)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="whole blocks"):
        decode(np.zeros((4, 20), np.uint8), T.Q4_1, 4, 48)
    with pytest.raises(ValueError, match="no packed form"):
        decode(np.zeros((4, 8), np.uint8), T.Q2_K, 4, 256)
