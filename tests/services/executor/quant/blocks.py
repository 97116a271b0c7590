"""Quantized test tensors of every packed GGUF type, as raw blocks.

Q4_0, Q4_1 and Q8_0 come from the gguf package's own quantizer (on normal weights, as a
model has). gguf cannot quantize K-quants, so their blocks are built by hand: random
codes and 6-/8-bit sub-scales (every bit pattern is a valid block) with fp16 super-block
scales of a real model's size.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize

from services.executor.quant.ggml_blocks import BLOCKS

ALL_TYPES = (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)
_FP16_SCALE_AT = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def make_raw(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """(rows, cols / block * bytes) uint8 blocks."""
    rng = np.random.default_rng(seed)
    if qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        return quantize(w, qtype)
    size, nbytes = BLOCKS[qtype]
    raw = rng.integers(0, 256, (rows * cols // size, nbytes), dtype=np.uint8)
    for at in _FP16_SCALE_AT[qtype]:
        d = (rng.standard_normal(len(raw)) * 2e-3).astype(np.float16)
        raw[:, at : at + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)
